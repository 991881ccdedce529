"""The gated delta rule op: the recurrence by hand for two tokens, and the chunked WY/UT path (with its
hand-written backward) and the recurrent step against the loop over time, in values, final states and
gradients of every input (float64 tight, float32 at 1e-5), with and without an initial state, at lengths
around the chunk size, and under decays strong enough to underflow."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hierseq.ops import delta_rule
from hierseq.ops.delta_rule import gated_delta_rule_chunked, gated_delta_rule_reference, gated_delta_rule_step

TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-10}, torch.float32: {"rtol": 1e-5, "atol": 1e-5}}
CHUNK = 8


def _inputs(length: int, initial: bool, dtype: torch.dtype = torch.float64, decay: float = 0.5, seed: int = 0):
    """q, k unit norm [2, 3, L, 4]; v [2, 3, L, 5]; beta [2, 3, L] in (0, 1); log alpha [2, 3, L] in
    (-decay, 0]; initial state [2, 3, 4, 5] or None. All require grad."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(2, 3, length, 4, generator=g, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(2, 3, length, 4, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(2, 3, length, 5, generator=g, dtype=dtype)
    beta = torch.rand(2, 3, length, generator=g, dtype=dtype)
    log_alpha = -decay * torch.rand(2, 3, length, generator=g, dtype=dtype)
    state = torch.randn(2, 3, 4, 5, generator=g, dtype=dtype) if initial else None
    return [None if t is None else t.requires_grad_() for t in (q, k, v, beta, log_alpha, state)]


def _values_and_grads(fn, inputs: list) -> list[torch.Tensor]:
    out, final = fn(*inputs)
    g = torch.Generator().manual_seed(9)
    weights = (
        torch.randn(out.shape, generator=g, dtype=out.dtype),
        torch.randn(final.shape, generator=g, dtype=out.dtype),
    )
    loss = (out * weights[0]).sum() + (final * weights[1]).sum()
    leaves = [t for t in inputs if t is not None]
    return [out, final, *torch.autograd.grad(loss, leaves)]


def test_two_tokens_by_hand() -> None:
    k0, k1 = torch.tensor([1.0, 0.0]), torch.tensor([0.6, 0.8])
    v0, v1 = torch.tensor([2.0]), torch.tensor([-1.0])
    alpha1, beta0, beta1 = 0.5, 1.0, 0.25
    s0 = beta0 * torch.outer(k0, v0)  # an empty memory takes all of v0 under k0
    s1 = alpha1 * s0
    s1 = s1 + beta1 * torch.outer(k1, v1 - s1.T @ k1)  # the write corrects what k1 already reads
    q = torch.tensor([0.0, 1.0])

    def tokens(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        return torch.stack((x0, x1)).view(1, 1, 2, -1)

    beta = torch.tensor([beta0, beta1]).view(1, 1, 2)
    log_alpha = torch.tensor([0.0, alpha1]).log().view(1, 1, 2)
    out, state = gated_delta_rule_reference(tokens(q, q), tokens(k0, k1), tokens(v0, v1), beta, log_alpha)
    torch.testing.assert_close(state[0, 0], s1)
    torch.testing.assert_close(out[0, 0, 1], s1.T @ q)
    torch.testing.assert_close(out[0, 0, 0], s0.T @ q)


@pytest.mark.parametrize("length", [1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 3])
@pytest.mark.parametrize("initial", [False, True], ids=["no-state", "state"])
def test_chunked_equals_reference(length: int, initial: bool) -> None:
    inputs = _inputs(length, initial)
    fast = _values_and_grads(lambda *a: gated_delta_rule_chunked(*a, chunk_size=CHUNK), inputs)
    slow = _values_and_grads(gated_delta_rule_reference, inputs)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_chunked_equals_reference_in_float32_with_strong_decay() -> None:
    # log alpha down to -12 per token: Gamma over a chunk underflows fp32 and must give zeros, not nan.
    inputs = _inputs(4 * CHUNK + 5, True, dtype=torch.float32, decay=12.0)
    fast = _values_and_grads(lambda *a: gated_delta_rule_chunked(*a, chunk_size=CHUNK), inputs)
    slow = _values_and_grads(gated_delta_rule_reference, inputs)
    for a, b in zip(fast, slow, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_chunk_size_does_not_change_the_result() -> None:
    inputs = _inputs(37, True)
    results = [
        _values_and_grads(lambda *a, c=c: gated_delta_rule_chunked(*a, chunk_size=c), inputs) for c in (4, 16, 64)
    ]
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_steps_equal_reference_and_a_wrong_decay_changes_the_output() -> None:
    q, k, v, beta, log_alpha, state = (t.detach() for t in _inputs(12, True))
    outs = []
    for t in range(12):
        o, state = gated_delta_rule_step(q[:, :, t], k[:, :, t], v[:, :, t], beta[:, :, t], log_alpha[:, :, t], state)
        outs.append(o)
    ref, ref_state = gated_delta_rule_reference(q, k, v, beta, log_alpha, _inputs(12, True)[5].detach())
    torch.testing.assert_close(torch.stack(outs, 2), ref)
    torch.testing.assert_close(state, ref_state)
    wrong, _ = gated_delta_rule_chunked(q, k, v, beta, log_alpha * 0.5, None, CHUNK)
    right, _ = gated_delta_rule_chunked(q, k, v, beta, log_alpha, None, CHUNK)
    assert (wrong - right).abs().max() > 1e-3


def test_a_full_write_replaces_the_value_under_a_key() -> None:
    # beta = 1, no decay: writing v twice under the same key stores v once (the delta rule), not 2 v.
    k = F.normalize(torch.randn(1, 1, 1, 4), dim=-1).expand(1, 1, 2, 4)
    v = torch.randn(1, 1, 1, 3).expand(1, 1, 2, 3)
    out, _ = gated_delta_rule_chunked(k, k, v, torch.ones(1, 1, 2), torch.zeros(1, 1, 2), None, CHUNK)
    torch.testing.assert_close(out[0, 0, 1], v[0, 0, 0])


@pytest.mark.parametrize("segment_chunks", [1, 2, 3])
def test_segmented_pieces_equal_one_segment(monkeypatch: pytest.MonkeyPatch, segment_chunks: int) -> None:
    # Long sequences build the in-chunk pieces a few chunks at a time; the split must not show.
    inputs = _inputs(7 * CHUNK + 3, True)
    whole = _values_and_grads(lambda *a: gated_delta_rule_chunked(*a, chunk_size=CHUNK), inputs)
    monkeypatch.setattr(delta_rule, "SEGMENT_FLOATS", segment_chunks * 2 * 3 * CHUNK * CHUNK)  # B x H x C x C
    assert len(delta_rule._segments(2 * 3, 8, CHUNK)) == -(-8 // segment_chunks)
    split = _values_and_grads(lambda *a: gated_delta_rule_chunked(*a, chunk_size=CHUNK), inputs)
    for a, b in zip(split, whole, strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_normalising_inside_equals_normalising_before_in_values_and_gradients() -> None:
    inputs = _inputs(3 * CHUNK + 2, True)
    g = torch.Generator().manual_seed(4)
    raw_q = (3.0 * torch.randn(inputs[0].shape, generator=g, dtype=torch.float64)).requires_grad_()
    raw_k = (0.2 * torch.randn(inputs[1].shape, generator=g, dtype=torch.float64)).requires_grad_()
    raw = [raw_q, raw_k, *inputs[2:]]

    def inside(q, k, *rest):
        return gated_delta_rule_chunked(q, k, *rest, chunk_size=CHUNK, normalize_qk=True)

    def before(q, k, *rest):
        return gated_delta_rule_reference(F.normalize(q, dim=-1), F.normalize(k, dim=-1), *rest)

    for a, b in zip(_values_and_grads(inside, raw), _values_and_grads(before, raw), strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
