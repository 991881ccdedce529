"""Synthetic sensor tasks: shapes, seeding, and that the targets really are what the docstrings say."""

from __future__ import annotations

import numpy as np
import pytest

from hierseq.data.signals import (
    DT,
    REFERENCE_ESTIMATORS,
    SHORT_TASKS,
    SIGNAL_TASKS,
    dynamics_sensor_inversion,
    imu_dead_reckoning,
    make_hidden_dynamics,
    make_imu_integration,
    make_signal_splits,
)


@pytest.mark.parametrize("name", SHORT_TASKS)
def test_shapes_dtypes_and_alignment(name: str) -> None:
    task = SIGNAL_TASKS[name](5, length=107, chunk_size=10, seed=0)
    assert task.x.shape == (5, 107, 3) and task.x.dtype == np.float32
    assert task.y.shape == (5, 10, task.d_out) and task.y.dtype == np.float32
    assert task.mask.shape == (5, 10) and task.mask.all()
    assert np.isfinite(task.x).all() and np.isfinite(task.y).all()
    assert len(task.target_names) == task.d_out and len(task.input_names) == task.d_in


@pytest.mark.parametrize("name", sorted(SIGNAL_TASKS))
def test_seeded(name: str) -> None:
    a, b, c = (SIGNAL_TASKS[name](3, length=50, seed=s) for s in (7, 7, 8))
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert not np.allclose(a.x, c.x)


def test_imu_targets_are_the_integrated_noise_free_accelerations() -> None:
    """Without sensor noise, rotating the body accelerations by the integrated gyro and integrating twice
    reproduces the velocity and displacement targets at every chunk end."""
    task = make_imu_integration(4, length=200, chunk_size=10, seed=3, noise=0.0)
    estimate = imu_dead_reckoning(task.x, 10)
    assert estimate.shape == task.y.shape
    np.testing.assert_allclose(estimate, task.y, rtol=1e-3, atol=1e-3)


def test_imu_dead_reckoning_by_hand() -> None:
    """Constant forward acceleration a, no rotation: after n steps v = a n DT and, with the rectangle
    rule, p = a DT^2 n (n + 1) / 2; nothing sideways."""
    x = np.zeros((1, 20, 3))
    x[..., 0] = 2.0
    est = imu_dead_reckoning(x, 10)
    steps = np.array([10, 20])
    np.testing.assert_allclose(est[0, :, 2], 2.0 * steps * DT)  # vx
    np.testing.assert_allclose(est[0, :, 0], 2.0 * DT**2 * steps * (steps + 1) / 2)  # px
    np.testing.assert_allclose(est[0, :, [1, 3]], 0.0)


def test_imu_targets_are_predictable_but_not_trivially() -> None:
    """At the default noise the physics-aware estimator is far better than the mean (the task is
    learnable in principle), and the targets are not constant (the mean predictor is poor)."""
    task = make_imu_integration(64, length=200, seed=0)
    std = task.y.reshape(-1, 4).std(axis=0)
    mse = (((imu_dead_reckoning(task.x, 10) - task.y) / std) ** 2).mean()
    assert mse < 0.01


def test_sensor_inversion_recovers_a_linear_trajectory() -> None:
    """Noise-free sensors of p(t) = 0.3 + 0.8 t: position and velocity at every chunk end are exact."""
    t = np.arange(40) * DT
    p = 0.3 + 0.8 * t
    x = np.stack((np.tanh(p), np.sin(2 * p), np.zeros_like(p)), axis=-1)[None]
    est = dynamics_sensor_inversion(x, 10)
    np.testing.assert_allclose(est[0, :, 0], p[9::10], atol=5e-3)
    np.testing.assert_allclose(est[0, :, 1], 0.8, atol=0.05)


@pytest.mark.parametrize("name", sorted(SIGNAL_TASKS))
def test_reference_estimators_are_causal(name: str) -> None:
    """Estimate k depends only on inputs up to the end of chunk k (the models' alignment)."""
    task = SIGNAL_TASKS[name](2, length=60, seed=0)
    estimator = REFERENCE_ESTIMATORS[name][1]
    base = estimator(task.x, 10)
    changed = task.x.copy()
    changed[:, 30:] += 1.0  # inputs from chunk 3 on
    after = estimator(changed, 10)
    np.testing.assert_array_equal(after[:, :3], base[:, :3])
    assert not np.allclose(after[:, 3:], base[:, 3:])


def test_hidden_dynamics_sensors_observe_the_hidden_position() -> None:
    task = make_hidden_dynamics(3, length=100, chunk_size=10, seed=1, noise=0.0)
    p = task.y[..., 0]
    ends = np.arange(9, 100, 10)
    np.testing.assert_allclose(task.x[:, ends, 0], np.tanh(p), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(task.x[:, ends, 1], np.sin(2 * p), rtol=1e-5, atol=1e-5)
    assert np.abs(task.y).max() < 50  # damped and bounded


def test_label_dropout_and_splits() -> None:
    task = make_imu_integration(20, length=100, seed=0, label_dropout=0.5)
    assert 0.3 < task.mask.mean() < 0.8 and task.mask[:, -1].all()
    train, val, test = make_signal_splits("hidden_dynamics", 4, 2, 3, seed=0, length=40)
    assert (len(train), len(val), len(test)) == (4, 2, 3)
    assert not np.allclose(train.x[0], test.x[0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_sequences": 0}, "n_sequences=0"),
        ({"n_sequences": 2, "length": 5, "chunk_size": 10}, "length=5"),
        ({"n_sequences": 2, "noise": -1.0}, "noise=-1.0"),
        ({"n_sequences": 2, "label_dropout": 1.0}, "label_dropout=1.0"),
    ],
)
def test_argument_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_imu_integration(**kwargs)
