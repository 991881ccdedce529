"""THE pre-norm residual block, for every causal LM: ``Block(mixer, mlp, norm)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class Block(nn.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x)) (no second half when ``mlp`` is None). x: [B, L, D].

    ``mixer`` follows the mixer signature (``mixers/base.py``); its state and aux loss pass through.
    """

    def __init__(self, mixer: nn.Module, mlp: nn.Module | None, norm: Callable[[], nn.Module], dropout: float) -> None:
        super().__init__()
        self.mixer_norm, self.mixer = norm(), mixer
        self.mlp_norm, self.mlp = (norm(), mlp) if mlp is not None else (None, None)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, *mixer_args: Any, **mixer_kwargs: Any) -> tuple[torch.Tensor, Any, Any]:
        """x: [B, L, D]; the other arguments go to the mixer. Returns (x', the mixer's state, its aux)."""
        h, state, aux = self.mixer(self.mixer_norm(x), *mixer_args, **mixer_kwargs)
        x = x + self.resid_dropout(h)
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x, state, aux
