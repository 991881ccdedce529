"""Plain causal linear attention (Katharopoulos et al. 2020): the reference point for associative recall at
a given state size.

Per head, with the positive feature map phi(x) = elu(x) + 1 on queries and keys, the state is
S_t = S_{t-1} + phi(k_t) [v_t, 1]^T (key_dim x (head_dim + 1) floats; the last column is the normaliser)
and out_t = phi(q_t)^T S_t[:, :dv] / (phi(q_t)^T S_t[:, dv] + eps); the ops are in
``ops/linear_attention.py``. Queries, keys and values pass a short causal depthwise conv first (the same
front end as ``hamt``), so a difference in recall between the two comes from the memory.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_divisible
from ..modules.causal_conv import CausalDepthwiseConv1d
from ..modules.state import RecurrentState
from ..ops.linear_attention import linear_attention_chunked, linear_attention_step
from .base import Mixer, MixerConfig, register_mixer


@dataclasses.dataclass
class LinearAttentionMixerConfig(MixerConfig):
    """n_heads: heads (value width d_model / n_heads each). key_dim: feature size per head (0 = head
    width). conv_kernel: short causal conv on q/k/v (1 = none across time). chunk_size: parallel-path
    chunk (speed only, not the result)."""

    n_heads: int = 4
    key_dim: int = 0
    conv_kernel: int = 4
    chunk_size: int = 64

    positive_ints = ("n_heads", "conv_kernel", "chunk_size")
    nonneg_ints = ("key_dim",)

    def check(self, d_model: int) -> None:
        super().check(d_model)
        check_divisible("d_model", d_model, "n_heads", self.n_heads)


@register_mixer("linear_attn", config=LinearAttentionMixerConfig)
class LinearAttention(Mixer):
    """x: [B, L, D] -> [B, L, D]; state: :class:`RecurrentState` (conv window, memory [B, H, dk, dv + 1])."""

    def __init__(self, d_model: int, cfg: LinearAttentionMixerConfig) -> None:
        super().__init__(d_model, cfg)
        self.key_dim = cfg.key_dim or d_model // cfg.n_heads
        self.heads, self.head_dim = cfg.n_heads, d_model // cfg.n_heads
        self.qk_width = cfg.n_heads * self.key_dim
        self.in_proj = nn.Linear(d_model, 2 * self.qk_width + d_model, bias=False)
        self.conv = CausalDepthwiseConv1d(2 * self.qk_width + d_model, cfg.conv_kernel)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def state_size(self, seq_len: int) -> int:
        """H * dk * (dv + 1) plus the conv window, whatever the length."""
        return self.heads * self.key_dim * (self.head_dim + 1) + self.conv.channels * self.conv.state_len

    def _split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv: [..., 2 H dk + D] -> phi(q), phi(k): [..., H, dk]; v: [..., H, dv]."""
        q, k, v = qkv.split((self.qk_width, self.qk_width, self.d_model), dim=-1)
        q = F.elu(q.unflatten(-1, (self.heads, self.key_dim))) + 1.0
        k = F.elu(k.unflatten(-1, (self.heads, self.key_dim))) + 1.0
        return q, k, v.unflatten(-1, (self.heads, self.head_dim))

    def forward(
        self, x: torch.Tensor, state: RecurrentState | None = None, use_cache: bool = False, need_aux: bool = False
    ) -> tuple[torch.Tensor, RecurrentState | None, None]:
        keep = use_cache or state is not None
        conv_state, memory = (None, None) if state is None else (state.conv, state.memory)
        if state is not None and x.shape[1] == 1:
            qkv_t, conv_state = self.conv.step(self.in_proj(x[:, 0]), conv_state)
            out, memory = linear_attention_step(*self._split(qkv_t), memory)
            return self.out_proj(out.flatten(-2)).unsqueeze(1), RecurrentState(conv_state, memory), None
        qkv, conv_state = self.conv(self.in_proj(x), conv_state, return_state=True)
        q, k, v = (t.transpose(1, 2) for t in self._split(qkv))  # [B, H, L, *]
        out, memory = linear_attention_chunked(q, k, v, memory, self.cfg.chunk_size)
        y = self.out_proj(out.transpose(1, 2).flatten(-2))
        return y, (RecurrentState(conv_state, memory) if keep else None), None
