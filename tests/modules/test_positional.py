"""Sinusoidal encodings and rotary embeddings."""

from __future__ import annotations

import math

import pytest
import torch

from hierseq.modules.positional import RotaryEmbedding, SinusoidalPositionalEncoding, sinusoidal_table


def hand_sinusoid(position: float, channel: int, dim: int, base: float = 10000.0) -> float:
    """Vaswani et al.: PE[p, 2i] = sin(p / base^(2i/d)), PE[p, 2i+1] = cos(p / base^(2i/d))."""
    angle = position / base ** (2 * (channel // 2) / dim)
    return math.sin(angle) if channel % 2 == 0 else math.cos(angle)


def test_sinusoidal_table_matches_hand_formula():
    dim = 12
    positions = torch.tensor([0, 1, 5, 37, 123])
    table = sinusoidal_table(positions, dim)
    assert table.shape == (5, dim)
    expected = torch.tensor([[hand_sinusoid(p, c, dim) for c in range(dim)] for p in positions.tolist()])
    torch.testing.assert_close(table, expected, atol=2e-5, rtol=0)
    # Arbitrary leading shape and a different base.
    grid = sinusoidal_table(torch.tensor([[3, 4], [9, 2]]), 4, base=100.0)
    assert grid.shape == (2, 2, 4)
    assert grid[1, 0, 2] == pytest.approx(hand_sinusoid(9, 2, 4, base=100.0), abs=1e-6)


def test_sinusoidal_table_has_no_length_limit():
    positions = torch.arange(100_000)
    table = sinusoidal_table(positions, 16)
    assert table.shape == (100_000, 16)
    assert torch.isfinite(table).all()
    last = torch.tensor([hand_sinusoid(99_999, c, 16) for c in range(16)])
    # fp32 angles lose ~1e-3 absolute at position 1e5 (angle ~1e5 rad times fp32 epsilon).
    torch.testing.assert_close(table[-1], last, atol=3e-3, rtol=0)


def test_sinusoidal_odd_dim_raises():
    with pytest.raises(ValueError, match="dim=7"):
        sinusoidal_table(torch.arange(3), 7)
    with pytest.raises(ValueError, match="dim=5"):
        SinusoidalPositionalEncoding(5)


def test_sinusoidal_module_adds_table_at_offset():
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0))
    encoded = SinusoidalPositionalEncoding(8)(x, offset=10)
    torch.testing.assert_close(encoded, x + sinusoidal_table(torch.arange(10, 14), 8))


def rotate_constant(rotary: RotaryEmbedding, vector: torch.Tensor, length: int, offset: int) -> torch.Tensor:
    """The same head vector at positions offset .. offset+length-1, rotated: [length, Dh]."""
    seq = vector.expand(1, 1, length, vector.shape[-1]).contiguous()
    rotated, _ = rotary(seq, seq, offset)
    return rotated[0, 0]


def test_rotary_scores_depend_only_on_relative_position():
    gen = torch.Generator().manual_seed(0)
    head_dim, length = 16, 40
    rotary = RotaryEmbedding(head_dim)
    q, k = torch.randn(head_dim, generator=gen), torch.randn(head_dim, generator=gen)
    scores = rotate_constant(rotary, q, length, 0) @ rotate_constant(rotary, k, length, 0).T  # [m, n]
    scale = q.norm() * k.norm()
    # Shift both positions by s: same score.
    for shift in (1, 5, 17):
        torch.testing.assert_close(scores[shift:, shift:], scores[:-shift, :-shift], atol=1e-5 * scale.item(), rtol=0)
    # And the unrotated dot product at m == n.
    torch.testing.assert_close(scores.diagonal(), torch.full((length,), (q @ k).item()), atol=1e-5 * scale, rtol=0)


def test_rotary_relative_property_holds_at_long_positions():
    gen = torch.Generator().manual_seed(1)
    head_dim = 16
    rotary = RotaryEmbedding(head_dim)
    q, k = torch.randn(head_dim, generator=gen), torch.randn(head_dim, generator=gen)
    near = rotate_constant(rotary, q, 8, 0) @ rotate_constant(rotary, k, 8, 0).T
    far = rotate_constant(rotary, q, 8, 100_000) @ rotate_constant(rotary, k, 8, 100_000).T
    # fp32 angles at position 1e5 carry ~1e-2 rad error, hence the looser tolerance.
    torch.testing.assert_close(far, near, atol=2e-3 * (q.norm() * k.norm()).item(), rtol=0)


def test_rotary_matches_hand_rotation_and_keeps_norm():
    gen = torch.Generator().manual_seed(2)
    head_dim, base = 8, 10000.0
    rotary = RotaryEmbedding(head_dim, base)
    x = torch.randn(1, 1, 6, head_dim, generator=gen)
    rotated, _ = rotary(x, x, 3)
    half = head_dim // 2
    for t in range(6):
        position = 3 + t
        for i in range(half):
            # Half-split layout: channel i pairs with channel i + Dh/2.
            angle = position * base ** (-2 * i / head_dim)
            first, second = x[0, 0, t, i].item(), x[0, 0, t, i + half].item()
            assert rotated[0, 0, t, i].item() == pytest.approx(
                first * math.cos(angle) - second * math.sin(angle), abs=1e-5
            )
            assert rotated[0, 0, t, i + half].item() == pytest.approx(
                second * math.cos(angle) + first * math.sin(angle), abs=1e-5
            )
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))


def test_rotary_offset_equals_slice_of_longer_sequence_and_table_grows():
    gen = torch.Generator().manual_seed(3)
    rotary = RotaryEmbedding(8)
    q = torch.randn(2, 3, 600, 8, generator=gen)
    k = torch.randn(2, 3, 600, 8, generator=gen)
    # Start with a short call so the cached table must grow past its 256-entry start.
    rotary(q[:, :, :4], k[:, :, :4])
    q_full, k_full = rotary(q, k)
    q_tail, k_tail = rotary(q[:, :, 450:], k[:, :, 450:], offset=450)
    torch.testing.assert_close(q_tail, q_full[:, :, 450:])
    torch.testing.assert_close(k_tail, k_full[:, :, 450:])
    q_fresh, _ = RotaryEmbedding(8)(q, k)
    torch.testing.assert_close(q_full, q_fresh)
    # Position 0 is the identity.
    torch.testing.assert_close(q_full[:, :, 0], q[:, :, 0])


def test_rotary_odd_head_dim_raises():
    with pytest.raises(ValueError, match="head_dim=5"):
        RotaryEmbedding(5)
