"""Weights on the probability simplex: sparsemax (Euclidean projection), with a plain reference next to
the fast batched one and the KKT residual that certifies it.

:func:`sparsemax` solves the convex problem ``argmin_{w in simplex} ||w - z||^2`` exactly (Martins &
Astudillo 2016) by sorting; autograd through the sort gives the exact (piecewise-linear) Jacobian. The
quadratic programs over the simplex (``ops/simplex_qp.py``) and the scale game
(``ops/redundancy_game.py``) use it as their projection.
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
