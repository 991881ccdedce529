"""Banded (sliding-window) attention against dense masked softmax attention, in values and gradients;
its causality; and MAHA's causal up-sampling index maps."""

from __future__ import annotations

import pytest
import torch

from hierseq.ops.banded_attention import banded_attention, causal_source_index, upsample_causal


def dense_window_reference(q, k, v, window: int, n_prefix: int, causal: bool) -> torch.Tensor:
    """Plain masked softmax attention over all keys; query i sits at key position n_prefix + i."""
    M, N = q.shape[2], k.shape[2]
    qpos = torch.arange(n_prefix, n_prefix + M).unsqueeze(1)
    kpos = torch.arange(N).unsqueeze(0)
    offset = kpos - qpos
    allowed = ((offset <= 0) & (offset > -window)) if causal else offset.abs() < window
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


CASES = [
    (37, 8, 0, True),
    (8, 8, 0, True),
    (5, 16, 0, True),
    (29, 8, 7, True),
    (1, 8, 5, True),
    (37, 8, 0, False),
    (3, 8, 0, False),
    (16, 4, 3, True),
]


def qkv(length: int, window: int, n_prefix: int, batch: int = 2):
    gen = torch.Generator().manual_seed(length + window)
    q = torch.randn(batch, 3, length, 4, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, 3, n_prefix + length, 4, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, 3, n_prefix + length, 4, generator=gen, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize(("length", "window", "n_prefix", "causal"), CASES)
def test_banded_attention_matches_dense_masked_reference(length: int, window: int, n_prefix: int, causal: bool) -> None:
    q, k, v = qkv(length, window, n_prefix)
    got = banded_attention(q, k, v, window, n_prefix, causal)
    torch.testing.assert_close(got, dense_window_reference(q, k, v, window, n_prefix, causal), atol=1e-12, rtol=0)


@pytest.mark.parametrize(("length", "window", "n_prefix", "causal"), CASES)
@pytest.mark.parametrize("batch", [1, 2])
def test_banded_attention_gradients_match_dense_masked_reference(
    length: int, window: int, n_prefix: int, causal: bool, batch: int
) -> None:
    q, k, v = (t.requires_grad_(True) for t in qkv(length, window, n_prefix, batch))
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    got = torch.autograd.grad((banded_attention(q, k, v, window, n_prefix, causal) * upstream).sum(), (q, k, v))
    ref = torch.autograd.grad((dense_window_reference(q, k, v, window, n_prefix, causal) * upstream).sum(), (q, k, v))
    for g, g_ref in zip(got, ref):
        torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=0)


def test_banded_attention_alone_is_causal() -> None:
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 40, 4, generator=gen) for _ in range(3))
    base = banded_attention(q, k, v, window=8)
    for j in (0, 7, 8, 20, 39):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, j] += 1.0
        v2[:, :, j] += 1.0
        changed = (banded_attention(q, k2, v2, window=8) - base).abs().amax(dim=(0, 1, 3)) > 0
        # Key j is seen by queries j .. j + 7 exactly: never earlier, and not beyond the window.
        assert changed.nonzero().flatten().tolist() == list(range(j, min(j + 8, 40)))


def test_banded_attention_rejects_a_prefix_it_cannot_place() -> None:
    q, k, v = qkv(5, 4, 4)
    with pytest.raises(ValueError, match="n_prefix=4: must be < window=4"):
        banded_attention(q, k, v, 4, 4)
    q, k, v = qkv(5, 4, 1)
    with pytest.raises(ValueError, match="n_prefix=1"):
        banded_attention(q, k, v, 4, 1, causal=False)


def test_causal_upsampling_alone_reads_only_finished_windows() -> None:
    positions = torch.arange(0, 50)
    for stride in (1, 2, 4, 8):
        source = causal_source_index(positions, stride)
        ended = (source + 1) * stride - 1  # last base position covered by the token read
        read = source >= 0
        assert (ended[read] <= positions[read]).all(), "a position read a coarse token covering its future"
        # ... and it is the newest finished one: the next token's window has not ended yet.
        assert ((source + 2) * stride - 1 > positions).all()
        # The seed's nearest upsampling (t // R) would read unfinished windows whenever R > 1.
        if stride > 1:
            assert (((positions // stride) + 1) * stride - 1 > positions).any()
    # Values: row 0 of the table is "before the first token"; coarse token j sits in row j + 1.
    table = torch.arange(6.0).view(1, 6, 1)  # tokens 0..4 in rows 1..5
    got = upsample_causal(table, torch.arange(0, 11), stride=2, first=0)[0, :, 0]
    assert got.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    # Continuing a cache: 3 tokens already made (row 0 = token 2), positions 6..9 read tokens 2, 3, 3, 4.
    got = upsample_causal(table[:, 3:], torch.arange(6, 10), stride=2, first=3)[0, :, 0]
    assert got.tolist() == [3, 4, 4, 5]
