"""Pieces every synthetic sensor task shares (:mod:`~hierseq.data.signals`, :mod:`~hierseq.data.long_signals`):
correlated noise for smooth random drives, and the chunk alignment of targets."""

from __future__ import annotations

import numpy as np


def ar1_noise(rng: np.random.Generator, shape: tuple[int, ...], corr: float, scale: float) -> np.ndarray:
    """Stationary AR(1) noise along axis 1 with per-step correlation ``corr`` and marginal std ``scale``.
    shape: [N, T, ...]. Vectorised over sequences; the loop is over time, in data generation only."""
    out = np.empty(shape)
    innovation = rng.standard_normal(shape) * scale * np.sqrt(1 - corr**2)
    out[:, 0] = rng.standard_normal((shape[0], *shape[2:])) * scale
    for t in range(1, shape[1]):
        out[:, t] = corr * out[:, t - 1] + innovation[:, t]
    return out


def at_chunk_ends(values: np.ndarray, chunk_size: int) -> np.ndarray:
    """values: [N, T, D] -> the values at the last step of every full chunk: [N, T // C, D]. Target k is
    the value at input step (k + 1) * C - 1, so a model that has read chunk k has all it needs."""
    n = values.shape[1] // chunk_size
    return values[:, chunk_size - 1 : n * chunk_size : chunk_size]
