"""Normalisation layers."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm: x / rms(x) * weight. x: [..., D] -> [..., D].

    Statistics are computed in fp32 so bf16/fp16 activations do not lose precision."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class LayerNorm(nn.LayerNorm):
    """Standard LayerNorm with an optional bias. x: [..., D] -> [..., D]."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__(dim, eps=eps, bias=bias)


def make_norm(kind: str, dim: int) -> nn.Module:
    """``kind`` is "rmsnorm" or "layernorm"."""
    if kind == "rmsnorm":
        return RMSNorm(dim)
    if kind == "layernorm":
        return LayerNorm(dim)
    raise ValueError(f"norm={kind!r}: must be one of ['rmsnorm', 'layernorm']")
