"""Normalisation layers."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm: x / rms(x) * weight. x: [..., D] -> [..., D].

    Statistics are computed in fp32 so bf16/fp16 activations do not lose precision."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def _rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """rsqrt(mean(x^2) + eps) over the last dim, in fp32 or wider: [..., 1]."""
    return torch.rsqrt(x.to(torch.promote_types(x.dtype, torch.float32)).square().mean(-1, keepdim=True) + eps)


class _GatedRMSNormFn(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * weight * silu(gate); saves x, gate and the per-row rsqrt only
    (the normalised x, silu(gate) and their product are recomputed in backward)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # Statistics in fp32 (as RMSNorm's), so bf16 / fp16 activations do not lose precision.
        rstd = _rstd(x, eps)
        ctx.save_for_backward(x, gate, weight, rstd)
        return (x * rstd.to(x.dtype)).mul_(weight).mul_(F.silu(gate))

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, gate, weight, rstd = ctx.saved_tensors
        rstd = rstd.to(x.dtype)
        normed = x * rstd
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grad_weight = (grad_y * normed * silu).flatten(0, -2).sum(0) if ctx.needs_input_grad[2] else None
        # d silu(g) / dg = sig (1 + g (1 - sig))
        grad_gate = grad_y * normed * weight * sig * (1.0 + gate * (1.0 - sig))
        grad_normed = grad_y * silu * weight
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        return grad_x, grad_gate, grad_weight, None


class GatedRMSNorm(nn.Module):
    """RMSNorm of x gated by silu(gate) (the output gate of Mamba-2 and Gated DeltaNet), in one op with
    its own backward. x, gate: [..., D] -> [..., D]; equal to ``RMSNorm(D)(x) * F.silu(gate)``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return _GatedRMSNormFn.apply(x, gate, self.weight, self.eps)

    def forward_reference(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """The same with plain autograd ops (for tests)."""
        normed = x * _rstd(x, self.eps).to(x.dtype)
        return normed * self.weight * F.silu(gate)


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
