"""Weight initialisation shared by the causal LMs."""

from __future__ import annotations

from torch import nn


def init_residual_scaled_(
    model: nn.Module, n_layers: int, std: float, residual_out: tuple[str, ...], skip: tuple[str, ...] = ()
) -> None:
    """GPT-2 style init: every matrix ~ N(0, std), residual-output projections (parameter names ending in
    ``residual_out``) scaled by 1/sqrt(2 * n_layers) so the residual stream's variance does not grow
    with depth; biases zero. Parameters whose names end in ``skip`` keep their own init."""
    depth_scale = (2 * n_layers) ** -0.5
    for name, p in model.named_parameters():
        if skip and name.endswith(skip):
            continue
        if p.dim() >= 2:
            nn.init.normal_(p, mean=0.0, std=std * (depth_scale if name.endswith(residual_out) else 1.0))
        elif name.endswith("bias"):
            nn.init.zeros_(p)
