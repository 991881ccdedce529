"""The long, high-rate sensor tasks: shapes, the fixed output grid, and that the targets are the physics
the docstrings describe (noise-free sensors let the reference estimators reproduce them)."""

from __future__ import annotations

import numpy as np
import pytest

from hierseq.data.long_signals import (
    DT,
    LONG_SIMULATORS,
    OUTPUT_PERIOD,
    complementary_dead_reckoning,
    euler_to_matrix,
    rotation_rates,
    rotation_step,
    tactile_baseline_tracking,
)
from hierseq.data.signals import SIGNAL_TASKS, make_signal_task

LONG_TASKS = sorted(LONG_SIMULATORS)


@pytest.mark.parametrize("name", LONG_TASKS)
@pytest.mark.parametrize("chunk_size", [10, 50])
def test_shapes_and_the_output_grid_is_the_same_for_every_chunk_size(name: str, chunk_size: int) -> None:
    task = SIGNAL_TASKS[name](3, length=4 * OUTPUT_PERIOD, chunk_size=chunk_size, seed=0)
    n_chunks = 4 * OUTPUT_PERIOD // chunk_size
    assert task.x.shape[:2] == (3, 4 * OUTPUT_PERIOD) and task.x.dtype == np.float32
    assert task.y.shape[:2] == (3, n_chunks) and task.mask.shape == (3, n_chunks)
    assert np.isfinite(task.x).all() and np.isfinite(task.y).all()
    labelled_ends = (np.flatnonzero(task.mask[0]) + 1) * chunk_size
    np.testing.assert_array_equal(labelled_ends, OUTPUT_PERIOD * np.arange(1, 5))
    coarse = SIGNAL_TASKS[name](3, length=4 * OUTPUT_PERIOD, chunk_size=OUTPUT_PERIOD, seed=0)
    np.testing.assert_array_equal(task.y[task.mask].reshape(3, 4, -1), coarse.y)  # the same targets


def test_channel_counts() -> None:
    assert SIGNAL_TASKS["imu9_odometry"](1, length=50).d_in == 9
    assert SIGNAL_TASKS["tactile_drift"](1, length=50).d_in == 16


@pytest.mark.parametrize("name", LONG_TASKS)
def test_a_chunk_size_off_the_output_grid_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="chunk_size=15"):
        make_signal_task(name, 2, length=100, chunk_size=15)


def test_rotation_rates_invert_the_rotation_step() -> None:
    rng = np.random.default_rng(0)
    angles = np.cumsum(rng.normal(0, 0.02, size=(3, 2, 40)), axis=-1)
    orientation = euler_to_matrix(*angles)
    rates = rotation_rates(orientation)
    for t in range(39):
        np.testing.assert_allclose(orientation[:, t] @ rotation_step(rates[:, t]), orientation[:, t + 1], atol=1e-12)


def test_imu9_targets_are_the_integrated_ideal_imu() -> None:
    """Noise-free (and so bias-free) sensors: integrating the gyro and the gravity-corrected specific force,
    with no magnetometer correction, reproduces the unwrapped yaw and the world velocity."""
    task = make_signal_task("imu9_odometry", 3, length=600, chunk_size=50, seed=2, noise=0.0)
    estimate = complementary_dead_reckoning(task.x, 50, gain=0.0)
    np.testing.assert_allclose(estimate, task.y, rtol=1e-3, atol=1e-3)
    assert np.abs(task.y[..., 0]).max() > 2 * np.pi / 4  # the heading really turns


def test_tactile_targets() -> None:
    """The impulse integrates the force; released, the array reads only its baseline; noise-free, the
    baseline-tracking reference recovers the force."""
    task = make_signal_task("tactile_drift", 8, length=1000, chunk_size=50, seed=1, noise=0.0)
    force, impulse = task.y[..., 0], task.y[..., 3]
    assert (force >= 0).all() and (force > 0).any() and (force == 0).any()
    assert (np.diff(impulse, axis=1) >= -1e-6).all()
    estimate = tactile_baseline_tracking(task.x, 50)
    touching = force > 0.3
    released = force == 0
    assert np.abs(estimate[..., 0][released]).max() < 0.05
    relative = np.abs(estimate[..., 0][touching] - force[touching]) / force[touching]
    assert np.median(relative) < 0.2, np.median(relative)


def test_tactile_drift_moves_the_baseline() -> None:
    """At the default noise the released readings wander (drift), so a fixed baseline is not enough."""
    task = make_signal_task("tactile_drift", 8, length=4000, chunk_size=50, seed=1)
    x = task.x.astype(np.float64)
    early, late = x[:, :200].mean(axis=1), x[:, -200:].mean(axis=1)
    assert np.abs(late - early).mean() > 0.05
    assert DT == 0.01
