"""The HSSS seed's API: ``LowLevelMamba`` (a Mamba stack on continuous features) and ``HSSS`` (several
low-level models whose chunk features are concatenated, projected, and fed to a high-level Mamba), over
the shared Mamba mixer and stack and HiSS's chunking."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import check_choice, check_positive_int, config_error
from ..mixers.mamba import MambaMixerConfig
from ..models.hiss import REMAINDER_POLICIES, chunk_last_features, mamba_stack
from ..validation import check_features


class LowLevelMamba(nn.Module):
    """The seed's low-level model: ``depth`` pre-norm Mamba blocks + final RMSNorm on continuous
    features. x: [B, L, dim] -> [B, L, dim]. Every argument is honoured; ``pscan=True`` uses the fast
    parallel scan, ``False`` the sequential reference (same numbers, slower)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        dt_rank: int | str = "auto",
        d_state: int = 16,
        expand_factor: int = 2,
        d_conv: int = 4,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        bias: bool = False,
        conv_bias: bool = True,
        pscan: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("depth", depth)
        if dt_rank == "auto":
            dt_rank = 0
        if isinstance(dt_rank, bool) or not isinstance(dt_rank, int) or dt_rank < 0:
            raise config_error("dt_rank", dt_rank, "must be 'auto' or a positive integer")
        self.dim = dim
        cfg = MambaMixerConfig(
            d_state=d_state,
            d_conv=d_conv,
            expand=expand_factor,
            dt_rank=dt_rank,
            dt_min=dt_min,
            dt_max=dt_max,
            dt_init=dt_init,
            dt_scale=dt_scale,
            bias=bias,
            conv_bias=conv_bias,
            scan="fast" if pscan else "reference",
        )
        cfg.check(dim)
        self.stack = mamba_stack(dim, depth, cfg)

    def forward(self, x: torch.Tensor, state: Any = None, return_state: bool = False) -> Any:
        """x: [B, L, dim] float; optional state (a DecodingState) to continue from."""
        x = check_features(x, self.dim)
        return self.stack(x, state, return_state)


class HSSS(nn.Module):
    """The seed's hierarchical model, made to work.

    ``layers``: low-level models (e.g. :class:`LowLevelMamba`), all reading the same input features
    (x: [B, T, layers[i].dim], equal for every i). Each runs on every chunk of ``chunk_size`` steps
    (state reset per chunk); their last-step features are concatenated ([B, n, sum dims]), projected
    to ``dim`` (``proj_layer=True``; with False the concatenation must already have width ``dim``), and
    a high-level :class:`LowLevelMamba` of width ``dim`` and ``depth`` layers (its other arguments,
    ``dt_rank`` ... ``pscan``, by keyword) runs over the n chunk features. Output: [B, n, dim], or
    [B, n, d_out] with a linear head when ``d_out`` is given; n = T // chunk_size (``remainder='drop'``)
    or ceil(T / chunk_size) (``'partial'``).

    The seed README's example (x = torch.randn(1, 10, 8), three LowLevelMamba(dim=8), dim=12) gives
    [1, 1, 12] with the default chunk_size=10 (the paper's C), and [1, 2, 12] with chunk_size=5.
    """

    def __init__(
        self,
        layers: list[nn.Module],
        dim: int,
        depth: int,
        proj_layer: bool = True,
        chunk_size: int = 10,
        d_out: int | None = None,
        remainder: str = "drop",
        **mamba_options: Any,
    ) -> None:
        super().__init__()
        if not layers:
            raise config_error("layers", layers, "needs at least one low-level model")
        dims = [getattr(layer, "dim", None) for layer in layers]
        if any(not isinstance(d, int) for d in dims) or len(set(dims)) != 1:
            raise config_error("layers", dims, "every low-level model needs the same integer .dim (the input width)")
        check_positive_int("chunk_size", chunk_size)
        check_choice("remainder", remainder, REMAINDER_POLICIES)
        if d_out is not None:
            check_positive_int("d_out", d_out)
        concat = sum(dims)
        if not proj_layer and concat != dim:
            raise config_error(
                "proj_layer", proj_layer, f"without a projection the concatenated width {concat} must equal dim={dim}"
            )
        # nn.ModuleList registers every low-level model (the seed kept them in a plain list).
        self.layers = nn.ModuleList(layers)
        self.d_in = dims[0]
        self.chunk_size = chunk_size
        self.remainder = remainder
        self.proj = nn.Linear(concat, dim) if proj_layer else nn.Identity()
        self.high = LowLevelMamba(dim, depth, **mamba_options)
        self.head = nn.Linear(dim, d_out) if d_out is not None else nn.Identity()

    def _low_level(self, chunks: torch.Tensor) -> torch.Tensor:
        """chunks: [B * n, C, d_in] -> concatenated low-level outputs [B * n, C, sum dims]."""
        return torch.cat([layer(chunks) for layer in self.layers], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, d_in] float -> [B, n, dim] (or [B, n, d_out])."""
        x = check_features(x, self.d_in)
        feats = chunk_last_features(x, self.chunk_size, self.remainder, self._low_level)
        return self.head(self.high(self.proj(feats)))
