"""Sliding-window (banded) causal attention in O(L * window), and MAHA's causal up-sampling index maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["banded_attention", "causal_source_index", "upsample_causal"]


def banded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    n_prefix: int = 0,
    causal: bool = True,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Sliding-window attention on a blocked layout: one SDPA call, no loop over tokens or windows.

    q: [B, H, M, Dh] queries; k, v: [B, H, n_prefix + M, Dh], the first ``n_prefix`` (< window) being
    cached keys that precede the queries. Causal: query i attends keys at offsets [i - window + 1, i];
    non-causal (n_prefix must be 0): offsets [i - window + 1, i + window - 1]. Returns [B, H, M, Dh].

    Queries are cut into blocks of ``window``; block b needs keys from its own block and the previous
    one (and the next one, non-causal): overlapping key blocks are taken with ``unfold``, so the work is
    O(M * window) instead of O(M^2).
    """
    B, H, M, Dh = q.shape
    w = window
    if n_prefix >= w or (not causal and n_prefix):
        raise ValueError(f"n_prefix={n_prefix}: must be < window={w} (and 0 when not causal)")
    n_blocks = -(-M // w)
    lookahead = 0 if causal else 1
    n_spans = 2 + lookahead  # key blocks per query block: previous, own (, next)
    span = n_spans * w
    front = w - n_prefix  # left padding so that query block b's keys start at padded block b
    back = (n_blocks + 1 + lookahead) * w - front - n_prefix - M

    def key_blocks(x: torch.Tensor) -> torch.Tensor:
        # [B, H, n_prefix + M, Dh] -> [B * nb, H, span, Dh]: block b = padded blocks b .. b + n_spans - 1.
        # Concatenating shifted views (rather than unfold) keeps backward to cheap slice copies.
        blocks = F.pad(x, (0, 0, front, back)).view(B, H, n_blocks + n_spans - 1, w, Dh).transpose(1, 2)
        shifted = [blocks[:, i : i + n_blocks] for i in range(n_spans)]
        return torch.cat(shifted, dim=3).reshape(B * n_blocks, H, span, Dh)

    # 4-D [B * nb, H, w, Dh] layout: SDPA's fused CPU kernel takes it (5-D inputs fall back to math).
    q_blocks = F.pad(q, (0, 0, 0, n_blocks * w - M)).view(B, H, n_blocks, w, Dh).transpose(1, 2)
    q_blocks = q_blocks.reshape(B * n_blocks, H, w, Dh)
    a = torch.arange(w, device=q.device).unsqueeze(1)  # query offset inside its block
    c = torch.arange(span, device=q.device).unsqueeze(0)  # key slot inside the block's span
    offset = c - w - a  # key position minus query position
    allowed = (offset <= 0) & (offset > -w) if causal else offset.abs() < w  # [w, span]
    slot = torch.arange(n_blocks, device=q.device).unsqueeze(1) * w + c  # padded key index [nb, span]
    real = (slot >= front) & (slot < front + n_prefix + M)
    mask = (allowed.unsqueeze(0) & real.unsqueeze(1)).unsqueeze(1)  # [nb, 1, w, span]
    if B > 1:
        mask = mask.repeat(B, 1, 1, 1)
    y = F.scaled_dot_product_attention(q_blocks, key_blocks(k), key_blocks(v), attn_mask=mask, dropout_p=dropout_p)
    y = y.view(B, n_blocks, H, w, Dh).transpose(1, 2).reshape(B, H, n_blocks * w, Dh)
    return y[:, :, :M]


def causal_source_index(positions: torch.Tensor, stride: int) -> torch.Tensor:
    """Index of the coarse token base position t may read: the newest one whose whole window
    [j R, (j + 1) R - 1] has ended by t, i.e. j = floor((t + 1) / R) - 1 (-1: none yet).

    positions: [L] long base positions; stride R = r^s. Returns [L] long."""
    return (positions + 1) // stride - 1


def upsample_causal(table: torch.Tensor, positions: torch.Tensor, stride: int, first: int) -> torch.Tensor:
    """Causal upsampling of coarse outputs to base positions.

    table: [B, 1 + n, D], row 0 the output of coarse token ``first - 1`` (zeros when first = 0) and rows
    1.. those of coarse tokens first .. first + n - 1; positions: [L] base positions, all of whose
    source tokens (:func:`causal_source_index`) lie in first - 1 .. first + n - 1. Returns [B, L, D].
    """
    return table[:, causal_source_index(positions, stride) - first + 1]
