"""Causal multi-head softmax attention (the Transformer control's mixer): fused QKV, RoPE, SDPA, KV cache."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..config import (
    check_divisible,
    check_positive_float,
    check_positive_int,
    config_error,
)
from ..modules.positional import RotaryEmbedding
from ..modules.state import LayerState
from .base import Mixer, MixerConfig, register_mixer


@dataclasses.dataclass
class KVState(LayerState):
    """Keys and values of one attention layer, [B, H, T, Dh] each, in a buffer whose capacity doubles
    when full (appending a token is amortised O(1) copies). ``length``: keys held; ``position``: the
    rotary position of the next token; ``memory``: keys kept by :meth:`detach` (0 = all).

    Truncated BPTT (Transformer-XL style): :meth:`detach` keeps the last ``memory`` keys, detached, and
    re-bases their rotary positions to 0 .. memory-1 (RoPE is relative, so scores do not change), so
    neither the window nor the positions grow over a long stream.
    """

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    length: int = 0
    position: int = 0
    memory: int = 0
    rope_base: float = 10000.0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add k, v: [B, H, L, Dh]; return all keys and values so far: [B, H, T + L, Dh]."""
        new_len = self.length + k.shape[2]
        self.position += k.shape[2]
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # Writing into the buffer would modify tensors autograd saved in earlier calls (backward over
            # several cached calls, e.g. TBPTT, would fail): grow out of place instead.
            if self.k is not None and self.length:
                k = torch.cat((self.k[:, :, : self.length], k), dim=2)
                v = torch.cat((self.v[:, :, : self.length], v), dim=2)
            self.k, self.v, self.length = k, v, new_len
            return k, v
        if self.k is None or new_len > self.k.shape[2]:
            capacity = max(new_len, 2 * (self.k.shape[2] if self.k is not None else 0), 64)
            shape = (k.shape[0], k.shape[1], capacity, k.shape[3])
            new_k, new_v = k.new_empty(shape), v.new_empty(shape)
            if self.k is not None and self.length:
                new_k[:, :, : self.length] = self.k[:, :, : self.length]
                new_v[:, :, : self.length] = self.v[:, :, : self.length]
            self.k, self.v = new_k, new_v
        self.k[:, :, self.length : new_len] = k
        self.v[:, :, self.length : new_len] = v
        self.length = new_len
        return self.k[:, :, :new_len], self.v[:, :, :new_len]

    def trimmed(self) -> KVState:
        """The same state with the buffers cut to the keys held (what is saved)."""
        k = None if self.k is None else self.k[:, :, : self.length]
        v = None if self.v is None else self.v[:, :, : self.length]
        return dataclasses.replace(self, k=k, v=v)

    def state_dict(self) -> dict:
        return LayerState.state_dict(self.trimmed())

    def num_floats(self) -> int:
        return LayerState.num_floats(self.trimmed())

    def detach(self) -> KVState:
        super().detach()
        if self.memory and self.k is not None and self.length > self.memory:
            start = self.length - self.memory
            k = RotaryEmbedding.shift(self.k[:, :, start : self.length], -(self.position - self.memory), self.rope_base)
            self.k, self.v = k, self.v[:, :, start : self.length].clone()
            self.length = self.position = self.memory
        return self


def causal_mask_with_offset(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Boolean mask [q_len, k_len], True = may attend, for queries at positions k_len - q_len .. k_len - 1."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device).unsqueeze(1)
    k_pos = torch.arange(k_len, device=device).unsqueeze(0)
    return k_pos <= q_pos


def cached_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_past: int, dropout_p: float = 0.0
) -> torch.Tensor:
    """q: [B, H, L, Dh] new queries; k, v: [B, H, n_past + L, Dh] (past keys first) -> [B, H, L, Dh]."""
    if n_past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    if q.shape[2] == 1:  # one new token sees everything cached: no mask
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    mask = causal_mask_with_offset(q.shape[2], k.shape[2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def check_heads(d_model: int, n_heads: int) -> None:
    """n_heads must divide d_model into even head widths (RoPE rotates pairs)."""
    check_positive_int("n_heads", n_heads)
    check_divisible("d_model", d_model, "n_heads", n_heads)
    if (d_model // n_heads) % 2:
        raise config_error("n_heads", n_heads, f"head dim d_model/n_heads={d_model // n_heads} must be even for RoPE")


@dataclasses.dataclass
class RotaryHeadsConfig(MixerConfig):
    """What every rotary multi-head mixer has: n_heads (head width d_model / n_heads, even for RoPE) and
    the rotary base."""

    n_heads: int = 4
    rope_base: float = 10000.0

    def check(self, d_model: int) -> None:
        super().check(d_model)
        check_heads(d_model, self.n_heads)
        check_positive_float("rope_base", self.rope_base)


@dataclasses.dataclass
class AttentionMixerConfig(RotaryHeadsConfig):
    """n_heads: heads (head width d_model / n_heads, even for RoPE). attn_dropout: on attention
    probabilities. tbptt_memory: keys a layer keeps across truncated-BPTT segments (0 = all)."""

    attn_dropout: float = 0.0
    tbptt_memory: int = 256

    nonneg_ints = ("tbptt_memory",)
    probabilities = ("attn_dropout",)


@register_mixer("attention", config=AttentionMixerConfig)
class Attention(Mixer):
    """Multi-head causal self-attention. x: [B, L, D] -> [B, L, D]; state: :class:`KVState`."""

    def __init__(self, d_model: int, cfg: AttentionMixerConfig) -> None:
        super().__init__(d_model, cfg)
        self.n_heads, self.head_dim = cfg.n_heads, d_model // cfg.n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.rotary = RotaryEmbedding(self.head_dim, cfg.rope_base)

    def new_state(self) -> KVState:
        return KVState(memory=self.cfg.tbptt_memory, rope_base=self.cfg.rope_base)

    def forward(
        self, x: torch.Tensor, state: KVState | None = None, use_cache: bool = False, need_aux: bool = False
    ) -> tuple[torch.Tensor, KVState | None, None]:
        B, L, D = x.shape
        if state is None and use_cache:
            state = self.new_state()
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        n_past = state.length if state is not None else 0
        q, k = self.rotary(q, k, state.position if state is not None else 0)
        if state is not None:
            k, v = state.append(k, v)
        y = cached_causal_attention(q, k, v, n_past, self.cfg.attn_dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, D)), state, None

    def state_size(self, seq_len: int) -> int:
        return 2 * seq_len * self.d_model
