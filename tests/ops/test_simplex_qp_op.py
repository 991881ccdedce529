"""Exact simplex QP (mixing weights that depend on the candidates): KKT optimality, agreement with a
cvxpy oracle and a projected-gradient reference, the enumeration fallback, implicit gradients, and the
sync-free mode (fixed work, nothing read back from the device) agreeing with the default solver."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hierseq.ops.simplex_qp import (
    SYNC_FREE_EXACT_MAX_SIZE,
    mixture_qp_kkt_residual,
    mixture_qp_reference_cvxpy,
    mixture_qp_reference_pgd,
    mixture_qp_terms,
    mixture_qp_weights,
    simplex_qp,
    simplex_qp_kkt_residual,
    sync_free_default_steps,
)


def problem(rows: int, size: int, dim: int, seed: int, scale: float = 0.3, spread: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    outputs = torch.randn(rows, size, dim, generator=gen, dtype=torch.float64) * scale
    target = torch.randn(rows, dim, generator=gen, dtype=torch.float64) * scale
    scores = torch.randn(rows, size, generator=gen, dtype=torch.float64) * spread
    return outputs, target, scores


def random_mask(rows: int, size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, size, generator=gen) < 0.6
    mask[torch.arange(rows), torch.randint(size, (rows,), generator=gen)] = True  # >= 1 allowed per row
    return mask


@pytest.mark.parametrize("size", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("lam", [1e-4, 0.3, 10.0])
def test_kkt_residual_on_random_batches(size: int, masked: bool, lam: float) -> None:
    outputs, target, scores = problem(500, size, 16, seed=size, scale=1.0)
    mask = random_mask(500, size, seed=size) if masked else None
    w = mixture_qp_weights(outputs, target, scores, lam, mask)
    assert mixture_qp_kkt_residual(w, outputs, target, scores, lam, mask).max().item() <= 1e-6
    assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones(500, dtype=w.dtype), atol=1e-12)
    if mask is not None:
        assert (w[~mask] == 0).all()


def test_degenerate_and_near_tie_cases() -> None:
    outputs, target, scores = problem(300, 4, 8, seed=11)
    lam = 0.2
    # Degenerate complementarity: raise each pinned score by its multiplier, so it sits exactly at
    # zero weight with a zero multiplier. The optimum is unchanged.
    w0 = mixture_qp_weights(outputs, target, scores, lam)
    quadratic, linear = mixture_qp_terms(outputs, target, scores, lam)
    gradient = torch.einsum("nst,nt->ns", quadratic, w0) - linear
    support = w0 > 0
    eta = (gradient * support).sum(-1, keepdim=True) / support.sum(-1, keepdim=True)
    degenerate = scores + torch.where(support, 0.0, gradient - eta)
    assert (~support).any()
    w1 = mixture_qp_weights(outputs, target, degenerate, lam)
    assert mixture_qp_kkt_residual(w1, outputs, target, degenerate, lam).max().item() <= 1e-6
    torch.testing.assert_close(w1, w0, atol=1e-9, rtol=0)
    # Identical candidates with equal (or near-equal) scores: the ridge splits the weight evenly.
    same = outputs[:, :1].expand(300, 4, 8)
    for tie in (torch.zeros(300, 4, dtype=torch.float64), torch.full((300, 4), 0.5) + 1e-12 * torch.randn(300, 4)):
        w = mixture_qp_weights(same, target, tie.double(), lam)
        assert mixture_qp_kkt_residual(w, same, target, tie.double(), lam).max().item() <= 1e-6
        torch.testing.assert_close(w, torch.full_like(w, 0.25), atol=1e-9, rtol=0)
    # Huge score gaps (one-hot), a single allowed entry, tiny ridge.
    big = scores * 1e4
    w = mixture_qp_weights(outputs, target, big, lam)
    assert mixture_qp_kkt_residual(w, outputs, target, big, lam).max().item() <= 1e-6 * 1e4
    assert ((w > 1 - 1e-12).sum(-1) == 1).all() and ((w == 0).sum(-1) == 3).all()
    one = torch.zeros(300, 4, dtype=torch.bool)
    one[:, 2] = True
    assert (mixture_qp_weights(outputs, target, scores, lam, one)[:, 2] == 1).all()
    w = mixture_qp_weights(outputs, target, scores, 1e-9)
    assert mixture_qp_kkt_residual(w, outputs, target, scores, 1e-9).max().item() <= 1e-6


def test_agrees_with_cvxpy_oracle() -> None:
    pytest.importorskip("cvxpy")
    outputs, target, scores = problem(40, 4, 6, seed=3)
    mask = random_mask(40, 4, seed=3)
    mask[:20] = True
    w = mixture_qp_weights(outputs, target, scores, 0.25, mask)
    oracle = mixture_qp_reference_cvxpy(outputs.numpy(), target.numpy(), scores.numpy(), 0.25, mask.numpy())
    np.testing.assert_allclose(w.numpy(), oracle, atol=1e-5, rtol=0)
    assert (w > 0).sum().item() > 40 and (w[mask] == 0).any()  # the batch mixes dense and sparse rows


@pytest.mark.parametrize("size", [2, 5, 8])
def test_agrees_with_projected_gradient_reference(size: int) -> None:
    outputs, target, scores = problem(64, size, 8, seed=20 + size)
    mask = random_mask(64, size, seed=size)
    w = mixture_qp_weights(outputs, target, scores, 0.5, mask)
    reference = mixture_qp_reference_pgd(outputs, target, scores, 0.5, mask)
    torch.testing.assert_close(w, reference, atol=1e-9, rtol=0)


def test_enumeration_fallback_is_exact() -> None:
    outputs, target, scores = problem(200, 5, 8, seed=5)
    mask = random_mask(200, 5, seed=5)
    full = mixture_qp_weights(outputs, target, scores, 0.1, mask)
    for budget in (0, 1, 2):  # too few active-set iterations: (some) rows go to the fallback
        w = mixture_qp_weights(outputs, target, scores, 0.1, mask, max_iter=budget)
        torch.testing.assert_close(w, full, atol=1e-12, rtol=0)


def test_weights_depend_on_the_candidates() -> None:
    # With zero scores the candidate equal to the target takes (almost) all the weight.
    outputs, target, _ = problem(50, 3, 8, seed=7, scale=1.0)
    outputs = outputs.clone()
    outputs[:, 1] = target
    w = mixture_qp_weights(outputs, target, torch.zeros(50, 3, dtype=torch.float64), 1e-3)
    assert (w.argmax(-1) == 1).all() and w[:, 1].min() > 0.9


def test_gradcheck_outputs_target_scores_lambda() -> None:
    outputs, target, scores = problem(6, 4, 3, seed=9)
    lam = torch.tensor(0.4, dtype=torch.float64)
    w = mixture_qp_weights(outputs, target, scores, lam)
    # The check needs a support that small steps do not change: a clear margin on both sides.
    quadratic, linear = mixture_qp_terms(outputs, target, scores, lam)
    gradient = torch.einsum("nst,nt->ns", quadratic, w) - linear
    eta = (gradient * (w > 0)).sum(-1, keepdim=True) / (w > 0).sum(-1, keepdim=True)
    assert w[w > 0].min() > 1e-3 and (gradient - eta)[w == 0].min() > 1e-3 and (w == 0).any()
    inputs = tuple(x.clone().requires_grad_() for x in (outputs, target, scores, lam))
    assert torch.autograd.gradcheck(lambda o, t, s, r: mixture_qp_weights(o, t, s, r), inputs)
    # Gradient of a pinned weight is zero with respect to everything.
    row, col = (w == 0).nonzero()[0].tolist()
    o, t, s, r = inputs
    grads = torch.autograd.grad(mixture_qp_weights(o, t, s, r)[row, col], inputs, allow_unused=True)
    assert all(g is None or g.abs().max().item() == 0 for g in grads)


def test_gradcheck_generic_qp_with_mask() -> None:
    gen = torch.Generator().manual_seed(4)
    factor = torch.randn(5, 4, 4, generator=gen, dtype=torch.float64)
    quadratic = (factor @ factor.transpose(-1, -2) + torch.eye(4)).requires_grad_()
    linear = torch.randn(5, 4, generator=gen, dtype=torch.float64).requires_grad_()
    mask = torch.tensor([[True, True, False, True]]).expand(5, 4)
    assert torch.autograd.gradcheck(lambda q, c: simplex_qp(q, c, mask), (quadratic, linear))


def test_leading_dims_and_broadcasting() -> None:
    outputs, target, scores = problem(2 * 3 * 5, 4, 6, seed=13)
    lam = torch.rand(2, 3, 5, dtype=torch.float64) + 0.1  # a ridge per row
    w = mixture_qp_weights(outputs.view(2, 3, 5, 4, 6), target.view(2, 3, 5, 6), scores.view(2, 3, 5, 4), lam)
    assert w.shape == (2, 3, 5, 4)
    ridges = lam.flatten().tolist()
    flat = torch.cat([mixture_qp_weights(outputs[i : i + 1], target[i], scores[i], ridges[i]) for i in range(30)])
    torch.testing.assert_close(w.reshape(30, 4), flat, atol=1e-12, rtol=0)
    # One target for all rows broadcasts; so does a mask without leading dims.
    mask = torch.tensor([True, False, True, True])
    w = mixture_qp_weights(outputs.view(6, 5, 4, 6), target[0], scores.view(6, 5, 4), 0.3, mask)
    assert w.shape == (6, 5, 4) and (w[..., 1] == 0).all()
    residual = simplex_qp_kkt_residual(
        w, *mixture_qp_terms(outputs.view(6, 5, 4, 6), target[0], scores.view(6, 5, 4), 0.3), mask
    )
    assert residual.max().item() <= 1e-6


def test_float32() -> None:
    outputs, target, scores = problem(2000, 4, 64, seed=17, scale=0.125)
    w64 = mixture_qp_weights(outputs, target, scores, 0.1)
    w32 = mixture_qp_weights(outputs.float(), target.float(), scores.float(), 0.1)
    assert w32.dtype == torch.float32
    assert (w32.double() - w64).abs().max().item() < 1e-4
    assert mixture_qp_kkt_residual(w32, outputs.float(), target.float(), scores.float(), 0.1).max().item() < 1e-4


def test_half_precision_and_empty_batch() -> None:
    outputs, target, scores = problem(100, 4, 8, seed=19)
    w64 = mixture_qp_weights(outputs, target, scores, 0.2)
    w16 = mixture_qp_weights(outputs.bfloat16(), target.bfloat16(), scores.bfloat16(), 0.2)
    assert w16.dtype == torch.bfloat16 and (w16.double() - w64).abs().max().item() < 0.05
    empty = mixture_qp_weights(outputs[:0], target[:0], scores[:0], 0.2)
    assert empty.shape == (0, 4)


def test_invalid_arguments() -> None:
    outputs, target, scores = problem(3, 4, 5, seed=0)
    with pytest.raises(ValueError, match="lam"):
        mixture_qp_weights(outputs, target, scores, 0.0)
    with pytest.raises(ValueError, match="lam"):
        mixture_qp_weights(outputs, target, scores, torch.tensor(-1.0))
    with pytest.raises(ValueError, match="at least one True"):
        mixture_qp_weights(outputs, target, scores, 0.1, torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="need outputs"):
        mixture_qp_weights(outputs, target[:, :2], scores, 0.1)
    with pytest.raises(ValueError, match="quadratic shape"):
        simplex_qp(torch.eye(3), torch.zeros(4))


# ------------------------------------------------------------------------------------ sync-free mode
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("masked", [False, True])
def test_sync_free_mode_matches_the_default_solver(size: int, masked: bool) -> None:
    # Fixed work, nothing read back: for S <= 4 exact by the unconditional face enumeration (any
    # budget), above by the measured 3 S + 2 step budget. Same weights and KKT residual as the default.
    outputs, target, scores = problem(600, size, 16, seed=40 + size, scale=1.0)
    mask = random_mask(600, size, seed=size) if masked else None
    for lam in (1e-3, 0.3, 10.0):
        reference = mixture_qp_weights(outputs, target, scores, lam, mask)
        budgets = [None, 0, 1, size + 1, 3 * size + 2] if size <= SYNC_FREE_EXACT_MAX_SIZE else [None]
        for budget in budgets:
            w = mixture_qp_weights(outputs, target, scores, lam, mask, max_iter=budget, sync_free=True)
            torch.testing.assert_close(w, reference, atol=1e-9, rtol=0)
            assert mixture_qp_kkt_residual(w, outputs, target, scores, lam, mask).max().item() <= 1e-6
            if mask is not None:
                assert (w[~mask] == 0).all()


def test_sync_free_default_budget() -> None:
    assert [sync_free_default_steps(s) for s in (1, 4, 5, 8)] == [0, 0, 17, 26]


def test_sync_free_float32_and_gradients() -> None:
    outputs, target, scores = problem(2000, 4, 64, seed=41, scale=0.125)
    w64 = mixture_qp_weights(outputs, target, scores, 0.1)
    w32 = mixture_qp_weights(outputs.float(), target.float(), scores.float(), 0.1, sync_free=True)
    assert w32.dtype == torch.float32 and (w32.double() - w64).abs().max().item() < 1e-4
    assert mixture_qp_kkt_residual(w32, outputs.float(), target.float(), scores.float(), 0.1).max().item() < 1e-4
    # The backward is the same implicit KKT solve: gradcheck passes in sync-free mode too.
    outputs, target, scores = problem(6, 4, 3, seed=9)
    lam = torch.tensor(0.4, dtype=torch.float64)
    inputs = tuple(x.clone().requires_grad_() for x in (outputs, target, scores, lam))
    assert torch.autograd.gradcheck(lambda o, t, s, r: mixture_qp_weights(o, t, s, r, sync_free=True), inputs)


@pytest.mark.parametrize("size", [3, 6])
def test_sync_free_mode_reads_nothing_back(size: int) -> None:
    # Meta tensors have no values: any .item(), bool(tensor) or data-dependent shape (nonzero) raises.
    # The sync-free forward and backward run on them; the default path does not (it counts live rows).
    outputs = torch.randn(10, size, 8, device="meta", requires_grad=True)
    target, scores = torch.randn(10, 8, device="meta"), torch.randn(10, size, device="meta")
    lam, mask = torch.tensor(0.5, device="meta"), torch.ones(10, size, dtype=torch.bool, device="meta")
    w = mixture_qp_weights(outputs, target, scores, lam, mask, sync_free=True)
    w.sum().backward()
    assert w.shape == (10, size) and outputs.grad.shape == outputs.shape
    with pytest.raises(RuntimeError, match="meta"):
        mixture_qp_weights(outputs, target, scores, lam, mask)
