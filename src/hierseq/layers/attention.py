"""Causal multi-head self-attention on ``F.scaled_dot_product_attention`` with a KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .positional import RotaryEmbedding


class KVCache:
    """Keys and values of one attention layer: [B, H, T, Dh] each, stored in a buffer whose capacity
    doubles when full, so appending a token is amortised O(1) copies instead of a full ``torch.cat``."""

    def __init__(self) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add k, v: [B, H, L, Dh]; return all keys and values so far: [B, H, T + L, Dh]."""
        new_len = self.length + k.shape[2]
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # Writing in place into the buffer would modify tensors autograd saved in earlier calls, so
            # backward through several cached calls (e.g. truncated BPTT over segments) would fail; when
            # gradients flow, grow out of place instead (O(T) copy per call, fine for training segments).
            if self._k is not None and self.length:
                k = torch.cat((self._k[:, :, : self.length], k), dim=2)
                v = torch.cat((self._v[:, :, : self.length], v), dim=2)
            self._k, self._v = k, v
            self.length = new_len
            return k, v
        if self._k is None or new_len > self._k.shape[2]:
            capacity = max(new_len, 2 * (self._k.shape[2] if self._k is not None else 0), 64)
            shape = (k.shape[0], k.shape[1], capacity, k.shape[3])
            new_k = k.new_empty(shape)
            new_v = v.new_empty(shape)
            if self._k is not None and self.length:
                new_k[:, :, : self.length] = self._k[:, :, : self.length]
                new_v[:, :, : self.length] = self._v[:, :, : self.length]
            self._k, self._v = new_k, new_v
        self._k[:, :, self.length : new_len] = k
        self._v[:, :, self.length : new_len] = v
        self.length = new_len
        return self._k[:, :, :new_len], self._v[:, :, :new_len]

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search / dropping finished rows)."""
        if self._k is not None:
            self._k = self._k.index_select(0, index)
            self._v = self._v.index_select(0, index)


def causal_mask_with_offset(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Boolean mask [q_len, k_len], True = may attend, for queries at positions k_len - q_len .. k_len - 1."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device).unsqueeze(1)
    k_pos = torch.arange(k_len, device=device).unsqueeze(0)
    return k_pos <= q_pos


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention. x: [B, L, D] -> [B, L, D].

    With ``cache`` (a :class:`KVCache`) the new keys/values are appended and queries attend to the
    whole cached past; positions (RoPE) continue from the cache length.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        rotary: bool = True,
        rope_base: float = 10000.0,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model}: must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)
        self.dropout = dropout
        self.rotary = RotaryEmbedding(self.head_dim, rope_base) if rotary else None

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, Dh]
        offset = cache.length if cache is not None else 0
        if self.rotary is not None:
            q, k = self.rotary(q, k, offset)
        if cache is not None:
            k, v = cache.append(k, v)
        dropout_p = self.dropout if self.training else 0.0
        if offset == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        elif L == 1:
            # One new token attends to everything cached: no mask needed.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            mask = causal_mask_with_offset(L, k.shape[2], x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return self.out(y.transpose(1, 2).reshape(B, L, D))
