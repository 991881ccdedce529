"""The MAHA seed's API: ``MAHATransformer`` (returns ``(hidden, aux_loss)``) and ``MAHABlock`` (a drop-in
pre-norm block), over the ``maha`` mixer, the shared block and the shared stack."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..config import LMConfig, check_positive_int
from ..mixers.base import resolve_mixer_config
from ..mixers.maha import MAHAMixerConfig, MAHAState, MultiscaleAttention, describe_parameters
from ..modules.block import Block
from ..modules.mlp import make_mlp
from ..modules.norms import make_norm
from ..modules.stack import MixerStack
from ..validation import check_input_ids


@dataclasses.dataclass
class MAHAEncoderConfig(MAHAMixerConfig, LMConfig):
    """The seed classes' config: the shell's fields and MAHA's; ``causal=False`` is allowed here."""

    aux_loss_weight: float = 0.01

    def validate(self) -> None:
        super().validate()
        self.check(self.d_model)

    def describe(self) -> list[str]:
        """The block's parameters against a standard transformer block's (as the LM config's)."""
        return describe_parameters(self, self.d_model)


def _mixer(config: MAHAEncoderConfig) -> MultiscaleAttention:
    return MultiscaleAttention(config.d_model, resolve_mixer_config("maha", config))


class MAHABlock(Block):
    """``MAHABlock(d_model, num_heads, num_scales, aggregation_strategy)`` (``"convex"``, ``"nash"`` or the
    ``"softmax"`` ablation); any other
    :class:`MAHAEncoderConfig` field by keyword (e.g. ``attention="full"``, ``causal=False``), or a whole
    ``config=``. ``forward(x)`` returns y [B, L, D]; with ``return_aux=True`` ``(y, aux_loss)``; ``state``
    (a :class:`MAHAState`) continues cached decoding (causal only) and is advanced in place."""

    def __init__(
        self,
        d_model: int = 256,
        num_heads: int = 4,
        num_scales: int = 3,
        aggregation_strategy: str = "convex",
        *,
        config: MAHAEncoderConfig | None = None,
        **overrides: Any,
    ) -> None:
        if config is None:
            config = MAHAEncoderConfig(
                d_model=d_model, n_heads=num_heads, n_scales=num_scales, aggregation=aggregation_strategy, **overrides
            )
        mlp = make_mlp(config.mlp, config.d_model, config.mlp_hidden or None, config.dropout)
        super().__init__(_mixer(config), mlp, lambda: make_norm(config.norm, config.d_model), config.dropout)
        self.config = config

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, state: MAHAState | None = None, return_aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 3 or x.shape[-1] != self.config.d_model or x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"x: shape={tuple(x.shape)}: must be [batch >= 1, length >= 1, {self.config.d_model}]")
        y, _, aux = super().forward(x, state, False, True)
        return (y, aux) if return_aux else y


class MAHATransformer(MixerStack):
    """``output, aux_loss = model(input_ids)`` with output [B, N, d_model].

    ``MAHATransformer(vocab_size, max_len, d_model, num_heads, num_scales, aggregation_strategy)``;
    further :class:`MAHAEncoderConfig` fields by keyword (``num_layers`` maps to ``n_layers``;
    ``causal=False`` is the encoder variant). ``max_len`` is kept for compatibility and validated, but
    it is not a limit: positions are rotary, so longer inputs work (the seed's learned table crashed).
    """

    def __init__(
        self,
        vocab_size: int = 30000,
        max_len: int = 4096,
        d_model: int = 768,
        num_heads: int = 12,
        num_scales: int = 4,
        aggregation_strategy: str = "convex",
        num_layers: int = 4,
        **overrides: Any,
    ) -> None:
        check_positive_int("max_len", max_len)
        config = MAHAEncoderConfig(
            vocab_size=vocab_size,
            d_model=d_model,
            n_heads=num_heads,
            n_scales=num_scales,
            aggregation=aggregation_strategy,
            n_layers=num_layers,
            **overrides,
        )
        super().__init__(make_mixer=lambda i: _mixer(config), reset=False, **config.stack_kwargs())
        self.config, self.max_len = config, max_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.drop = nn.Dropout(config.dropout)
        self.reset_parameters()

    def shell_modules(self) -> list[nn.Module]:
        return [self.embed, *super().shell_modules()]

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        input_ids = check_input_ids(input_ids, self.config.vocab_size)
        hidden, _, aux = super().forward(self.drop(self.embed(input_ids)), need_aux=True)
        return hidden, aux
