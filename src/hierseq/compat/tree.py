"""The Hierarchical Attention Decoder seed's API: ``Decoder(vocab_size, sequence_length, heads, d_model, levels)``."""

from __future__ import annotations

import math

import torch

from ..config import check_positive_int, config_error
from ..models.causal_lms import TreeConfig, TreeLM


class Decoder(TreeLM):
    """``model(input_ids)`` returns logits [B, L, V]; ``model(input_ids, training=False)`` returns
    probabilities [B, L, V] (softmax over the vocabulary; the module's train/eval mode is not changed).

    Mapping onto :class:`TreeConfig`: the seed cuts ``sequence_length`` into ``2**levels`` leaves, so
    ``leaf_size = ceil(sequence_length / 2**levels)``; the sibling attention is "exact" as the seed
    describes; LayerNorm and a 4x GELU MLP as in its decoder block; ``n_layers=2`` for its two
    hierarchical-attention layers. Unlike the seed, inputs longer than ``sequence_length`` also work
    (the tree grows), and ``hierseq.save`` / ``hierseq.load`` treat it as a ``tree`` model.
    """

    def __init__(
        self,
        vocab_size: int,
        sequence_length: int,
        heads: int,
        d_model: int,
        levels: int,
        dropout: float = 0.0,
        n_layers: int = 2,
    ) -> None:
        check_positive_int("sequence_length", sequence_length)
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 0:
            raise config_error("levels", levels, "must be a non-negative integer")
        if levels > math.log2(sequence_length):
            raise ValueError(f"levels={levels} needs sequence_length >= {2**levels}, got {sequence_length}")
        leaf_size = -(-sequence_length // 2**levels)
        config = TreeConfig(
            vocab_size=vocab_size,
            d_model=d_model,
            n_layers=n_layers,
            dropout=dropout,
            n_heads=heads,
            leaf_size=leaf_size,
            sibling_mode="exact",
            n_summary=math.gcd(leaf_size, 8),
            mlp="gelu",
            norm="layernorm",
        )
        super().__init__(config)
        self.sequence_length = sequence_length
        self.levels = levels

    def forward(self, input_ids: torch.Tensor, training: bool = True) -> torch.Tensor:  # type: ignore[override]
        logits = super().forward(input_ids).logits
        return logits if training else torch.softmax(logits.float(), dim=-1)
