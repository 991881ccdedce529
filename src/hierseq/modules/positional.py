"""Positional encodings: sinusoidal (absolute, any length) and rotary (relative, any length)."""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_table(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Sinusoidal encodings for arbitrary (possibly non-contiguous) positions.

    positions: [...] integer or float -> [..., dim]; even channels sin, odd channels cos (as in
    Vaswani et al.). Computed on the fly, so there is no maximum length.
    """
    if dim % 2 != 0:
        raise ValueError(f"dim={dim}: sinusoidal encoding needs an even dimension")
    half = dim // 2
    inv_freq = torch.exp(-math.log(base) * torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.float().unsqueeze(-1) * inv_freq  # [..., half]
    table = torch.stack((angles.sin(), angles.cos()), dim=-1)  # [..., half, 2]
    return table.flatten(-2)


class SinusoidalPositionalEncoding(nn.Module):
    """Adds sinusoidal encodings to x: [..., L, D] at positions offset .. offset+L-1, or at ``positions``
    ([L], or any shape broadcastable to x[..., 0]); no maximum length."""

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if dim % 2 != 0:
            raise ValueError(f"dim={dim}: sinusoidal encoding needs an even dimension")
        self.dim = dim
        self.base = base

    def forward(self, x: torch.Tensor, offset: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is None:
            positions = torch.arange(offset, offset + x.shape[-2], device=x.device)
        return x + sinusoidal_table(positions, self.dim, self.base).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al.), half-split layout.

    ``forward(q, k, offset)`` rotates q, k: [B, H, L, Dh] for positions offset .. offset+L-1.
    The cos/sin table is cached and grown on demand, so any length works.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"head_dim={head_dim}: rotary embedding needs an even head dimension")
        self.head_dim = head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def _table(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cos.shape[0] < length or self._cos.device != device:
            n = max(length, 2 * (self._cos.shape[0] if self._cos is not None else 0), 256)
            t = torch.arange(n, device=device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(device))  # [n, Dh/2]
            emb = torch.cat((freqs, freqs), dim=-1)  # [n, Dh]
            self._cos, self._sin = emb.cos(), emb.sin()
        return self._cos, self._sin

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        length = q.shape[-2]
        cos, sin = self._table(offset + length, q.device)
        cos = cos[offset : offset + length].to(q.dtype)
        sin = sin[offset : offset + length].to(q.dtype)
        q_rot = q * cos + self._rotate_half(q) * sin
        k_rot = k * cos + self._rotate_half(k) * sin
        return q_rot, k_rot

    def rotate(self, x: torch.Tensor, positions: torch.Tensor, end: int) -> torch.Tensor:
        """Rotate x: [..., N, Dh] for arbitrary (non-contiguous) positions: [N] or broadcastable to
        x's leading dims + [N], e.g. the two children of every sibling pair of a tree level. ``end``: an
        int above every position; it sizes the table, so the positions are never read back to the host."""
        cos, sin = self._table(end, x.device)
        cos, sin = cos[positions].to(x.dtype), sin[positions].to(x.dtype)
        return x * cos + self._rotate_half(x) * sin

    @staticmethod
    def shift(x: torch.Tensor, delta: int, base: float = 10000.0) -> torch.Tensor:
        """Move already-rotated vectors x: [..., Dh] by ``delta`` positions (negative: back). The angle is
        formed in float64, so re-basing keys from a large position loses no precision."""
        head_dim = x.shape[-1]
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angle = torch.remainder(delta * inv_freq, 2 * torch.pi)
        angle = torch.cat((angle, angle)).to(device=x.device)
        cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
        return x * cos + RotaryEmbedding._rotate_half(x) * sin
