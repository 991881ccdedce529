"""Flat masked autoencoder: the comparison point for HAMA.

A plain MAE (He et al. 2021) on sequences: a fraction ``mask_ratio`` of the positions is chosen at
random, the encoder (full bidirectional attention over the whole sequence) sees only the visible
tokens, and the decoder sees the encoded visible tokens back at their positions plus a learned mask
token at every masked position. Same blocks, width and objectives as HAMA, no hierarchy: attention
over the whole sequence, so its cost grows quadratically with L.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import MaskedAEConfig, check_positive_int, config_error
from ..losses import masked_reconstruction_loss
from ..modules.encoder import Encoder, make_input_embedding
from ..modules.norms import make_norm
from ..modules.positional import SinusoidalPositionalEncoding
from ..outputs import MaskedAEOutput
from ..registry import register


@dataclass
class FlatMAEConfig(MaskedAEConfig):
    """n_layers: encoder layers; decoder_layers: decoder layers; mask_ratio: fraction of positions hidden
    from the encoder (rounded, at least 1 when L > 1)."""

    n_layers: int = 4
    decoder_layers: int = 4
    mask_ratio: float = 0.2

    @classmethod
    def small_overrides(cls) -> dict[str, Any]:
        return {"d_model": 32, "n_layers": 2, "n_heads": 2, "decoder_layers": 1}

    def validate(self) -> None:
        super().validate()
        check_positive_int("decoder_layers", self.decoder_layers)
        if isinstance(self.mask_ratio, bool) or not isinstance(self.mask_ratio, (int, float)):
            raise config_error("mask_ratio", self.mask_ratio, "must be a number in (0, 1)")
        if not 0.0 < self.mask_ratio < 1.0:
            raise config_error("mask_ratio", self.mask_ratio, "must be a number in (0, 1)")

    def n_masked(self, length: int) -> int:
        """Masked positions in a length-``length`` sequence: round(ratio * L), in [1, L - 1] when L > 1."""
        if length <= 1:
            return 0
        return min(max(round(self.mask_ratio * length), 1), length - 1)


@register("flat_mae", config=FlatMAEConfig, kind="masked_ae")
class FlatMAE(nn.Module):
    """``forward(x) -> MaskedAEOutput(reconstruction, loss, mask, aux_loss=0)``; x and reconstruction as
    in :class:`hierseq.models.hama.HAMA` (ids -> logits [B, L, V], or features [B, L, d_input])."""

    def __init__(self, config: FlatMAEConfig) -> None:
        super().__init__()
        self.config = config
        D, out_dim = config.d_model, config.output_dim
        self.embed = make_input_embedding(config.input_type, config.vocab_size, config.input_dim, D)
        self.drop = nn.Dropout(config.dropout)
        self.positional = SinusoidalPositionalEncoding(D)
        self.encoder = Encoder(D, config.n_heads, config.n_layers, config.dropout, config.mlp, config.norm)
        self.mask_token = nn.Parameter(torch.randn(D) * 0.02)
        self.decoder = Encoder(D, config.n_heads, config.decoder_layers, config.dropout, config.mlp, config.norm)
        self.head_norm = make_norm(config.norm, D)
        self.head = nn.Linear(D, out_dim)

    def choose_mask(self, batch: int, length: int, device: torch.device) -> torch.Tensor:
        """[B, L] bool, True = masked; exactly ``config.n_masked(L)`` per row. Random per row while
        training; in eval a fixed pattern that depends only on the position (deterministic, and rows
        stay independent)."""
        if self.training:
            noise = torch.rand(batch, length, device=device)
        else:
            gen = torch.Generator().manual_seed(self.config.mask_seed)
            noise = torch.rand(1, length, generator=gen).to(device).expand(batch, length)
        rank = noise.argsort(dim=1).argsort(dim=1)
        return rank < self.config.n_masked(length)

    def forward(self, x: torch.Tensor) -> MaskedAEOutput:
        x = self.config.check_input(x)
        B, L = x.shape[:2]
        D = self.config.d_model
        h = self.embed(x) if self.config.input_type == "tokens" else self.embed(x.to(self.head.weight.dtype))
        h = self.positional(self.drop(h))
        mask = self.choose_mask(B, L, x.device)
        # Visible positions in increasing order: every row has the same count, so one gather does it.
        visible_idx = (~mask).to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, : L - int(mask[0].sum())]
        latents = self.encoder(h.gather(1, visible_idx[..., None].expand(-1, -1, D)))
        # Decoder input (as in MAE): encoded tokens back at their slots, the mask token elsewhere, and the
        # position added to every token so the decoder knows where each latent sits.
        full = self.mask_token.expand(B, L, D).scatter(1, visible_idx[..., None].expand(-1, -1, D), latents)
        full = self.positional(full)
        reconstruction = self.head(self.head_norm(self.decoder(full)))
        loss = masked_reconstruction_loss(reconstruction, x, mask, self.config.input_type, self.config.loss_on)
        return MaskedAEOutput(reconstruction=reconstruction, loss=loss, mask=mask, aux_loss=loss.new_zeros(()))
