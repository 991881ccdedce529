"""Losses. Causal LM labels are already next-token aligned (the data loaders shift once)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in nats over the labelled positions. logits: [B, L, V]; labels: [B, L] with -100
    ignored. A batch with no labelled position gives 0 (not NaN), so fully padded batches cannot poison
    training."""
    total = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return total / (labels != -100).sum().clamp(min=1)


def shift_for_next_token(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one place hierseq shifts: tokens [B, L+1] -> (input_ids [B, L], labels [B, L])."""
    return tokens[:, :-1], tokens[:, 1:]


def nats_to_bits(loss_nats: float) -> float:
    """Per-token loss in nats -> bits (bits per byte for the byte tokenizer)."""
    return loss_nats / math.log(2)


def masked_reconstruction_loss(
    reconstruction: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, input_type: str, loss_on: str
) -> torch.Tensor:
    """Mean cross-entropy (tokens: reconstruction = logits [B, L, V], x = ids [B, L]) or mean squared
    error (continuous: both [B, L, C]) over the masked positions (mask [B, L] True), or over all
    positions when ``loss_on="all"`` or nothing is masked."""
    select = mask if loss_on == "masked" and bool(mask.any()) else torch.ones_like(mask)
    if input_type == "tokens":
        return F.cross_entropy(reconstruction[select].float(), x[select])
    return F.mse_loss(reconstruction[select].float(), x[select].float())
