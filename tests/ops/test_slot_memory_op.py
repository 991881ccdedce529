"""The slot-memory op (HAMT's memory): the chunked fast path against the loop over time in values and
gradients, the chunk-end states, numerical stability under strong decay, one step by hand, input errors."""

from __future__ import annotations

import pytest
import torch

from hierseq.ops.slot_memory import slot_memory_chunked, slot_memory_reference, slot_memory_step


def _slot_inputs(batch=2, length=37, dim=6, slots=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    bound = torch.randn(batch, length, dim, generator=g, dtype=dtype)
    write = torch.rand(batch, length, slots, generator=g, dtype=dtype)
    log_decay = -3 * torch.rand(batch, length, slots, generator=g, dtype=dtype)
    read = torch.rand(batch, length, slots, generator=g, dtype=dtype)
    state = torch.randn(batch, slots, dim, generator=g, dtype=dtype)
    return bound, write, log_decay, read, state


@pytest.mark.parametrize("chunk_size", [1, 4, 16, 37, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_slot_memory_matches_reference(chunk_size: int, with_state: bool) -> None:
    bound, write, log_decay, read, state = _slot_inputs()
    state = state if with_state else None
    out_ref, final_ref = slot_memory_reference(bound, write, log_decay, read, state)
    out, final = slot_memory_chunked(bound, write, log_decay, read, state, chunk_size=chunk_size)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk_size", [1, 8, 21, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_slot_memory_gradients_match_reference(chunk_size: int, with_state: bool) -> None:
    inputs = [t.requires_grad_() for t in _slot_inputs(length=21)]
    if not with_state:
        inputs = inputs[:4]
    out, final = slot_memory_chunked(*inputs, chunk_size=chunk_size)
    grads = torch.autograd.grad((out.square().sum() + final.sum()), inputs)
    out_ref, final_ref = slot_memory_reference(*inputs)
    grads_ref = torch.autograd.grad((out_ref.square().sum() + final_ref.sum()), inputs)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_states_are_the_states_at_every_chunk_end(with_state: bool) -> None:
    # HAMT's retention loss reads these: entry c is the state after min((c + 1) * chunk, L) tokens.
    bound, write, log_decay, read, state = _slot_inputs(length=37)
    state = state if with_state else None
    out, final, chunk_states = slot_memory_chunked(
        bound, write, log_decay, read, state, chunk_size=8, return_chunk_states=True
    )
    assert chunk_states.shape == (2, 5, 3, 6)
    out_plain, final_plain = slot_memory_chunked(bound, write, log_decay, read, state, chunk_size=8)
    torch.testing.assert_close(out, out_plain, rtol=0, atol=0)
    torch.testing.assert_close(final, final_plain, rtol=0, atol=0)
    torch.testing.assert_close(chunk_states[:, -1], final, rtol=0, atol=0)
    for c, end in enumerate((8, 16, 24, 32, 37)):
        _, expected = slot_memory_reference(bound[:, :end], write[:, :end], log_decay[:, :end], read[:, :end], state)
        torch.testing.assert_close(chunk_states[:, c], expected, rtol=1e-10, atol=1e-10)


def test_slot_memory_stable_under_strong_decay_and_long_chunks() -> None:
    # log-decay -30 per token: a cumulative-product formulation would divide by exp(-30 * 64) = 0.
    bound, write, _, read, state = _slot_inputs(length=128, dtype=torch.float32)
    log_decay = torch.full_like(write, -30.0)
    out, final = slot_memory_chunked(bound, write, log_decay, read, state, chunk_size=64)
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    # with total forgetting, the read at t is read_t . write_t * bound_t (only the current token)
    expected = (read * write).sum(-1, keepdim=True) * bound
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_slot_memory_gradients_finite_under_strong_decay() -> None:
    # The masked (j > t) entries of the mixing matrix have positive exponents: exp must not reach them,
    # or their inf * 0 would turn the gradients into NaN.
    inputs = [t.requires_grad_() for t in _slot_inputs(length=64, dtype=torch.float32)]
    with torch.no_grad():
        inputs[2].fill_(-30.0)
    out, final = slot_memory_chunked(*inputs, chunk_size=64)
    grads = torch.autograd.grad(out.square().sum() + final.sum(), inputs)
    assert all(torch.isfinite(g).all() for g in grads)


def test_slot_memory_step_by_hand() -> None:
    bound_t = torch.tensor([[1.0, 2.0]])
    write_t = torch.tensor([[1.0, 0.5]])
    log_decay_t = torch.log(torch.tensor([[0.5, 1.0]]))
    read_t = torch.tensor([[1.0, 2.0]])
    state = torch.tensor([[[2.0, 2.0], [4.0, 0.0]]])
    out_t, new_state = slot_memory_step(bound_t, write_t, log_decay_t, read_t, state)
    # slot 0: 0.5 * [2, 2] + 1 * [1, 2] = [2, 3]; slot 1: 1 * [4, 0] + 0.5 * [1, 2] = [4.5, 1]
    torch.testing.assert_close(new_state, torch.tensor([[[2.0, 3.0], [4.5, 1.0]]]))
    torch.testing.assert_close(out_t, torch.tensor([[2.0 + 9.0, 3.0 + 2.0]]))
    # from an empty memory, the state is the write alone (whatever the decay)
    out_0, state_0 = slot_memory_step(bound_t, write_t, log_decay_t, read_t, None)
    torch.testing.assert_close(state_0, torch.tensor([[[1.0, 2.0], [0.5, 1.0]]]))
    torch.testing.assert_close(out_0, torch.tensor([[1.0 + 1.0, 2.0 + 2.0]]))


def test_bad_arguments() -> None:
    bound, write, log_decay, read, state = _slot_inputs(length=5)
    with pytest.raises(ValueError, match="chunk_size=0"):
        slot_memory_chunked(bound, write, log_decay, read, state, chunk_size=0)
    with pytest.raises(ValueError, match="bound shape"):
        slot_memory_reference(bound[0], write, log_decay, read, state)
    with pytest.raises(ValueError, match="read shape"):
        slot_memory_chunked(bound, write, log_decay, read[:, :4], state)
    with pytest.raises(ValueError, match="state shape"):
        slot_memory_chunked(bound, write, log_decay, read, state[:, :2])
