"""Sparsemax (simplex projection): exactness against references, KKT conditions (always), a cvxpy solve
(when the test-only extra is installed) and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hierseq.ops.simplex import (
    simplex_kkt_residual,
    sparsemax,
    sparsemax_reference,
)


def random_scores(rows: int, size: int, seed: int, spread: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, size, generator=gen, dtype=torch.float64) * spread


# ------------------------------------------------------------------------------------- sparsemax
@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_sparsemax_matches_plain_reference(size: int) -> None:
    z = random_scores(200, size, seed=size)
    fast = sparsemax(z)
    reference = torch.tensor(np.stack([sparsemax_reference(row) for row in z.numpy()]))
    torch.testing.assert_close(fast, reference, atol=1e-12, rtol=0)


def test_sparsemax_satisfies_kkt_conditions() -> None:
    # Mix of spreads: tiny (dense solutions), large (one-hot), and ties.
    z = torch.cat([random_scores(300, 4, 0, 0.05), random_scores(300, 4, 1, 5.0), torch.ones(3, 4)])
    w = sparsemax(z)
    assert simplex_kkt_residual(w, z).max().item() < 1e-12
    assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones(len(z), dtype=z.dtype))
    # Both dense and sparse solutions occur, so the check is not one-sided.
    support = (w > 0).sum(-1)
    assert support.min().item() == 1 and support.max().item() == 4


def test_kkt_residual_detects_wrong_solutions() -> None:
    z = random_scores(50, 4, seed=3)
    softmax = torch.softmax(z, -1)  # on the simplex but not the projection
    assert simplex_kkt_residual(softmax, z).min().item() > 1e-3


def test_sparsemax_is_the_closest_simplex_point() -> None:
    # Against many random feasible points the projection is never farther from z.
    z = random_scores(64, 4, seed=4)
    w = sparsemax(z)
    torch.manual_seed(5)  # Dirichlet.sample takes no generator
    others = torch.distributions.Dirichlet(torch.ones(4, dtype=z.dtype)).sample((500, 64))
    best = (w - z).pow(2).sum(-1)
    assert ((others - z).pow(2).sum(-1) >= best - 1e-12).all()


def test_sparsemax_matches_cvxpy_solve() -> None:
    cp = pytest.importorskip("cvxpy", reason="cvxpy is a test-only extra (pip install cvxpy); KKT test still runs")
    z = random_scores(10, 4, seed=6)
    w = sparsemax(z)
    for row in range(len(z)):
        x = cp.Variable(4)
        problem = cp.Problem(cp.Minimize(cp.sum_squares(x - z[row].numpy())), [x >= 0, cp.sum(x) == 1])
        problem.solve()
        assert problem.status == cp.OPTIMAL
        np.testing.assert_allclose(w[row].numpy(), x.value, atol=1e-6)


def test_sparsemax_mask_gives_exact_zero_weight_and_gradient() -> None:
    z = random_scores(30, 4, seed=7).requires_grad_()
    mask = torch.ones(30, 4, dtype=torch.bool)
    mask[:, 3] = False
    mask[:10, 1:] = False  # only the first entry allowed: weight exactly one-hot
    w = sparsemax(z, mask)
    assert (w[:, 3] == 0).all() and (w[:10, 1:] == 0).all()
    torch.testing.assert_close(w[:10, 0], torch.ones(10, dtype=z.dtype))
    # Masked projection equals the projection of the allowed entries alone.
    torch.testing.assert_close(w[10:, :3], sparsemax(z[10:, :3]))
    (w * torch.arange(1.0, 5.0, dtype=z.dtype)).sum().backward()
    assert torch.isfinite(z.grad).all()
    assert (z.grad[:, 3] == 0).all() and (z.grad[:10] == 0).all()


def test_sparsemax_rejects_fully_masked_rows() -> None:
    with pytest.raises(ValueError, match="mask"):
        sparsemax(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))


def test_sparsemax_gradient_is_the_projection_jacobian() -> None:
    # On the support the Jacobian is I - 1 1^T / k; off the support it is 0. gradcheck (float64) and an
    # explicit value for one instance with support {0, 1}.
    z = torch.tensor([[1.0, 0.8, -2.0]], dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(sparsemax, (random_scores(6, 4, seed=8).requires_grad_(),))
    jac = torch.autograd.functional.jacobian(sparsemax, z)[0, :, 0, :]
    expected = torch.tensor([[0.5, -0.5, 0.0], [-0.5, 0.5, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(jac, expected)
