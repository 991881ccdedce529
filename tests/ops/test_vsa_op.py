"""Binding ops against their definitions and the HRR identities."""

from __future__ import annotations

import math

import pytest
import torch

from hierseq.ops import vsa


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dim", [1, 2, 7, 16, 33])
def test_fft_circular_ops_match_definitions(dim: int) -> None:
    a = torch.randn(3, dim, generator=_gen(1), dtype=torch.float64)
    b = torch.randn(3, dim, generator=_gen(2), dtype=torch.float64)
    torch.testing.assert_close(vsa.circular_convolution(a, b), vsa.circular_convolution_reference(a, b))
    torch.testing.assert_close(vsa.circular_correlation(a, b), vsa.circular_correlation_reference(a, b))


@pytest.mark.parametrize("dim", [1, 2, 7, 16])
def test_fft_circular_ops_gradients_match_definitions(dim: int) -> None:
    a = torch.randn(3, dim, generator=_gen(12), dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dim, generator=_gen(13), dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, dim, generator=_gen(14), dtype=torch.float64)
    for fast, ref in (
        (vsa.circular_convolution, vsa.circular_convolution_reference),
        (vsa.circular_correlation, vsa.circular_correlation_reference),
    ):
        grads = torch.autograd.grad((fast(a, b) * weights).sum(), (a, b))
        grads_ref = torch.autograd.grad((ref(a, b) * weights).sum(), (a, b))
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


def test_circular_convolution_by_hand() -> None:
    # (a ⊛ b)_i = sum_j a_j b_{i-j}: with a = e_1 (a shift by one) the result is b rotated right by one.
    a = torch.tensor([0.0, 1.0, 0.0, 0.0])
    b = torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(vsa.circular_convolution(a, b), torch.tensor([4.0, 1.0, 2.0, 3.0]))
    # correlation with the same shift undoes it.
    torch.testing.assert_close(vsa.circular_correlation(a, torch.tensor([4.0, 1.0, 2.0, 3.0])), b)


@pytest.mark.parametrize("binding", vsa.BINDINGS)
def test_bind_unbind_match_references(binding: str) -> None:
    k = torch.randn(2, 5, 12, generator=_gen(3), dtype=torch.float64)
    v = torch.randn(2, 5, 12, generator=_gen(4), dtype=torch.float64)
    torch.testing.assert_close(vsa.bind(k, v, binding), vsa.bind_reference(k, v, binding))
    torch.testing.assert_close(vsa.unbind(v, k, binding), vsa.unbind_reference(v, k, binding))


@pytest.mark.parametrize("binding", vsa.BINDINGS)
def test_bind_unbind_gradients_match_references(binding: str) -> None:
    k = torch.randn(2, 5, 12, generator=_gen(15), dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 5, 12, generator=_gen(16), dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 5, 12, generator=_gen(17), dtype=torch.float64)
    for fast, ref in ((vsa.bind, vsa.bind_reference), (vsa.unbind, vsa.unbind_reference)):
        grads = torch.autograd.grad((fast(k, v, binding) * weights).sum(), (k, v))
        grads_ref = torch.autograd.grad((ref(k, v, binding) * weights).sum(), (k, v))
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("binding", vsa.BINDINGS)
@pytest.mark.parametrize("key_type", ["bipolar", "unitary"])
def test_unbind_inverts_bind_for_unitary_keys(binding: str, key_type: str) -> None:
    x = torch.randn(4, 64, generator=_gen(5), dtype=torch.float64)
    x = x + 0.1 * x.sign()  # the smooth elementwise "unitary" map is exact only away from 0
    v = torch.randn(4, 64, generator=_gen(6), dtype=torch.float64)
    k = vsa.make_key(x, key_type, binding)
    recovered = vsa.unbind(vsa.bind(k, v, binding), k, binding)
    if key_type == "bipolar" and binding == "circular":
        # A sign vector's spectrum is not flat: recovery is approximate, well correlated.
        cos = torch.nn.functional.cosine_similarity(recovered, v, dim=-1)
        assert (cos > 0.6).all(), cos
    else:
        torch.testing.assert_close(recovered, v, atol=1e-4, rtol=1e-4)


def test_key_norms_and_spectra() -> None:
    x = torch.randn(3, 32, generator=_gen(7), dtype=torch.float64)
    bip = vsa.make_key(x, "bipolar", "elementwise")
    assert set(bip.unique().tolist()) <= {-1.0, 1.0}
    torch.testing.assert_close(bip.abs(), torch.ones_like(bip))
    uni_f = vsa.make_key(x, "unitary", "circular")
    torch.testing.assert_close(torch.fft.rfft(uni_f).abs(), torch.ones(3, 17, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(uni_f.norm(dim=-1), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(vsa.make_key(x, "l2", "circular").norm(dim=-1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(
        vsa.make_key(x, "l2", "elementwise").norm(dim=-1), torch.full((3,), math.sqrt(32), dtype=torch.float64)
    )


def test_bipolar_straight_through_gradient() -> None:
    x = torch.tensor([-2.0, -0.1, 0.0, 0.3], requires_grad=True)
    y = vsa.bipolar(x)
    assert y.tolist() == [-1.0, -1.0, 1.0, 1.0]
    y.sum().backward()
    torch.testing.assert_close(x.grad, 1 - torch.tanh(x.detach()) ** 2)


def test_bipolar_matches_its_detach_trick_reference() -> None:
    x = torch.randn(4, 64, generator=_gen(21), dtype=torch.float64)
    x[0, :3] = 0.0  # sign(0) is +1 in both
    weights = torch.randn(4, 64, generator=_gen(22), dtype=torch.float64)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    fast, ref = vsa.bipolar(a), vsa.bipolar_reference(b)
    assert fast.dtype == x.dtype and torch.equal(fast, ref.detach().round())
    (fast * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_unbinding_is_linear_in_memory() -> None:
    q = torch.randn(16, generator=_gen(8))
    m1, m2 = torch.randn(2, 16, generator=_gen(9))
    for binding in vsa.BINDINGS:
        torch.testing.assert_close(
            vsa.unbind(2 * m1 + m2, q, binding), 2 * vsa.unbind(m1, q, binding) + vsa.unbind(m2, q, binding)
        )


def test_superposition_capacity_grows_with_dimension() -> None:
    # 16 pairs in one vector: crowded at D=64, easy at D=1024 (about D/64 pairs per dimension budget).
    small = vsa.superposition_recall(64, 16, trials=8)
    large = vsa.superposition_recall(1024, 16, trials=8)
    assert small < 0.9 < 0.99 <= large, (small, large)
    # and for a fixed D, more pairs means worse recall.
    assert vsa.superposition_recall(256, 4, trials=8) > vsa.superposition_recall(256, 64, trials=8)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="binding='fourier'"):
        vsa.bind(torch.ones(4), torch.ones(4), "fourier")
    with pytest.raises(ValueError, match="key_type='gauss'"):
        vsa.make_key(torch.ones(4), "gauss")
    with pytest.raises(ValueError, match="last dims must be equal"):
        vsa.unbind(torch.ones(4), torch.ones(5), "circular")


def test_matches_torchhd_if_installed() -> None:
    torchhd = pytest.importorskip("torchhd")
    a = torch.randn(3, 16, generator=_gen(10))
    b = torch.randn(3, 16, generator=_gen(11))
    hrr_a = torchhd.HRRTensor(a)
    expected = torchhd.bind(hrr_a, torchhd.HRRTensor(b)).as_subclass(torch.Tensor)
    torch.testing.assert_close(vsa.circular_convolution(a, b), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("binding", vsa.BINDINGS)
def test_identity_key_binds_as_the_identity_and_blend_interpolates(binding):
    torch.manual_seed(7)
    value = torch.randn(3, 16)
    identity = vsa.identity_key(16, binding)
    torch.testing.assert_close(vsa.bind(identity, value, binding), value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vsa.unbind(value, identity, binding), value, rtol=1e-5, atol=1e-6)
    key = vsa.make_key(torch.randn(3, 16), "bipolar", binding)
    strength = torch.tensor(0.3, requires_grad=True)
    blended = vsa.blend_key(key, strength, binding)
    torch.testing.assert_close(blended, 0.3 * key + 0.7 * identity)
    torch.testing.assert_close(vsa.blend_key(key, torch.tensor(0.0), binding), identity.expand_as(key))
    torch.testing.assert_close(vsa.blend_key(key, torch.tensor(1.0), binding), key)
    (grad,) = torch.autograd.grad(blended.sum(), strength)
    torch.testing.assert_close(grad, (key - identity).sum())
