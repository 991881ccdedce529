"""Plain causal linear attention (Katharopoulos et al. 2020): the reference point for associative recall
at a given state size.

Per head, with the positive feature map phi(x) = elu(x) + 1 on queries and keys:

    S_t = S_{t-1} + phi(k_t) v_t^T        (state [key_dim, head_dim])
    z_t = z_{t-1} + phi(k_t)              (normaliser [key_dim])
    out_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps)

The normaliser is carried as one extra value column (v' = [v, 1]), so the state per head is
key_dim x (head_dim + 1) floats. Queries, keys and values pass a short causal depthwise conv first (the
same front end as ``hamt``), so a difference in recall between the two comes from the memory.

Two computation paths that agree to float tolerance: :func:`linear_attention_chunked` (training: a
masked [C, C] score matrix inside each chunk plus the state carried in by an exclusive cumulative sum
over chunk totals; sums only, no exponentials, so nothing can overflow) and
:func:`linear_attention_step` (generation, O(1) per token); :func:`linear_attention_reference` is the
loop over time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import (
    BaseConfig,
    check_choice,
    check_divisible,
    check_nonneg_int,
    check_positive_float,
    check_positive_int,
)
from ..layers.causal_conv import CausalDepthwiseConv1d
from ..layers.init import init_residual_scaled_
from ..layers.mlp import make_mlp
from ..layers.norms import make_norm
from ..layers.state_cache import LayerStateCache
from ..losses import causal_lm_loss
from ..outputs import CausalLMOutput
from ..registry import register
from ..validation import check_input_ids, check_labels

__all__ = [
    "LinearAttentionCache",
    "LinearAttentionConfig",
    "LinearAttentionLM",
    "linear_attention_chunked",
    "linear_attention_reference",
    "linear_attention_step",
]

_EPS = 1e-6


# ======================================================================== the linear-attention op
def linear_attention_step(
    q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token. q_t, k_t: [B, H, dk] (already feature-mapped, positive); v_t: [B, H, dv];
    state: [B, H, dk, dv + 1] or None. Returns (out_t [B, H, dv], new state)."""
    v_ext = torch.cat((v_t, torch.ones_like(v_t[..., :1])), dim=-1)
    update = k_t.unsqueeze(-1) * v_ext.unsqueeze(-2)
    state = update if state is None else state + update
    num_den = torch.einsum("bhk,bhkv->bhv", q_t, state)
    return num_den[..., :-1] / (num_den[..., -1:] + _EPS), state


def linear_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop over time. q, k: [B, H, L, dk]; v: [B, H, L, dv]; state [B, H, dk, dv + 1] or None.
    Returns (out [B, H, L, dv], final state)."""
    outs = []
    for t in range(q.shape[2]):
        out_t, state = linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state)
        outs.append(out_t)
    return torch.stack(outs, dim=2), state


def linear_attention_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor | None = None, chunk_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`linear_attention_reference` without a loop over tokens (same arguments and results)."""
    batch, heads, length, key_dim = q.shape
    chunk = min(chunk_size, length)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    v_ext = torch.cat((v, torch.ones_like(v[..., :1])), dim=-1)
    if pad:  # zero keys write nothing, so the final state is unchanged
        q, k, v_ext = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v_ext))
    q, k = (t.reshape(batch, heads, n_chunks, chunk, key_dim) for t in (q, k))
    v_ext = v_ext.reshape(batch, heads, n_chunks, chunk, -1)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    scores = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0.0)  # [B, H, n, C, C]
    num_den = scores @ v_ext
    chunk_totals = k.transpose(-1, -2) @ v_ext  # [B, H, n, dk, dv + 1]
    ends = chunk_totals.cumsum(dim=2)
    if state is not None:
        ends = ends + state.unsqueeze(2)
    start = torch.zeros_like(ends[:, :, :1]) if state is None else state.unsqueeze(2)
    entering = torch.cat((start, ends[:, :, :-1]), dim=2)
    num_den = num_den + q @ entering
    num_den = num_den.reshape(batch, heads, n_chunks * chunk, -1)[:, :, :length]
    return num_den[..., :-1] / (num_den[..., -1:] + _EPS), ends[:, :, -1]


# ==================================================================================== config
@dataclass
class LinearAttentionConfig(BaseConfig):
    """n_heads: heads (value width d_model / n_heads each). key_dim: feature size per head (0 = head
    width); state per layer = n_heads * key_dim * (head width + 1) floats plus the conv window.
    conv_kernel: short causal conv on q/k/v (1 = none across time). chunk_size: parallel-path chunk."""

    n_heads: int = 4
    key_dim: int = 0
    conv_kernel: int = 4
    chunk_size: int = 64
    mlp: str = "swiglu"
    mlp_hidden: int = 0
    norm: str = "rmsnorm"
    tie_embeddings: bool = True
    init_std: float = 0.02

    @classmethod
    def small_overrides(cls) -> dict[str, Any]:
        return {**super().small_overrides(), "n_heads": 2, "chunk_size": 16}

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def resolved_key_dim(self) -> int:
        return self.key_dim or self.head_dim

    def validate(self) -> None:
        super().validate()
        check_positive_int("n_heads", self.n_heads)
        check_divisible("d_model", self.d_model, "n_heads", self.n_heads)
        check_nonneg_int("key_dim", self.key_dim)
        check_positive_int("conv_kernel", self.conv_kernel)
        check_positive_int("chunk_size", self.chunk_size)
        check_choice("mlp", self.mlp, ("swiglu", "gelu"))
        check_nonneg_int("mlp_hidden", self.mlp_hidden)
        check_choice("norm", self.norm, ("rmsnorm", "layernorm"))
        check_choice("tie_embeddings", self.tie_embeddings, (True, False))
        check_positive_float("init_std", self.init_std)


class LinearAttentionCache(LayerStateCache):
    """Per layer (conv window [B, C, K-1], state [B, H, dk, dv + 1]) or None; constant size."""


class LinearAttention(nn.Module):
    """x: [B, L, D] -> [B, L, D] with optional carried (conv, state)."""

    def __init__(self, cfg: LinearAttentionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.heads, self.key_dim, self.head_dim = cfg.n_heads, cfg.resolved_key_dim, cfg.head_dim
        self.qk_width = cfg.n_heads * self.key_dim
        self.in_proj = nn.Linear(cfg.d_model, 2 * self.qk_width + cfg.d_model, bias=False)
        self.conv = CausalDepthwiseConv1d(2 * self.qk_width + cfg.d_model, cfg.conv_kernel)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def _split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv: [..., 2 H dk + D] -> phi(q), phi(k): [..., H, dk]; v: [..., H, dv]."""
        q, k, v = qkv.split((self.qk_width, self.qk_width, self.cfg.d_model), dim=-1)
        q = F.elu(q.unflatten(-1, (self.heads, self.key_dim))) + 1.0
        k = F.elu(k.unflatten(-1, (self.heads, self.key_dim))) + 1.0
        return q, k, v.unflatten(-1, (self.heads, self.head_dim))

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        conv_state, memory = (None, None) if state is None else state
        if state is not None and x.shape[1] == 1:
            qkv_t, conv_state = self.conv.step(self.in_proj(x[:, 0]), conv_state)
            out, memory = linear_attention_step(*self._split(qkv_t), memory)
            return self.out_proj(out.flatten(-2)).unsqueeze(1), (conv_state, memory)
        qkv, conv_state = self.conv(self.in_proj(x), conv_state, return_state=True)
        q, k, v = (t.transpose(1, 2) for t in self._split(qkv))  # [B, H, L, *]
        out, memory = linear_attention_chunked(q, k, v, memory, self.cfg.chunk_size)
        return self.out_proj(out.transpose(1, 2).flatten(-2)), (conv_state, memory)


class LinearAttentionBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: LinearAttentionConfig) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg.norm, cfg.d_model)
        self.attn = LinearAttention(cfg)
        self.mlp_norm = make_norm(cfg.norm, cfg.d_model)
        self.mlp = make_mlp(cfg.mlp, cfg.d_model, cfg.mlp_hidden or None, cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        h, state = self.attn(self.attn_norm(x), state)
        x = x + self.resid_dropout(h)
        return x + self.mlp(self.mlp_norm(x)), state


@register("linear_attn", config=LinearAttentionConfig, kind="causal_lm")
class LinearAttentionLM(nn.Module):
    """input_ids: [B, L] -> CausalLMOutput(logits [B, L, V], loss, lm_loss, aux_loss=0, cache)."""

    #: the recurrent state it returns; the trainer rebuilds a checkpointed TBPTT state with it.
    cache_class = LinearAttentionCache

    def __init__(self, config: LinearAttentionConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(LinearAttentionBlock(config) for _ in range(config.n_layers))
        self.final_norm = make_norm(config.norm, config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def reset_parameters(self) -> None:
        # The short conv keeps its own fan-in init.
        init_residual_scaled_(
            self,
            self.config.n_layers,
            self.config.init_std,
            ("attn.out_proj.weight", "mlp.down.weight", "mlp.fc_out.weight"),
            skip=("conv.weight", "conv.bias"),
        )

    def state_size(self) -> int:
        """Floats of recurrent state per layer and batch row: H * dk * (dv + 1) plus the conv window."""
        cfg = self.config
        conv = (2 * cfg.n_heads * cfg.resolved_key_dim + cfg.d_model) * (cfg.conv_kernel - 1)
        return cfg.n_heads * cfg.resolved_key_dim * (cfg.head_dim + 1) + conv

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        cache: LinearAttentionCache | None = None,
        use_cache: bool = False,
    ) -> CausalLMOutput:
        input_ids = check_input_ids(input_ids, self.config.vocab_size)
        check_labels(labels, input_ids, self.config.vocab_size)
        if cache is not None and not isinstance(cache, LinearAttentionCache):
            raise TypeError(f"cache: expected a LinearAttentionCache, got {type(cache).__name__}")
        new_cache = LinearAttentionCache(self.config.n_layers) if (use_cache or cache is not None) else None
        x = self.drop(self.embed(input_ids))
        for i, block in enumerate(self.blocks):
            x, state = block(x, cache.layers[i] if cache is not None else None)
            if new_cache is not None:
                new_cache.layers[i] = state
        if new_cache is not None:
            new_cache.length = (cache.length if cache is not None else 0) + input_ids.shape[1]
        logits = self.lm_head(self.final_norm(x))
        loss = lm_loss = None
        if labels is not None:
            lm_loss = causal_lm_loss(logits, labels)
            loss = lm_loss
        return CausalLMOutput(logits=logits, loss=loss, lm_loss=lm_loss, aux_loss=logits.new_zeros(()), cache=new_cache)
