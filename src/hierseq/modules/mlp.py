"""Feed-forward blocks: GELU MLP and SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_hidden(d_model: int, ratio: float = 8 / 3, multiple_of: int = 32) -> int:
    """Hidden width of a SwiGLU that has about the parameters of a 4x GELU MLP, rounded up."""
    hidden = int(d_model * ratio)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class GELUMLP(nn.Module):
    """x: [..., D] -> [..., D]; Linear(D, H) -> GELU -> Linear(H, D)."""

    def __init__(self, d_model: int, hidden: int | None = None, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        hidden = hidden or 4 * d_model
        self.fc_in = nn.Linear(d_model, hidden, bias=bias)
        self.out_proj = nn.Linear(hidden, d_model, bias=bias)  # the residual projection
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.out_proj(F.gelu(self.fc_in(x))))


class SwiGLU(nn.Module):
    """x: [..., D] -> [..., D]; (silu(x W_gate) * x W_up) W_down (Shazeer 2020).

    Gate and up projections are fused into one matmul for speed."""

    def __init__(self, d_model: int, hidden: int | None = None, dropout: float = 0.0, bias: bool = False) -> None:
        super().__init__()
        hidden = hidden or swiglu_hidden(d_model)
        self.hidden = hidden
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=bias)
        self.out_proj = nn.Linear(hidden, d_model, bias=bias)  # the residual projection
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.dropout(self.out_proj(F.silu(gate) * up))


MLP_KINDS = ("swiglu", "gelu", "none")


def make_mlp(kind: str, d_model: int, hidden: int | None = None, dropout: float = 0.0) -> nn.Module | None:
    """``kind`` is "swiglu", "gelu" or "none" (no MLP: returns None, as in a Mamba block)."""
    if kind == "none":
        return None
    if kind == "swiglu":
        return SwiGLU(d_model, hidden, dropout)
    if kind == "gelu":
        return GELUMLP(d_model, hidden, dropout)
    raise ValueError(f"mlp={kind!r}: must be one of {list(MLP_KINDS)}")
