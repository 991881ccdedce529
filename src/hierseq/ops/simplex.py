"""Weights on the probability simplex: sparsemax (Euclidean projection) and a Nash / logit
best-response iteration, each with a plain reference implementation next to the fast batched one.

Both are used by MAHA to mix its S scale outputs per token, but nothing here knows about MAHA.

* :func:`sparsemax` solves the convex problem ``argmin_{w in simplex} ||w - z||^2`` exactly (Martins &
  Astudillo 2016) by sorting; autograd through the sort gives the exact (piecewise-linear) Jacobian.
* :func:`nash_weights` runs best-response dynamics of a coordination game in which each scale pays its
  squared distance from the weighted consensus. With utilities normalised per token and the
  temperature ``2 * S`` the best-response map is a contraction with factor <= 1/2 (see
  :func:`nash_weights`), so the iteration has a unique fixed point and reaches it geometrically, and
  the weights cannot saturate to one-hot the way an unnormalised Frobenius error does.
"""

from __future__ import annotations

import numpy as np
import torch


# ------------------------------------------------------------------------------------- sparsemax
def _exclude_masked(z: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Replace masked-out scores (mask False) by a value that can never enter the sparsemax support.

    The sparsemax threshold tau always satisfies tau >= max(z) - 1 (the top entry alone would already
    carry weight max(z) - tau <= 1), so any score below max(z) - 1 gets weight exactly 0 and gradient
    exactly 0. A finite value (max - 2, detached) avoids the NaNs that -inf would bring into backward.
    """
    if mask is None:
        return z
    if not bool(mask.any(dim=-1).all()):
        raise ValueError("mask: every row needs at least one allowed entry")
    top = z.masked_fill(~mask, float("-inf")).amax(dim=-1, keepdim=True).detach()
    return torch.where(mask, z, top - 2.0)


def sparsemax(z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean projection of scores onto the probability simplex along the last dimension.

    z: [..., S] scores; mask: optional bool [..., S], False entries are forced to weight 0.
    Returns w: [..., S] with w >= 0, sum(w) = 1, w = argmin_{w in simplex} ||w - z||^2.

    Sort-based closed form: with z sorted in decreasing order z_(1) >= ... >= z_(S), the support size
    is k* = max{k : 1 + k z_(k) > sum_{j<=k} z_(j)}, the threshold tau = (sum_{j<=k*} z_(j) - 1) / k*,
    and w = max(z - tau, 0).
    """
    z = _exclude_masked(z, mask)
    z_sorted, _ = torch.sort(z, dim=-1, descending=True)
    cumulative = z_sorted.cumsum(dim=-1)
    ks = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    # The support is a prefix of the sorted order, so counting the True entries gives k*.
    in_support = 1.0 + ks * z_sorted > cumulative
    k_star = in_support.sum(dim=-1, keepdim=True)  # >= 1 always (k = 1 satisfies 1 + z > z)
    tau = (cumulative.gather(-1, k_star - 1) - 1.0) / k_star.to(z.dtype)
    return torch.clamp(z - tau, min=0.0)


def sparsemax_reference(z: np.ndarray) -> np.ndarray:
    """Plain reference for one score vector z: [S] -> w: [S], by trying every support size.

    For each k the candidate threshold is tau_k = (sum of the k largest - 1) / k; the projection uses
    the largest k whose k-th largest score still exceeds tau_k. Written for clarity, not speed.
    """
    z = np.asarray(z, dtype=np.float64)
    order = sorted(z.tolist(), reverse=True)
    best_tau = order[0] - 1.0
    running = 0.0
    for k, value in enumerate(order, start=1):
        running += value
        tau = (running - 1.0) / k
        if value > tau:
            best_tau = tau
    return np.maximum(z - best_tau, 0.0)


def simplex_kkt_residual(w: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """How far ``w`` is from satisfying the KKT conditions of argmin_{w in simplex} ||w - z||^2.

    w, z: [..., S]. The conditions are: w >= 0, sum(w) = 1, and a single multiplier tau with
    w_i = z_i - tau where w_i > 0 and z_i - tau <= 0 where w_i = 0. Returns the worst violation
    over the last dimension, [...] (0 for the exact solution up to rounding).
    """
    positive = w > 0
    count = positive.sum(-1, keepdim=True).clamp(min=1)
    tau = ((z - w) * positive).sum(-1, keepdim=True) / count  # the multiplier implied by the support
    feasibility = torch.maximum((-w).clamp(min=0).amax(-1), (w.sum(-1) - 1).abs())
    stationarity = ((z - tau - w).abs() * positive).amax(-1)
    # Off the support, z_i - tau must not be positive (else increasing w_i would lower the objective).
    complementary = ((z - tau).clamp(min=0) * ~positive).amax(-1)
    return torch.maximum(feasibility, torch.maximum(stationarity, complementary))


# ------------------------------------------------------------------------------------------ Nash
def nash_temperature(n_players: int, multiplier: float = 1.0) -> float:
    """Scale-aware temperature ``2 * S * multiplier``; ``multiplier >= 1`` keeps the map a contraction."""
    return 2.0 * n_players * multiplier


def normalise_utilities(utilities: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rescale each token's S candidate vectors so that sum_s ||u_s||^2 / D = S (at most).

    utilities: [..., S, D] -> [..., S, D]. Per token, so it is causal and independent of the
    sequence length (the seed's Frobenius error over the whole sequence grew like sqrt(N D)).
    """
    power = utilities.pow(2).mean(dim=(-2, -1), keepdim=True)  # mean over scales and channels
    return utilities * torch.rsqrt(power + eps)


def best_response(
    weights: torch.Tensor,
    prior: torch.Tensor,
    utilities: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One logit best response of every player to the current consensus.

    weights: [..., S] current mixed strategy; prior: [..., S] learned scores; utilities: [..., S, D]
    (already normalised); mask: optional bool [..., S] (False = player absent).
    Player s pays c_s = ||u_s - sum_r w_r u_r||^2 / D and responds with softmax(prior - c / T).
    """
    d = utilities.shape[-1]
    consensus = torch.einsum("...s,...sd->...d", weights, utilities)
    cost = (utilities - consensus.unsqueeze(-2)).pow(2).sum(-1) / d
    logits = prior - cost / temperature
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1)


def nash_weights(
    prior: torch.Tensor,
    utilities: torch.Tensor,
    n_iters: int,
    temperature_multiplier: float = 1.0,
    mask: torch.Tensor | None = None,
    return_residual: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Best-response dynamics from w_0 = softmax(prior), ``n_iters`` steps, unrolled (differentiable).

    prior: [..., S]; utilities: [..., S, D]; mask: optional bool [..., S]. Returns w: [..., S] and,
    with ``return_residual``, ||BR(w) - w||_2 per token [...] (0 at the fixed point).

    Same game as :func:`best_response` on :func:`normalise_utilities`, computed through the S x S Gram
    matrix so each iteration costs O(S^2) per token instead of O(S D), and only the Gram matrix (not K
    copies of [..., S, D]) is kept for backward.

    Why it converges: the common ||consensus||^2 term cancels inside the softmax, so the logits are
    prior - ||u_s||^2 / (D T) + 2 (G w)_s / (D T) with G the Gram matrix of the normalised
    utilities; ||G||_2 <= trace(G) = S D, and softmax is 1/2-Lipschitz (its Jacobian is a covariance,
    bounded by Popoviciu's inequality), so the map is Lipschitz with constant <= S / T =
    1 / (2 * multiplier) <= 1/2: a contraction with a unique fixed point, reached to within
    2^-n_iters of the starting distance.
    """
    if temperature_multiplier < 1.0:
        raise ValueError(f"temperature_multiplier={temperature_multiplier}: must be >= 1 to keep a contraction")
    n_players, d = prior.shape[-1], utilities.shape[-1]
    temperature = nash_temperature(n_players, temperature_multiplier)
    gram = torch.einsum("...sd,...rd->...sr", utilities, utilities) / d  # [..., S, S]
    power = torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1)  # mean of u^2 over scales and channels
    gram = gram / (power + eps)[..., None, None]  # Gram matrix of the normalised utilities, / D
    base = prior - torch.diagonal(gram, dim1=-2, dim2=-1) / temperature
    coupling = gram * (2.0 / temperature)
    if mask is not None:
        base = base.masked_fill(~mask, float("-inf"))
    start = prior if mask is None else prior.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(start, dim=-1)

    def respond(w: torch.Tensor) -> torch.Tensor:
        return torch.softmax(base + torch.einsum("...sr,...r->...s", coupling, w), dim=-1)

    for _ in range(n_iters):
        weights = respond(weights)
    if not return_residual:
        return weights
    return weights, (respond(weights) - weights).norm(dim=-1)


def nash_weights_reference(
    prior: np.ndarray, utilities: np.ndarray, n_iters: int, temperature_multiplier: float = 1.0
) -> np.ndarray:
    """Plain float64 reference for one token: prior [S], utilities [S, D] -> weights [S]."""
    prior = np.asarray(prior, dtype=np.float64)
    u = np.asarray(utilities, dtype=np.float64)
    n_players, d = u.shape
    u = u / np.sqrt((u**2).mean() + 1e-6)
    temperature = 2.0 * n_players * temperature_multiplier

    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max())
        return e / e.sum()

    w = softmax(prior)
    for _ in range(n_iters):
        consensus = w @ u
        cost = np.array([((u[s] - consensus) ** 2).sum() / d for s in range(n_players)])
        w = softmax(prior - cost / temperature)
    return w
