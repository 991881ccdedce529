"""The matrix scan X_c = M_c X_{c-1} + B_c: the pairwise scan against the loop, in values and gradients,
at odd and even lengths, with and without X0; shape errors name the argument."""

from __future__ import annotations

import pytest
import torch

from hierseq.ops.matrix_scan import matrix_scan, matrix_scan_reference


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 64])
@pytest.mark.parametrize("initial", [False, True], ids=["zero", "X0"])
def test_pairwise_scan_equals_the_loop(n: int, initial: bool) -> None:
    g = torch.Generator().manual_seed(n)
    M = (0.4 * torch.randn(2, 3, n, 4, 4, generator=g, dtype=torch.float64)).requires_grad_()
    B = torch.randn(2, 3, n, 4, 5, generator=g, dtype=torch.float64).requires_grad_()
    X0 = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64).requires_grad_() if initial else None
    weights = torch.randn(2, 3, n, 4, 5, generator=g, dtype=torch.float64)
    leaves = [t for t in (M, B, X0) if t is not None]
    fast, slow = matrix_scan(M, B, X0), matrix_scan_reference(M, B, X0)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    # With a zero X0 the first M multiplies nothing: autograd may report no gradient (None) for it.
    grads_fast = torch.autograd.grad((fast * weights).sum(), leaves, allow_unused=True)
    grads_slow = torch.autograd.grad((slow * weights).sum(), leaves)
    for a, b in zip(grads_fast, grads_slow, strict=True):
        torch.testing.assert_close(torch.zeros_like(b) if a is None else a, b, rtol=1e-12, atol=1e-12)


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="M shape"):
        matrix_scan(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="B shape"):
        matrix_scan(torch.zeros(2, 3, 4, 4), torch.zeros(2, 2, 4, 5))
    with pytest.raises(ValueError, match="X0 shape"):
        matrix_scan(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5), torch.zeros(2, 4, 4))
