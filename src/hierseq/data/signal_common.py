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


def drag_limited_velocity(world_thrust: np.ndarray, drag: np.ndarray, dt: float) -> tuple[np.ndarray, np.ndarray]:
    """A body pushed by ``world_thrust`` [N, T, k] (m/s^2) against linear drag ``drag`` [N, 1] (1/s), from
    rest, explicit Euler with step ``dt`` -> (velocity [N, T, k] after each step, the world acceleration
    [N, T, k] an ideal accelerometer measures over each step)."""
    velocity = np.empty(world_thrust.shape)
    v = np.zeros((world_thrust.shape[0], *world_thrust.shape[2:]))
    for t in range(world_thrust.shape[1]):
        v = v + (world_thrust[:, t] - drag * v) * dt
        velocity[:, t] = v
    return velocity, np.diff(velocity, axis=1, prepend=0.0) / dt
