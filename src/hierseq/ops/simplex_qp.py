"""Exact, batched, differentiable quadratic programs over the probability simplex.

The generic problem, one per row of the leading dimensions (a row = a token):

    w* = argmin_{w in simplex, w_i = 0 where mask_i is False}  1/2 w^T Q w - c^T w        (QP)

with Q [..., S, S] symmetric positive definite and S small (the number of candidates, S <= 8 in
practice). :func:`mixture_qp_weights` is the instance that mixes S candidate vectors O_l so that the
mixture approaches a target t while favouring high scores s:

    w* = argmin_{w in simplex} 1/2 ||sum_l w_l O_l - t||^2 + lambda/2 ||w||^2 - s.w
       = (QP) with Q = O O^T + lambda I,  c = O t + s.

Solver (:func:`simplex_qp`): the primal active-set method (Nocedal & Wright, Alg. 16.3) run on every
row at once. Each iteration solves, for all rows still searching, the equality-constrained KKT system
of the current face {w_i = 0 off the free set F, sum(w) = 1} as one batched ``torch.linalg.solve`` of
[n, S + 1, S + 1] bordered systems (pinned coordinates get identity rows), then either accepts the
face minimiser (all free weights >= 0), or steps to the boundary and drops the blocking coordinates,
or, at a face minimiser, frees the pinned coordinate with the most negative multiplier. The objective
strictly decreases between face minimisers, so no face repeats and the method terminates; in practice
within S + 2 iterations. Rows not certified after ``max_iter`` iterations (default 3 S + 2, not seen
in the tests) are solved by enumerating all 2^S - 1 faces in one batched solve, so the answer is
exact either way. Python loops run over iterations only, never over rows.

Sync-free mode (``sync_free=True``, for use inside a model's forward on an accelerator): the default
path reads the device once per iteration (it counts the rows still searching, and stops early) and
validates its inputs on the host. With ``sync_free=True`` nothing is read back: the same iteration runs
on every row for exactly ``max_iter`` steps (finished rows are frozen with ``torch.where``, not dropped),
there is no early exit and no host-side validation (the caller guarantees a True per mask row and a
positive ridge). Exactness:

* S <= ``SYNC_FREE_EXACT_MAX_SIZE`` (4): the enumeration of all 2^S - 1 faces is run on *every* row,
  unconditionally, and replaces each row the fixed budget did not certify. It is exact by
  construction (the optimum is the feasible face minimiser of least objective), so no budget needs to
  be proven; the default budget there is 0 active-set steps: the enumeration (7 bordered solves per
  row at S = 3, 15 at S = 4, in one batched call) costs less than the S + 1 fixed steps the active
  set needs in practice (16k rows, S = 3, CPU: 0.54 s against 1.8 s), and makes them unnecessary.
* 4 < S <= 8: the default budget is 3 S + 2 steps. The active-set method has no proven polynomial
  step bound, so this is a measured budget, not a proof: on 240,000 random rows per size (mixing and
  game instances, scores spread 0.1-3, outputs 0.1-3, ridges 1e-3-1, masks, near-duplicate candidates)
  no row needed more than S + 1 steps. A row the budget does not certify keeps its last iterate, which
  is always feasible (on the simplex, masked entries 0) and has a lower objective than the start.

Gradient: implicit differentiation of the KKT conditions on the final support P = {w_i > 0}. There
Q_PP w_P + eta 1 = c_P and 1^T w_P = 1, so with K the bordered matrix of P and K [a; b] = [dL/dw; 0],
dL/dc = a (zero off P) and dL/dQ = -a w^T. Autograd chains these to O, t, s and lambda.

References: :func:`mixture_qp_reference_cvxpy` (cvxpy/Clarabel, an optional extra, imported lazily)
and :func:`mixture_qp_reference_pgd` (accelerated projected gradient in float64 to convergence).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .simplex import sparsemax

#: largest S for which ``sync_free=True`` is exact by construction (unconditional face enumeration).
SYNC_FREE_EXACT_MAX_SIZE = 4


# ------------------------------------------------------------------------------ batched linear algebra
def _bordered_solve(
    quadratic: torch.Tensor, top: torch.Tensor, free: torch.Tensor, last: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve [[Q_FF, 1_F], [1_F^T, 0]] [x; eta] = [top_F; last] with x = 0 off F, for every row.

    quadratic: [n, S, S]; top: [n, S]; free: bool [n, S] (each row non-empty). Returns x [n, S]
    (exactly 0 off F) and eta [n]. Pinned coordinates get identity rows and columns, so a single
    fixed-size batched solve serves every support pattern at once.
    """
    n, size = top.shape
    f = free.to(quadratic.dtype)
    system = quadratic.new_zeros(n, size + 1, size + 1)
    system[:, :size, :size] = quadratic * f[:, :, None] * f[:, None, :] + torch.diag_embed(1.0 - f)
    system[:, :size, size] = f
    system[:, size, :size] = f
    rhs = torch.cat((top * f, top.new_full((n, 1), last)), dim=1)
    solution = torch.linalg.solve(system, rhs.unsqueeze(-1)).squeeze(-1)
    return solution[:, :size] * f + 0.0, solution[:, size]  # + 0.0 turns -0.0 into 0.0


def _tolerance(quadratic: torch.Tensor, linear: torch.Tensor) -> torch.Tensor:
    """Per-row threshold [n] below which a multiplier counts as zero: a few ulps of the data's size."""
    scale = 1.0 + quadratic.abs().amax(dim=(-2, -1)) + linear.abs().amax(dim=-1)
    return 32.0 * torch.finfo(quadratic.dtype).eps * scale


def _solve_by_enumeration(quadratic: torch.Tensor, linear: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Exact fallback: the face minimiser that satisfies the KKT conditions, over all 2^S - 1 faces.

    quadratic: [r, S, S]; linear, allowed: [r, S] -> w [r, S]. The optimum is the minimiser of its
    own face, and every feasible face minimiser is a feasible point, so the feasible one of least
    objective is the optimum. In float32 two faces can tie in objective to rounding while their
    minimisers differ by ~1e-4 (a weight of 2e-4 changes the objective by ~1e-8), so the face is
    chosen among those that also pass the multiplier test (no pinned coordinate with a negative
    multiplier), which tells them apart; least objective among the feasible ones if none passes.
    All faces of all rows are one batched [r, 2^S - 1, S + 1, S + 1] solve, built by broadcasting.
    """
    r, size = linear.shape
    device = linear.device
    codes = torch.arange(1, 2**size, device=device)
    subsets = ((codes[:, None] >> torch.arange(size, device=device)) & 1).bool()  # [M, S]
    m = subsets.shape[0]
    inside = (subsets[None] & ~allowed[:, None]).any(-1).logical_not()  # [r, M] subset within the allowed set
    free = torch.where(inside[..., None], subsets[None], allowed[:, None])  # invalid -> a harmless face
    f = free.to(linear.dtype)  # [r, M, S]
    system = linear.new_zeros(r, m, size + 1, size + 1)
    system[..., :size, :size] = quadratic[:, None] * (f[..., :, None] * f[..., None, :]) + torch.diag_embed(1.0 - f)
    system[..., :size, size] = f
    system[..., size, :size] = f
    rhs = torch.cat((linear[:, None] * f, linear.new_ones(r, m, 1)), dim=-1)
    x = torch.linalg.solve(system, rhs.unsqueeze(-1)).squeeze(-1)[..., :size] * f + 0.0  # [r, M, S]
    tol = _tolerance(quadratic, linear)[:, None]  # [r, 1]
    feasible = (x >= -tol[..., None]).all(-1) & inside
    x = x.clamp(min=0.0)
    gradient = torch.einsum("rst,rmt->rms", quadratic, x) - linear[:, None]  # Q x - c
    eta = (gradient * f).sum(-1) / f.sum(-1)
    multiplier = torch.where(allowed[:, None] & ~free, gradient - eta[..., None], torch.inf).amin(-1)
    objective = 0.5 * ((gradient - linear[:, None]) * x).sum(-1)  # 1/2 x^T Q x - c^T x
    kkt = feasible & (multiplier >= -tol)
    best = torch.where(
        kkt.any(dim=1),
        torch.where(kkt, objective, torch.inf).argmin(dim=1),
        torch.where(feasible, objective, torch.inf).argmin(dim=1),
    )
    w = x[torch.arange(r, device=device), best]
    return w / w.sum(-1, keepdim=True)


def _active_set(quadratic: torch.Tensor, linear: torch.Tensor, allowed: torch.Tensor, max_iter: int) -> torch.Tensor:
    """Primal active-set method on flattened rows: quadratic [N, S, S], linear/allowed [N, S] -> w [N, S]."""
    n_rows, size = linear.shape
    tol = _tolerance(quadratic, linear)
    free = allowed.clone()
    w = allowed.to(linear.dtype) / allowed.sum(-1, keepdim=True)  # feasible start: uniform on allowed
    at_minimiser = torch.zeros(n_rows, dtype=torch.bool, device=linear.device)
    done = torch.zeros_like(at_minimiser)
    for _ in range(max_iter):
        live = (~done).nonzero().squeeze(1)
        if live.numel() == 0:
            break
        q, c, f, x, a = quadratic[live], linear[live], free[live], w[live], allowed[live]
        # 1) Rows sitting at their face minimiser: optimal if no pinned multiplier is negative.
        gradient = torch.einsum("nst,nt->ns", q, x) - c
        eta = (gradient * f).sum(-1) / f.sum(-1)  # on F every gradient entry equals eta
        multiplier = torch.where(a & ~f, gradient - eta[:, None], torch.inf)
        lowest, enter = multiplier.min(dim=-1)
        finished = at_minimiser[live] & (lowest >= -tol[live])
        grow = at_minimiser[live] & ~finished
        f = f | (torch.nn.functional.one_hot(enter, size).bool() & grow[:, None])
        done[live] = finished
        keep = ~finished
        live, q, c, f, x = live[keep], q[keep], c[keep], f[keep], x[keep]
        if live.numel() == 0:
            break
        # 2) Face minimiser of the (possibly grown) free set; accept it or walk towards it.
        p, _ = _bordered_solve(q, c, f, 1.0)
        negative = f & (p < 0)
        feasible = ~negative.any(-1)
        ratio = torch.where(negative, x / (x - p), torch.inf)  # where each weight would hit 0
        alpha = ratio.amin(dim=-1).clamp(max=1.0)
        walked = (x + alpha[:, None] * (p - x)).clamp(min=0.0)
        blocked = negative & (ratio <= alpha[:, None])  # all coordinates that hit 0 (ties included)
        walked = walked.masked_fill(blocked, 0.0)
        w[live] = torch.where(feasible[:, None], p, walked)
        free[live] = f & ~blocked
        at_minimiser[live] = feasible
    if not bool(done.all()):
        rest = (~done).nonzero().squeeze(1)
        w[rest] = _solve_by_enumeration(quadratic[rest], linear[rest], allowed[rest])
    return w / w.sum(-1, keepdim=True)  # removes the solve's rounding from sum(w) = 1 (one-hot rows become exact)


def _optimal_at_minimiser(
    quadratic: torch.Tensor,
    linear: torch.Tensor,
    allowed: torch.Tensor,
    free: torch.Tensor,
    w: torch.Tensor,
    tol: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """At a face minimiser w of the free set: (optimal [N], entering coordinate [N]). Optimal when no
    allowed pinned coordinate has a negative multiplier g_i - eta (g = Q w - c, eta its value on F)."""
    gradient = torch.einsum("nst,nt->ns", quadratic, w) - linear
    eta = (gradient * free).sum(-1) / free.sum(-1).clamp(min=1)
    multiplier = torch.where(allowed & ~free, gradient - eta[:, None], torch.inf)
    lowest, enter = multiplier.min(dim=-1)
    return lowest >= -tol, enter


def _active_set_fixed(
    quadratic: torch.Tensor, linear: torch.Tensor, allowed: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The iteration of :func:`_active_set` on every row for exactly ``steps`` steps, read nothing back.

    quadratic [N, S, S], linear / allowed [N, S] -> (w [N, S] feasible, certified [N] bool: w is the
    optimum of its row, checked by the multiplier test). Rows that finish are frozen by ``torch.where``
    rather than removed, so the work per step is fixed and no step depends on the data on the host.
    """
    size = linear.shape[-1]
    tol = _tolerance(quadratic, linear)
    free = allowed.clone()
    w = allowed.to(linear.dtype) / allowed.sum(-1, keepdim=True).clamp(min=1)
    at_minimiser = torch.zeros_like(allowed[:, 0])
    done = torch.zeros_like(at_minimiser)
    for _ in range(steps):
        optimal, enter = _optimal_at_minimiser(quadratic, linear, allowed, free, w, tol)
        done = done | (at_minimiser & optimal)
        grow = at_minimiser & ~done
        f = free | (torch.nn.functional.one_hot(enter, size).bool() & grow[:, None])
        p, _ = _bordered_solve(quadratic, linear, f, 1.0)
        negative = f & (p < 0)
        feasible = ~negative.any(-1)
        ratio = torch.where(negative, w / (w - p).clamp(min=torch.finfo(w.dtype).tiny), torch.inf)
        alpha = ratio.amin(dim=-1).clamp(max=1.0)
        walked = (w + alpha[:, None] * (p - w)).clamp(min=0.0)
        blocked = negative & (ratio <= alpha[:, None])
        walked = walked.masked_fill(blocked, 0.0)
        searching = ~done
        w = torch.where(searching[:, None], torch.where(feasible[:, None], p, walked), w)
        free = torch.where(searching[:, None], f & ~blocked, free)
        at_minimiser = torch.where(searching, feasible, at_minimiser)
    optimal, _ = _optimal_at_minimiser(quadratic, linear, allowed, free, w, tol)
    return w, done | (at_minimiser & optimal)


def _solve_sync_free(quadratic: torch.Tensor, linear: torch.Tensor, allowed: torch.Tensor, steps: int) -> torch.Tensor:
    """Sync-free solve (module docstring): ``steps`` active-set steps on every row, then, for S <=
    SYNC_FREE_EXACT_MAX_SIZE, the face enumeration of every row for the rows the budget left uncertified."""
    w, certified = _active_set_fixed(quadratic, linear, allowed, steps)
    if linear.shape[-1] <= SYNC_FREE_EXACT_MAX_SIZE and linear.shape[0]:
        w = torch.where(certified[:, None], w, _solve_by_enumeration(quadratic, linear, allowed))
    return w / w.sum(-1, keepdim=True)


def sync_free_default_steps(size: int) -> int:
    """Default active-set budget of the sync-free mode: 0 where the enumeration makes it exact, else 3 S + 2."""
    return 0 if size <= SYNC_FREE_EXACT_MAX_SIZE else 3 * size + 2


# --------------------------------------------------------------------------------- autograd wrapper
class _SimplexQP(torch.autograd.Function):
    """w = argmin over the simplex of 1/2 w^T Q w - c^T w, rows flattened: Q [N, S, S], c [N, S]."""

    @staticmethod
    def forward(
        ctx: Any,
        quadratic: torch.Tensor,
        linear: torch.Tensor,
        allowed: torch.Tensor,
        max_iter: int,
        sync_free: bool = False,
    ):
        solve = _solve_sync_free if sync_free else _active_set
        w = solve(quadratic.detach(), linear.detach(), allowed, max_iter)
        ctx.save_for_backward(quadratic, w)
        return w

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_w: torch.Tensor):
        quadratic, w = ctx.saved_tensors
        support = w > 0  # inactive coordinates stay at 0 under small perturbations: zero gradient
        adjoint, _ = _bordered_solve(quadratic, grad_w, support, 0.0)  # the bordered matrix is symmetric
        grad_quadratic = -adjoint[:, :, None] * w[:, None, :]
        return grad_quadratic, adjoint, None, None, None


def _check_mask(
    mask: torch.Tensor | None, shape: torch.Size, device: torch.device, read_values: bool = True
) -> torch.Tensor:
    """The mask expanded to ``shape``; ``read_values=False`` skips the check that reads the device."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if mask.dtype != torch.bool:
        raise ValueError(f"mask dtype {mask.dtype}: must be torch.bool")
    mask = mask.expand(shape)
    if read_values and not bool(mask.any(dim=-1).all()):
        raise ValueError("mask: every row needs at least one True (allowed) entry")
    return mask


def simplex_qp(
    quadratic: torch.Tensor,
    linear: torch.Tensor,
    mask: torch.Tensor | None = None,
    max_iter: int | None = None,
    sync_free: bool = False,
) -> torch.Tensor:
    """Exact solution of argmin_{w in simplex} 1/2 w^T Q w - c^T w for every leading index.

    quadratic: Q [..., S, S], positive definite (only its symmetric part is used); linear: c [..., S];
    mask: optional bool [..., S], False forces w_i = 0 (every row needs a True). Leading dims of the
    three broadcast. max_iter: active-set iterations before the enumeration fallback (default 3 S + 2;
    the fallback costs 2^S - 1 solves per unfinished row, so keep S <= ~10). float16 / bfloat16 are
    solved in float32. Returns w [..., S]: w >= 0, sum 1, exact up to rounding; differentiable in Q
    and c (implicit, KKT). Each iteration syncs once (it counts the rows still searching).

    sync_free: read nothing back from the device (module docstring): exactly ``max_iter`` steps on
    every row (default :func:`sync_free_default_steps`: 0 for S <= 4, else 3 S + 2), then for S <= 4
    the unconditional face enumeration, so the result is exact for S <= 4 and exact where certified
    above; the mask is not checked for all-False rows (the caller guarantees one True per row).
    """
    size = linear.shape[-1]
    if quadratic.shape[-2:] != (size, size):
        raise ValueError(f"quadratic shape {tuple(quadratic.shape)}: last two dims must be ({size}, {size})")
    lead = torch.broadcast_shapes(quadratic.shape[:-2], linear.shape[:-1], () if mask is None else mask.shape[:-1])
    allowed = _check_mask(mask, lead + (size,), linear.device, read_values=not sync_free).reshape(-1, size)
    quadratic = 0.5 * (quadratic + quadratic.transpose(-1, -2))  # the objective only sees this part
    q = quadratic.expand(lead + (size, size)).reshape(-1, size, size)
    c = linear.expand(lead + (size,)).reshape(-1, size)
    if max_iter is not None:
        iterations = int(max_iter)
    else:
        iterations = sync_free_default_steps(size) if sync_free else 3 * size + 2
    if c.dtype in (torch.float16, torch.bfloat16):  # no batched LU in half precision; solve in float32
        w = _SimplexQP.apply(q.float(), c.float(), allowed, iterations, sync_free).to(c.dtype)
    else:
        w = _SimplexQP.apply(q, c, allowed, iterations, sync_free)
    return w.reshape(lead + (size,))


def simplex_qp_kkt_residual(
    weights: torch.Tensor,
    quadratic: torch.Tensor,
    linear: torch.Tensor,
    mask: torch.Tensor | None = None,
    support_tol: float = 0.0,
) -> torch.Tensor:
    """Worst violation of the KKT conditions of (QP) at ``weights``; 0 at the exact optimum.

    weights: [..., S]; quadratic: [..., S, S]; linear: [..., S]; mask: optional bool [..., S].
    Conditions, with g = Q_sym w - c and the support P = {w_i > support_tol, allowed}: w >= 0,
    sum(w) = 1, w = 0 where masked; g_i = eta on P (eta = mean of g over P); g_i >= eta on the
    allowed coordinates off P (no descent by moving weight there). Returns [...] (absolute units of g).
    """
    allowed = torch.ones_like(weights, dtype=torch.bool) if mask is None else mask.expand(weights.shape)
    symmetric = 0.5 * (quadratic + quadratic.transpose(-1, -2))
    gradient = torch.einsum("...st,...t->...s", symmetric, weights) - linear
    support = (weights > support_tol) & allowed
    eta = (gradient * support).sum(-1, keepdim=True) / support.sum(-1, keepdim=True).clamp(min=1)
    primal = torch.maximum((-weights).clamp(min=0).amax(-1), (weights.sum(-1) - 1.0).abs())
    primal = torch.maximum(primal, (weights.abs() * ~allowed).amax(-1))
    stationary = ((gradient - eta).abs() * support).amax(-1)
    dual = ((eta - gradient).clamp(min=0) * (allowed & ~support)).amax(-1)
    slack = (weights.clamp(min=0) * (gradient - eta).abs() * (allowed & ~support)).amax(-1)
    return torch.stack((primal, stationary, dual, slack)).amax(0)


# ------------------------------------------------------------------------------ the mixing instance
def mixture_qp_terms(
    outputs: torch.Tensor,
    target: torch.Tensor,
    scores: torch.Tensor,
    lam: float | torch.Tensor,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Q = O O^T + lambda I [..., S, S] and c = O t + s [..., S] of the mixing problem.

    outputs: O [..., S, D]; target: t [..., D]; scores: s [..., S]; lam: float > 0 or a tensor
    broadcastable to the leading dims [...] (e.g. a scalar parameter). ``check=False`` skips the
    positivity check of a tensor lam (it reads the device; the caller guarantees lam > 0).
    """
    size = outputs.shape[-2]
    if isinstance(lam, torch.Tensor):
        if check and bool((lam <= 0).any()):
            raise ValueError("lam: every entry must be > 0 (it makes the problem strictly convex)")
        ridge = lam.to(outputs.dtype)[..., None, None]
    else:
        if not lam > 0:
            raise ValueError(f"lam={lam}: must be > 0 (it makes the problem strictly convex)")
        ridge = float(lam)
    eye = torch.eye(size, dtype=outputs.dtype, device=outputs.device)
    quadratic = outputs @ outputs.transpose(-1, -2) + ridge * eye
    linear = torch.einsum("...sd,...d->...s", outputs, target) + scores
    return quadratic, linear


def mixture_qp_weights(
    outputs: torch.Tensor,
    target: torch.Tensor,
    scores: torch.Tensor,
    lam: float | torch.Tensor,
    mask: torch.Tensor | None = None,
    max_iter: int | None = None,
    sync_free: bool = False,
) -> torch.Tensor:
    """Per-row mixing weights w* = argmin_{w in simplex} 1/2||w^T O - t||^2 + lam/2||w||^2 - s.w.

    outputs: O [..., S, D] (S candidates per row); target: t [..., D]; scores: s [..., S];
    lam: float > 0 or tensor broadcastable to [...]; mask: optional bool [..., S] (False = weight 0,
    each row needs a True). Returns w [..., S], exact; gradients reach O, t, s and a tensor lam.
    Cost per row: O(S^2 D) for Q plus a few [S + 1]^2 solves. sync_free: see :func:`simplex_qp`
    (no device read-back, fixed work; a tensor lam is then not checked for positivity).
    """
    if target.shape[-1] != outputs.shape[-1] or scores.shape[-1] != outputs.shape[-2]:
        raise ValueError(
            f"outputs {tuple(outputs.shape)}, target {tuple(target.shape)}, scores {tuple(scores.shape)}: "
            "need outputs [..., S, D], target [..., D], scores [..., S]"
        )
    quadratic, linear = mixture_qp_terms(outputs, target, scores, lam, check=not sync_free)
    return simplex_qp(quadratic, linear, mask, max_iter, sync_free)


def mixture_qp_kkt_residual(
    weights: torch.Tensor,
    outputs: torch.Tensor,
    target: torch.Tensor,
    scores: torch.Tensor,
    lam: float | torch.Tensor,
    mask: torch.Tensor | None = None,
    support_tol: float = 0.0,
) -> torch.Tensor:
    """KKT residual [...] of the mixing problem at weights [...,S] (see :func:`simplex_qp_kkt_residual`)."""
    quadratic, linear = mixture_qp_terms(outputs, target, scores, lam)
    return simplex_qp_kkt_residual(weights, quadratic, linear, mask, support_tol)


# ------------------------------------------------------------------------------------- references
def mixture_qp_reference_cvxpy(
    outputs: np.ndarray, target: np.ndarray, scores: np.ndarray, lam: float, mask: np.ndarray | None = None
) -> np.ndarray:
    """Oracle: every row solved separately by cvxpy (Clarabel, tight tolerances), float64.

    outputs [..., S, D], target [..., D], scores [..., S], mask bool [..., S] -> w [..., S].
    Needs the optional ``cvxpy`` extra; imported here so the library never depends on it.
    """
    import cvxpy as cp

    outputs = np.asarray(outputs, dtype=np.float64)
    size, dim = outputs.shape[-2:]
    rows = outputs.reshape(-1, size, dim)
    targets = np.broadcast_to(np.asarray(target, dtype=np.float64), outputs.shape[:-2] + (dim,)).reshape(-1, dim)
    score_rows = np.broadcast_to(np.asarray(scores, dtype=np.float64), outputs.shape[:-1]).reshape(-1, size)
    allowed = np.ones_like(score_rows, dtype=bool) if mask is None else np.broadcast_to(mask, score_rows.shape)
    solutions = []
    for o, t, s, ok in zip(rows, targets, score_rows, allowed):
        w = cp.Variable(size)
        objective = 0.5 * cp.sum_squares(o.T @ w - t) + 0.5 * lam * cp.sum_squares(w) - s @ w
        constraints = [w >= 0, cp.sum(w) == 1] + [w[i] == 0 for i in np.flatnonzero(~ok)]
        cp.Problem(cp.Minimize(objective), constraints).solve(
            solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12
        )
        solutions.append(np.asarray(w.value))
    return np.stack(solutions).reshape(outputs.shape[:-1])


def mixture_qp_reference_pgd(
    outputs: torch.Tensor,
    target: torch.Tensor,
    scores: torch.Tensor,
    lam: float,
    mask: torch.Tensor | None = None,
    tol: float = 1e-14,
    max_iter: int = 200_000,
) -> torch.Tensor:
    """Slow plain reference without cvxpy: accelerated projected gradient in float64 to convergence.

    Same shapes as :func:`mixture_qp_weights`; returns float64 w [..., S]. Step 1/L with L the largest
    eigenvalue of Q, momentum (sqrt L - sqrt lam) / (sqrt L + sqrt lam) (Nesterov, lam-strongly
    convex), projection = sparsemax (exact Euclidean projection onto the simplex, masked entries 0).
    """
    quadratic, linear = mixture_qp_terms(outputs.double(), target.double(), scores.double(), lam)
    allowed = None if mask is None else mask.expand(linear.shape)
    step = 1.0 / torch.linalg.eigvalsh(quadratic)[..., -1:]
    root_l, root_mu = step.rsqrt(), float(lam) ** 0.5
    momentum = (root_l - root_mu) / (root_l + root_mu)
    w = sparsemax(torch.zeros_like(linear), allowed)
    y = w
    for _ in range(max_iter):
        gradient = torch.einsum("...st,...t->...s", quadratic, y) - linear
        w_next = sparsemax(y - step * gradient, allowed)
        if (w_next - w).abs().max().item() < tol:
            return w_next
        y = w_next + momentum * (w_next - w)
        w = w_next
    return w
