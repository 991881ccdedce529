"""The Hierarchical Attention Decoder seed's API: ``Decoder(vocab_size, sequence_length, heads, d_model, levels)``."""

from __future__ import annotations

import math

import torch

from ..config import check_positive_int, config_error
from ..models.causal_lms import TreeConfig, TreeLM


class Decoder(TreeLM):
    """``model(input_ids)`` returns logits [B, L, V]; ``model(input_ids, training=False)`` returns
    probabilities [B, L, V] (softmax over the vocabulary; the module's train/eval mode is not changed).

    How the seed's arguments map onto :class:`TreeConfig`:

    * ``sequence_length`` and ``levels``: the seed cuts ``sequence_length`` into ``2**levels`` leaves, so
      ``leaf_size = ceil(sequence_length / 2**levels)`` and an input of ``sequence_length`` tokens has a
      tree of exactly ``levels`` levels above its leaves (``levels`` changes the output). Longer inputs
      also work: the tree grows a level each time the length doubles.
    * the tree: ``level_mode="levelwise"``, the seed's mechanism - causal attention inside each leaf,
      then level by level every right sibling's tokens cross-attend to their left sibling and add the
      result (a residual), so representations are updated level by level.
    * ``sibling_mode``: "summary" (default; the left sibling is pooled to ``n_summary`` tokens, so a layer
      costs O(L log L)) or "exact" (every left-sibling token, the seed's O(L^2) form).
      ``level_mode="joint"`` selects the other tree attention (one softmax over the leaf and all left
      siblings; its exact form is dense causal attention).
    * ``heads`` -> ``n_heads``; LayerNorm and a 4x GELU MLP as in the seed's decoder block;
      ``n_layers=2`` for its two hierarchical-attention layers; ``n_summary`` defaults to gcd(leaf, 8).

    ``hierseq.save`` / ``hierseq.load`` treat it as a ``tree`` model.
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
        sibling_mode: str = "summary",
        level_mode: str = "levelwise",
        n_summary: int | None = None,
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
            sibling_mode=sibling_mode,
            level_mode=level_mode,
            n_summary=math.gcd(leaf_size, 8) if n_summary is None else n_summary,
            mlp="gelu",
            norm="layernorm",
        )
        super().__init__(config)
        self.sequence_length = sequence_length
        self.levels = levels

    def forward(self, input_ids: torch.Tensor, training: bool = True) -> torch.Tensor:  # type: ignore[override]
        logits = super().forward(input_ids).logits
        return logits if training else torch.softmax(logits.float(), dim=-1)
