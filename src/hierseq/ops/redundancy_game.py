"""Nash equilibrium of a redundancy (congestion) game between S candidates, exact and differentiable.

The game, per row of the leading dimensions (a token), with S candidate vectors O_1..O_S (the scale
outputs, in MAHA), relevances r [S], a redundancy strength gamma and a crowding strength tau:

* **Players.** A continuum of infinitesimal agents of total mass 1: the token's units of attention
  (a nonatomic population game). Each agent picks one candidate; w_l is the mass that picked l, so
  the state w lies on the simplex. Masked candidates cannot be picked (w_l = 0).
* **Payoffs.** An agent on candidate l receives

      u_l(w) = r_l - gamma * sum_{m != l} C_lm w_m - tau * w_l,      C_lm = cos(O_l, O_m),

  its relevance, minus its redundancy with the mixture of the OTHER candidates (the cosine-weighted
  mass already on vectors that say the same thing), minus crowding (the marginal value of a
  candidate falls as more attention sits on it). Each payoff depends on the others' weights.
* **Unilateral deviation.** One agent moves from candidate l to m. It is infinitesimal, so w (and
  every payoff) is unchanged and its gain is u_m(w) - u_l(w).
* **Equilibrium** (Nash / Wardrop): no agent gains by deviating, i.e. every used candidate earns the
  best payoff: w_l > 0 => u_l(w) = max_m u_m(w).
* **epsilon-Nash gap** (:func:`redundancy_game_nash_gap`): the largest gain any agent can get by
  deviating alone, max_m u_m(w) - min_{l : w_l > 0} u_l(w) >= 0; 0 exactly at the equilibrium. It
  bounds the mass-weighted gap max_{v in simplex} <u(w), v - w> from above.

Existence, uniqueness, computation. u = grad Phi with the potential Phi(w) = r.w - 1/2 w^T A w,
A = tau I + gamma C0 (C0 = C with zero diagonal), so this is a potential game (Monderer & Shapley
1996; Sandholm 2001): its equilibria are the KKT points of max_{w in simplex} Phi. C is a Gram matrix
of vectors of norm <= 1, so C0 = C - diag(C) >= -I and A >= (tau - gamma) I: for 0 <= gamma < tau the
potential is strongly concave, -u is strongly monotone, and the equilibrium exists and is unique.
It is computed exactly by the active-set QP solver (:func:`hierseq.ops.simplex_qp.simplex_qp`, at
most 3 S + 2 batched iterations, then an exact enumeration fallback) and differentiated implicitly
through the equilibrium (= KKT) conditions on its support.

Sync-free mode (``sync_free=True``, for a model's forward on an accelerator): the solve reads nothing
back from the device (fixed work, no early exit; exact by unconditional face enumeration for S <= 4,
a measured 3 S + 2 step budget above: see :mod:`hierseq.ops.simplex_qp`), and tensor strengths are not
checked on the host (the caller keeps 0 <= gamma < tau, e.g. by parametrising gamma = tau * a with
a in [0, 1)); Python-number strengths are still checked (that reads nothing from the device).

No temperature washes the game out: with gamma = 0 the equilibrium is sparsemax(r / tau) (the
"prior" without interaction); gamma may go up to tau, the same order as the self term, and then
duplicated candidates split their weight while a distinct candidate keeps its own (see the tests).
"""

from __future__ import annotations

import numpy as np
import torch

from .simplex import sparsemax_reference
from .simplex_qp import simplex_qp


def _as_strength(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor | float:
    """A float stays a float; a tensor (scalar or [...]) gets two trailing dims to meet [..., S, S]."""
    if isinstance(value, torch.Tensor):
        return value.to(like.dtype)[..., None, None]
    return float(value)


def _check_strengths(redundancy: float | torch.Tensor, crowding: float | torch.Tensor) -> None:
    """0 <= gamma < tau is what makes the equilibrium unique (A >= (tau - gamma) I)."""
    gamma = torch.as_tensor(redundancy, dtype=torch.float64)
    tau = torch.as_tensor(crowding, dtype=torch.float64)
    if bool((gamma < 0).any()):
        raise ValueError(f"redundancy={redundancy}: must be >= 0")
    if not bool((gamma < tau).all()):
        raise ValueError(
            f"redundancy={redundancy}, crowding={crowding}: need redundancy < crowding (unique equilibrium)"
        )


def cosine_redundancy(outputs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """C0 [..., S, S]: cosines cos(O_l, O_m) between the candidates, with a zero diagonal.

    outputs: [..., S, D]. Vectors are divided by sqrt(||O||^2 + eps), so a zero vector has cosine 0
    with everything and the normalised vectors have norm < 1 (which keeps C0 >= -I).
    """
    unit = outputs * torch.rsqrt(outputs.pow(2).sum(-1, keepdim=True) + eps)
    gram = unit @ unit.transpose(-1, -2)
    return gram - torch.diag_embed(torch.diagonal(gram, dim1=-2, dim2=-1))


def _interaction(
    outputs: torch.Tensor, redundancy: float | torch.Tensor, crowding: float | torch.Tensor, eps: float
) -> torch.Tensor:
    """A = tau I + gamma C0 [..., S, S]: payoffs are u = r - A w."""
    eye = torch.eye(outputs.shape[-2], dtype=outputs.dtype, device=outputs.device)
    tau = _as_strength(crowding, outputs)
    gamma = _as_strength(redundancy, outputs)
    return tau * eye + gamma * cosine_redundancy(outputs, eps)


def redundancy_game_payoffs(
    weights: torch.Tensor,
    outputs: torch.Tensor,
    relevance: torch.Tensor,
    redundancy: float | torch.Tensor = 0.5,
    crowding: float | torch.Tensor = 1.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """u(w) [..., S]: the payoff of an agent on each candidate, u = r - gamma C0 w - tau w.

    weights: w [..., S]; outputs: O [..., S, D]; relevance: r [..., S]; redundancy (gamma) and
    crowding (tau): floats or tensors broadcastable to the leading dims [...].
    """
    interaction = _interaction(outputs, redundancy, crowding, eps)
    return relevance - torch.einsum("...lm,...m->...l", interaction, weights)


def redundancy_game_nash_gap(
    weights: torch.Tensor,
    outputs: torch.Tensor,
    relevance: torch.Tensor,
    redundancy: float | torch.Tensor = 0.5,
    crowding: float | torch.Tensor = 1.0,
    mask: torch.Tensor | None = None,
    support_tol: float = 0.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """epsilon-Nash gap [...]: the largest gain of a single agent's deviation at state w.

    Shapes as in :func:`redundancy_game_payoffs`; mask: optional bool [..., S] (False = absent
    candidate: nobody may move there). Used candidates are those with w_l > support_tol. Returns
    max_{m allowed} u_m(w) - min_{l used} u_l(w), in payoff units; 0 at the exact equilibrium.
    """
    payoffs = redundancy_game_payoffs(weights, outputs, relevance, redundancy, crowding, eps)
    allowed = torch.ones_like(weights, dtype=torch.bool) if mask is None else mask.expand(weights.shape)
    best = payoffs.masked_fill(~allowed, -torch.inf).amax(-1)
    worst_used = payoffs.masked_fill(~(allowed & (weights > support_tol)), torch.inf).amin(-1)
    return (best - worst_used).clamp(min=0.0)


def redundancy_game_equilibrium(
    outputs: torch.Tensor,
    relevance: torch.Tensor,
    redundancy: float | torch.Tensor = 0.5,
    crowding: float | torch.Tensor = 1.0,
    mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    max_iter: int | None = None,
    sync_free: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unique Nash equilibrium of the redundancy game (module docstring) and its certificate.

    outputs: O [..., S, D] (S candidates per row); relevance: r [..., S]; redundancy: gamma >= 0 and
    crowding: tau > gamma, floats or tensors broadcastable to [...]; mask: optional bool [..., S]
    (False = absent candidate, weight 0; each row needs a True); eps: the cosines' normaliser;
    max_iter: active-set iterations before the exact fallback (default 3 S + 2).
    Returns (weights [..., S] on the simplex, gap [...]): gap is the epsilon-Nash gap of the returned
    weights (detached; ~1e-15 in float64). Weights are differentiable in O, r and tensor gamma / tau,
    by implicit differentiation of the equilibrium conditions (the KKT system of the potential).
    sync_free: no device read-back (module docstring); tensor strengths are then the caller's to keep valid.
    """
    if relevance.shape[-1] != outputs.shape[-2]:
        raise ValueError(
            f"outputs {tuple(outputs.shape)}, relevance {tuple(relevance.shape)}: need [..., S, D], [..., S]"
        )
    if not sync_free or not isinstance(redundancy, torch.Tensor) and not isinstance(crowding, torch.Tensor):
        _check_strengths(redundancy, crowding)
    # Equilibrium = argmax Phi = argmin_{w in simplex} 1/2 w^T A w - r.w, solved exactly.
    interaction = _interaction(outputs, redundancy, crowding, eps)
    weights = simplex_qp(interaction, relevance, mask, max_iter, sync_free)
    with torch.no_grad():
        gap = redundancy_game_nash_gap(weights, outputs, relevance, redundancy, crowding, mask, eps=eps)
    return weights, gap


def redundancy_game_reference(
    outputs: np.ndarray,
    relevance: np.ndarray,
    redundancy: float = 0.5,
    crowding: float = 1.0,
    mask: np.ndarray | None = None,
    eps: float = 1e-6,
    tol: float = 1e-15,
    max_iter: int = 100_000,
) -> np.ndarray:
    """Plain reference: a loop over rows, each run by projection dynamics to convergence, float64.

    outputs [..., S, D], relevance [..., S], mask bool [..., S] -> w [..., S]. Per row, payoffs come
    straight from the definition (sums over the other candidates) and w <- Proj(w + u(w) / L), with
    L = tau + gamma (S - 1) >= ||A||, which converges geometrically (factor 1 - (tau - gamma) / L)
    because the game is strongly monotone. Written for clarity, not speed.
    """
    outputs = np.asarray(outputs, dtype=np.float64)
    size, dim = outputs.shape[-2:]
    rows = outputs.reshape(-1, size, dim)
    gains = np.broadcast_to(np.asarray(relevance, dtype=np.float64), outputs.shape[:-1]).reshape(-1, size)
    allowed = np.ones_like(gains, dtype=bool) if mask is None else np.broadcast_to(mask, gains.shape)
    step = 1.0 / (crowding + redundancy * (size - 1))
    solutions = []
    for o, r, ok in zip(rows, gains, allowed):
        unit = [o[l] / np.sqrt(o[l] @ o[l] + eps) for l in range(size)]
        cos = [[float(unit[l] @ unit[m]) for m in range(size)] for l in range(size)]
        w = ok / ok.sum()
        for _ in range(max_iter):
            u = np.array(
                [
                    r[l] - redundancy * sum(cos[l][m] * w[m] for m in range(size) if m != l) - crowding * w[l]
                    for l in range(size)
                ]
            )
            w_next = np.zeros(size)
            w_next[ok] = sparsemax_reference((w + step * u)[ok])  # Euclidean projection on the simplex
            converged = np.abs(w_next - w).max() < tol
            w = w_next
            if converged:
                break
        solutions.append(w)
    return np.stack(solutions).reshape(outputs.shape[:-1])
