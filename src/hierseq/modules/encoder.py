"""The bidirectional encoder stack of the masked autoencoders: the shared :class:`Block` and
:class:`MixerStack` (one block, one init) over non-causal multi-head attention with a key-padding mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .stack import MixerStack


def make_input_embedding(input_type: str, vocab_size: int, input_dim: int, d_model: int) -> nn.Module:
    """A masked autoencoder's input layer: ``nn.Embedding`` for token ids, ``nn.Linear`` for features."""
    return nn.Embedding(vocab_size, d_model) if input_type == "tokens" else nn.Linear(input_dim, d_model)


class BidirectionalAttention(nn.Module):
    """Multi-head attention over the whole sequence, in the mixer signature (no state, no aux).

    x: [N, S, D]; key_valid: [N, S] bool (False = padding, never attended to) or None -> [N, S, D]."""

    name = "bidirectional_attention"

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model}: must be divisible by n_heads={n_heads}")
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def reset_special_parameters(self) -> None:
        """Nothing beyond the shell's init."""

    def forward(
        self,
        x: torch.Tensor,
        state: None = None,
        use_cache: bool = False,
        need_aux: bool = False,
        key_valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None, None]:
        if state is not None or use_cache:
            raise ValueError("state: bidirectional attention keeps no decoding state")
        N, S, D = x.shape
        q, k, v = self.qkv(x).view(N, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4).unbind(0)
        mask = None if key_valid is None else key_valid[:, None, None, :]  # [N, 1, 1, S] over heads and queries
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(N, S, D)), None, None


class Encoder(MixerStack):
    """``depth`` pre-norm blocks of bidirectional attention + MLP, and a final norm.

    x: [N, S, D]; key_valid: [N, S] bool or None -> [N, S, D]."""

    def __init__(
        self, d_model: int, n_heads: int, depth: int, dropout: float = 0.0, mlp: str = "gelu", norm: str = "layernorm"
    ) -> None:
        super().__init__(
            d_model,
            depth,
            lambda i: BidirectionalAttention(d_model, n_heads, dropout),
            mlp=mlp,
            norm=norm,
            dropout=dropout,
        )

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x, key_valid=key_valid)[0]
