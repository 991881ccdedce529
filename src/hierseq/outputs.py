"""Model output containers (contract shared by every model of a kind)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class CausalLMOutput:
    """Output of a causal LM.

    logits: [B, L, V]; loss: scalar (LM loss + weighted aux loss) or None; lm_loss: the LM part alone;
    aux_loss: scalar auxiliary loss before weighting (0 when the model has none); cache: model-specific
    decoding state when ``use_cache=True``.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    cache: Any = None


@dataclass
class MaskedAEOutput:
    """Output of a masked autoencoder. reconstruction: [B, L, D] (or logits [B, L, V]); mask: [B, L] bool
    (True = masked / hidden from the encoder)."""

    reconstruction: torch.Tensor
    loss: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


@dataclass
class SeqRegressionOutput:
    """Output of a chunked sequence-to-sequence regressor. prediction: [B, T // chunk, D_out]."""

    prediction: torch.Tensor
    loss: torch.Tensor | None = None
