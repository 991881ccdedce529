"""The linear-attention op: the chunked fast path against the loop over time in values and gradients,
one recurrent step by hand."""

from __future__ import annotations

import pytest
import torch

from hierseq.ops.linear_attention import linear_attention_chunked, linear_attention_reference, linear_attention_step


def _inputs(length: int = 29, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(2, 3, length, 4, generator=g, dtype=torch.float64) + 0.1  # positive, like elu + 1
    k = torch.rand(2, 3, length, 4, generator=g, dtype=torch.float64) + 0.1
    v = torch.randn(2, 3, length, 5, generator=g, dtype=torch.float64)
    state = torch.rand(2, 3, 4, 6, generator=g, dtype=torch.float64)
    return q, k, v, state


@pytest.mark.parametrize("chunk_size", [1, 8, 29, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_reference(chunk_size: int, with_state: bool) -> None:
    q, k, v, state = _inputs()
    state = state if with_state else None
    out_ref, final_ref = linear_attention_reference(q, k, v, state)
    out, final = linear_attention_chunked(q, k, v, state, chunk_size)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk_size", [1, 8, 29, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_gradients_match_reference(chunk_size: int, with_state: bool) -> None:
    inputs = [t.requires_grad_() for t in _inputs(length=21)]
    if not with_state:
        inputs = inputs[:3]
    weights = torch.randn(2, 3, 21, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out, final = linear_attention_chunked(*inputs, chunk_size=chunk_size)
    grads = torch.autograd.grad((out * weights).sum() + final.square().sum(), inputs)
    out_ref, final_ref = linear_attention_reference(*inputs)
    grads_ref = torch.autograd.grad((out_ref * weights).sum() + final_ref.square().sum(), inputs)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)


def test_step_is_normalised_attention_by_hand() -> None:
    # two tokens, one head: out_2 = (q.k1 v1 + q.k2 v2) / (q.k1 + q.k2)
    q = torch.tensor([[[1.0, 2.0]]])
    k1, k2 = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[0.0, 1.0]]])
    v1, v2 = torch.tensor([[[3.0]]]), torch.tensor([[[6.0]]])
    _, state = linear_attention_step(q, k1, v1, None)
    out, state = linear_attention_step(q, k2, v2, state)
    torch.testing.assert_close(out, torch.tensor([[[(1 * 3 + 2 * 6) / 3.0]]]), rtol=1e-5, atol=1e-5)
    assert state.shape == (1, 1, 2, 2)
    # the state is sum_t k_t [v_t, 1]^T: the values and, in the last column, the normaliser
    torch.testing.assert_close(state, torch.tensor([[[[3.0, 1.0], [6.0, 1.0]]]]))
