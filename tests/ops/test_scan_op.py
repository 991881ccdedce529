"""Linear recurrence h_t = a_t * h_{t-1} + b_t: fast paths against the loop definition, values and gradients."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hierseq.ops.scan import linear_scan, linear_scan_chunked, linear_scan_reference, linear_scan_step

REL_TOL = 1e-5


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = REL_TOL) -> None:
    """Max-abs error relative to the largest |expected| (elementwise rtol fails near exact zeros)."""
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    scale = expected.abs().max().clamp_min(1e-30)
    error = (actual - expected).abs().max()
    assert error <= rel * scale, f"max error {error.item():.3e} > {rel:.0e} * {scale.item():.3e}"


def make_inputs(length: int, regime: str, dims=(3, 4), batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, length, *dims)
    u = torch.rand(shape, generator=gen)
    if regime == "uniform":
        a = 1.0 - u  # (0, 1]
    elif regime == "near_zero":
        a = 1e-3 * u
    elif regime == "near_one":
        a = 1.0 - 1e-3 * u
    else:
        raise AssertionError(regime)
    b = torch.randn(shape, generator=gen)
    h0 = torch.randn((batch, *dims), generator=gen)
    return a, b, h0


def grads(fn, a, b, h0, upstream):
    a = a.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    h0 = h0.clone().requires_grad_(True) if h0 is not None else None
    h = fn(a, b, h0)
    inputs = [a, b] + ([h0] if h0 is not None else [])
    return h.detach(), torch.autograd.grad(h, inputs, grad_outputs=upstream)


@pytest.mark.parametrize("length", [1, 7, 100, 257])
@pytest.mark.parametrize("regime", ["uniform", "near_zero", "near_one"])
@pytest.mark.parametrize("with_h0", [False, True])
def test_chunked_matches_reference_forward_and_backward(length, regime, with_h0):
    a, b, h0 = make_inputs(length, regime)
    h0 = h0 if with_h0 else None
    upstream = torch.randn(b.shape, generator=torch.Generator().manual_seed(1))
    h_ref, grads_ref = grads(linear_scan_reference, a, b, h0, upstream)
    for chunk_size in (1, 16, 64):
        h_fast, grads_fast = grads(partial(linear_scan_chunked, chunk_size=chunk_size), a, b, h0, upstream)
        assert_rel_close(h_fast, h_ref)
        for g_fast, g_ref in zip(grads_fast, grads_ref, strict=True):
            assert_rel_close(g_fast, g_ref)


def test_dispatch_matches_reference_forward_and_backward():
    a, b, h0 = make_inputs(300, "uniform", dims=(5,))
    upstream = torch.randn(b.shape, generator=torch.Generator().manual_seed(2))
    h_ref, grads_ref = grads(linear_scan_reference, a, b, h0, upstream)
    h_fast, grads_fast = grads(linear_scan, a, b, h0, upstream)
    assert_rel_close(h_fast, h_ref)
    for g_fast, g_ref in zip(grads_fast, grads_ref, strict=True):
        assert_rel_close(g_fast, g_ref)


def test_reference_matches_hand_values():
    # h0 = 1; h1 = 0.5 * 1 + 2 = 2.5; h2 = 0.1 * 2.5 + (-1) = -0.75
    a = torch.tensor([[0.5, 0.1]])
    b = torch.tensor([[2.0, -1.0]])
    h0 = torch.tensor([1.0])
    expected = torch.tensor([[2.5, -0.75]])
    torch.testing.assert_close(linear_scan_reference(a, b, h0), expected)
    torch.testing.assert_close(linear_scan_chunked(a, b, h0, chunk_size=1), expected)


def test_a_equal_one_is_cumsum_and_a_equal_zero_is_b():
    gen = torch.Generator().manual_seed(3)
    b = torch.randn(2, 50, 3, generator=gen)
    h0 = torch.randn(2, 3, generator=gen)
    ones = torch.ones_like(b)
    assert_rel_close(linear_scan_chunked(ones, b, h0, chunk_size=8), h0.unsqueeze(1) + b.cumsum(1))
    zeros = torch.zeros_like(b)
    torch.testing.assert_close(linear_scan_chunked(zeros, b, h0, chunk_size=8), b, rtol=0, atol=0)


def test_long_decay_stays_finite_where_cumprod_formula_fails():
    # prod(0.5 ** 2000) underflows to 0 in fp32, so the closed form A * cumsum(b / A) gives inf / nan.
    length = 2000
    a = torch.full((1, length, 2), 0.5)
    b = torch.ones(1, length, 2)
    running_product = a.cumprod(1)
    naive = running_product * (b / running_product).cumsum(1)
    assert not torch.isfinite(naive).all()
    h = linear_scan(a, b)
    # Fixed point of h = 0.5 h + 1 is 2, reached long before the end.
    torch.testing.assert_close(h[:, -100:], torch.full((1, 100, 2), 2.0))
    assert_rel_close(h, linear_scan_reference(a, b))


def test_step_loop_matches_full_scan():
    a, b, h0 = make_inputs(40, "uniform", dims=(6,))
    full = linear_scan(a, b, h0)
    h = h0
    for t in range(a.shape[1]):
        h = linear_scan_step(a[:, t], b[:, t], h)
        assert_rel_close(h, full[:, t])
    # The zero state may be passed as None.
    torch.testing.assert_close(linear_scan_step(a[:, 0], b[:, 0], None), b[:, 0])


def test_continuing_from_final_state_matches_one_scan():
    a, b, h0 = make_inputs(90, "uniform", dims=(4,))
    full = linear_scan(a, b, h0)
    first = linear_scan(a[:, :37], b[:, :37], h0)
    second = linear_scan(a[:, 37:], b[:, 37:], first[:, -1])
    assert_rel_close(torch.cat((first, second), dim=1), full)


def test_no_feature_dims_and_two_feature_dims():
    gen = torch.Generator().manual_seed(4)
    for shape in ((3, 33), (2, 33, 4, 5)):
        a = torch.rand(shape, generator=gen)
        b = torch.randn(shape, generator=gen)
        assert_rel_close(linear_scan_chunked(a, b, chunk_size=8), linear_scan_reference(a, b))


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(5)
    a = torch.rand(2, 11, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
    b = torch.randn(2, 11, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
    h0 = torch.randn(2, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, h0: linear_scan_chunked(a, b, h0, chunk_size=4), (a, b, h0))


def test_bad_arguments_raise_value_error():
    a = torch.rand(2, 5, 3)
    with pytest.raises(ValueError, match="must be equal"):
        linear_scan_chunked(a, torch.rand(2, 5, 4))
    with pytest.raises(ValueError, match="h0 shape"):
        linear_scan_chunked(a, a, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="at least 2 dims"):
        linear_scan_reference(torch.rand(5), torch.rand(5))
    with pytest.raises(ValueError, match="chunk_size=0"):
        linear_scan_chunked(a, a, chunk_size=0)
    with pytest.raises(ValueError, match="h shape"):
        linear_scan_step(a[:, 0], a[:, 0], torch.zeros(2, 4))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 80),
    dims=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    chunk_size=st.integers(1, 20),
    with_h0=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_any_shape_matches_reference(batch, length, dims, chunk_size, with_h0, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, length, *dims)
    a = torch.rand(shape, generator=gen)
    b = torch.randn(shape, generator=gen)
    h0 = torch.randn((batch, *dims), generator=gen) if with_h0 else None
    h = linear_scan_chunked(a, b, h0, chunk_size=chunk_size)
    assert h.shape == shape
    assert_rel_close(h, linear_scan_reference(a, b, h0))
