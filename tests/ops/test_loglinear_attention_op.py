"""The log-linear attention op: the Fenwick levels by hand, the chunked path, the recurrent step and the
multi-token continuation against the O(L^2) masked reference in values and gradients (float64 tight,
float32 at 1e-5 relative), with and without gating, and the level weights doing what they say."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hierseq.ops.loglinear_attention import (
    fenwick_levels,
    loglinear_attention_chunked,
    loglinear_attention_reference,
    loglinear_continue,
    loglinear_state,
)

N_LEVELS = 4  # 2**4 = 16 < most test lengths, so levels past the shared top weight are exercised
TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-10}, torch.float32: {"rtol": 1e-5, "atol": 1e-5}}


def _inputs(length: int, gated: bool, dtype: torch.dtype = torch.float64, seed: int = 0) -> list:
    """q, k (unit norm, as the mixer feeds them) [2, 3, L, 4]; v [2, 3, L, 5]; level weights
    [2, 3, L, N_LEVELS] (positive); log decay [2, 3, L] in (-0.5, 0] or None."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(2, 3, length, 4, generator=g, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(2, 3, length, 4, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(2, 3, length, 5, generator=g, dtype=dtype)
    weights = torch.rand(2, 3, length, N_LEVELS, generator=g, dtype=dtype) + 0.1
    log_decay = -0.5 * torch.rand(2, 3, length, generator=g, dtype=dtype) if gated else None
    return [q, k, v, weights, log_decay]


def _steps(q, k, v, weights, log_decay) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token through loglinear_continue one at a time: (out [B, H, L, dv], final slots)."""
    slots, outs = None, []
    for t in range(q.shape[2]):
        token = [None if x is None else x[:, :, t : t + 1] for x in (q, k, v, weights, log_decay)]
        out_t, slots = loglinear_continue(*token, slots, t)
        outs.append(out_t[:, :, 0])
    return torch.stack(outs, dim=2), slots


def test_fenwick_levels_by_hand() -> None:
    pos = torch.arange(8)
    levels = fenwick_levels(pos, pos)
    # query 5 = 0b101: itself, then {4} at level 1, nothing at level 2 (bit 1 of 5 is 0), {0..3} at level 3
    assert levels[5, :6].tolist() == [3, 3, 3, 3, 1, 0]
    assert levels[7, :8].tolist() == [3, 3, 3, 3, 2, 2, 1, 0]
    # the buckets partition every prefix: level l >= 1 holds 2**(l-1) tokens where bit l-1 of t is set
    pos = torch.arange(200)
    levels = fenwick_levels(pos, pos).masked_fill(pos[:, None] < pos[None, :], -1)
    for t in (1, 6, 77, 128, 199):
        for level in range(1, 9):
            expected = (1 << (level - 1)) if (t >> (level - 1)) & 1 else 0
            assert int((levels[t] == level).sum()) == expected, (t, level)


def test_reference_by_hand_for_three_tokens() -> None:
    """One head, dk = dv = 1, lam = (1, 2, 3) for levels 0, 1, 2, alphas (1, 0.5, 0.25). Query 1 sees token
    0 at level 1; query 2 = 0b10 sees tokens 1 and 0 both at level 2 (bit_length(2 ^ 1) = bit_length(2 ^ 0)
    = 2), each decayed by the alphas after it."""
    q = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 3, 1)
    k = torch.tensor([0.5, 1.0, 2.0]).view(1, 1, 3, 1)
    v = torch.tensor([1.0, 10.0, 100.0]).view(1, 1, 3, 1)
    weights = torch.tensor([[1.0, 2.0, 3.0]] * 3).view(1, 1, 3, 3)
    log_decay = torch.tensor([1.0, 0.5, 0.25]).log().view(1, 1, 3)
    out = loglinear_attention_reference(q, k, v, weights, log_decay)[0, 0, :, 0]
    expected_2 = 1.0 * 3 * 2 * 100 + 3.0 * 3 * (0.25 * 1.0 * 10 + 0.25 * 0.5 * 0.5 * 1)
    expected_1 = 1.0 * 2 * 1 * 10 + 2.0 * 2 * 0.5 * 0.5 * 1
    torch.testing.assert_close(out, torch.tensor([1.0 * 1 * 0.5 * 1, expected_1, expected_2]))


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("length", [1, 5, 8, 9, 31, 64, 100, 257])
@pytest.mark.parametrize("chunk_size", [4, 16, 512])
def test_chunked_equals_reference_in_float64(length: int, chunk_size: int, gated: bool) -> None:
    inputs = _inputs(length, gated)
    out = loglinear_attention_chunked(*inputs, chunk_size=chunk_size)
    torch.testing.assert_close(out, loglinear_attention_reference(*inputs), **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("length", [1, 45, 100])
def test_chunked_gradients_equal_reference(length: int, gated: bool, dtype: torch.dtype) -> None:
    inputs = [t if t is None else t.requires_grad_() for t in _inputs(length, gated, dtype)]
    leaves = [t for t in inputs if t is not None]
    upstream = torch.randn(2, 3, length, 5, generator=torch.Generator().manual_seed(7), dtype=dtype)
    out = loglinear_attention_chunked(*inputs, chunk_size=8)
    ref = loglinear_attention_reference(*inputs)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    grads = torch.autograd.grad((out * upstream).sum(), leaves)
    grads_ref = torch.autograd.grad((ref * upstream).sum(), leaves)
    assert len(grads) == (5 if gated else 4)
    for name, g, g_ref in zip(("q", "k", "v", "level_weights", "log_decay"), grads, grads_ref):
        scale = g_ref.abs().max().item()
        torch.testing.assert_close(g, g_ref, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * scale, msg=name)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("length", [1, 2, 17, 40])
def test_step_by_step_equals_reference_and_the_filled_state(length: int, gated: bool) -> None:
    inputs = _inputs(length, gated)
    out, slots = _steps(*inputs)
    torch.testing.assert_close(out, loglinear_attention_reference(*inputs), **TOL[torch.float64])
    # the counter after L tokens: one slot per bit of L, zeros where the bit is 0
    assert slots.shape == (2, 3, length.bit_length(), 4, 5)
    for m in range(length.bit_length()):
        assert bool(slots[:, :, m].abs().sum() > 0) == bool((length >> m) & 1), m
    k, v, log_decay = inputs[1], inputs[2], inputs[4]
    torch.testing.assert_close(slots, loglinear_state(k, v, log_decay), **TOL[torch.float64])


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_step_gradients_equal_reference(gated: bool) -> None:
    length = 23
    inputs = [t if t is None else t.requires_grad_() for t in _inputs(length, gated, torch.float32)]
    leaves = [t for t in inputs if t is not None]
    upstream = torch.randn(2, 3, length, 5, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((_steps(*inputs)[0] * upstream).sum(), leaves)
    grads_ref = torch.autograd.grad((loglinear_attention_reference(*inputs) * upstream).sum(), leaves)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5 * g_ref.abs().max().item())


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("segments", [(19, 1, 3, 17, 50), (1, 70, 1, 1, 17), (64, 26), (5, 85)])
def test_continue_in_segments_equals_reference(segments: tuple[int, ...], gated: bool) -> None:
    """Prefill (loglinear_state), then spans of any size at any offset: the aligned-block continuation
    gives the reference's outputs and the state of the whole prefix."""
    length = sum(segments)
    inputs = _inputs(length, gated)
    ref = loglinear_attention_reference(*inputs)
    parts = [None if t is None else t[:, :, : segments[0]] for t in inputs]
    pieces = [loglinear_attention_chunked(*parts, chunk_size=8)]
    slots, start = loglinear_state(parts[1], parts[2], parts[4]), segments[0]
    for size in segments[1:]:
        parts = [None if t is None else t[:, :, start : start + size] for t in inputs]
        out, slots = loglinear_continue(*parts, slots, start, chunk_size=8)
        pieces.append(out)
        start += size
    torch.testing.assert_close(torch.cat(pieces, dim=2), ref, **TOL[torch.float64])
    torch.testing.assert_close(slots, loglinear_state(inputs[1], inputs[2], inputs[4]), **TOL[torch.float64])


@pytest.mark.parametrize("level", [0, 1, 2, N_LEVELS - 1])
def test_a_level_weight_changes_exactly_the_outputs_that_read_that_level(level: int) -> None:
    """Scaling lam[level] for every query changes o_t exactly where t has tokens at that level: level 0
    is the token itself (every t), level l in 1..n_levels-2 exists where bit l-1 of t is set, and the
    shared top weight serves every t >= 2**(n_levels - 2) (some token at level >= n_levels - 1)."""
    length = 70
    q, k, v, weights, log_decay = _inputs(length, gated=True)
    changed = weights.clone()
    changed[..., level] *= 3.0
    base = loglinear_attention_chunked(q, k, v, weights, log_decay, chunk_size=8)
    moved = loglinear_attention_chunked(q, k, v, changed, log_decay, chunk_size=8)
    differs = (moved - base).abs().amax(dim=(0, 1, 3)) > 1e-9  # [L]
    t = torch.arange(length)
    if level == 0:
        reads = torch.ones(length, dtype=torch.bool)
    elif level < N_LEVELS - 1:
        reads = (t >> (level - 1)) & 1 == 1
    else:
        reads = t >= 1 << (N_LEVELS - 2)
    assert level == 0 or (reads.any() and not reads.all())  # not vacuous
    assert torch.equal(differs, reads)


def test_strong_decay_stays_finite_and_exact() -> None:
    """Decays near 0 (log alpha down to -30 per token) over 300 tokens: every exponent the chunked path
    takes is a short sum <= 0, so nothing overflows, and it still equals the reference in float64."""
    q, k, v, weights, _ = _inputs(300, gated=False)
    log_decay = -30.0 * torch.rand(2, 3, 300, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    log_decay = log_decay.requires_grad_()
    out = loglinear_attention_chunked(q, k, v, weights, log_decay, chunk_size=16)
    (grad,) = torch.autograd.grad(out.square().sum(), log_decay)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(out, loglinear_attention_reference(q, k, v, weights, log_decay), rtol=1e-9, atol=1e-9)
    float_out = loglinear_attention_chunked(*(t.float() for t in (q, k, v, weights, log_decay)), chunk_size=16)
    assert torch.isfinite(float_out).all()


def test_chunk_size_must_be_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="chunk_size=12: must be a power of two"):
        loglinear_attention_chunked(*_inputs(20, gated=False), chunk_size=12)
