"""Synthetic continuous sequence-to-sequence tasks shaped like CSP-Bench, generated offline from a seed.

High-rate multichannel sensor input (50 Hz), one low-rate target per chunk of ``chunk_size`` steps
(5 Hz for C = 10) that depends on the whole history. Target k is the true value at the last step of
chunk k, i.e. at input step (k + 1) * C - 1, so a model that has seen inputs up to the end of chunk k
has everything it needs and nothing more.

* ``imu_integration``: a planar vehicle driven by random smooth thrust and yaw rate, with drag. Input:
  body-frame accelerometer (2 axes) and gyroscope (yaw rate), with white noise and a small constant
  per-sequence bias. Target: world-frame displacement from the start and world-frame velocity
  [px, py, vx, vy] - integrating rotated accelerations twice, so every past step matters.
* ``hidden_dynamics``: a forced Duffing oscillator p'' = -delta p' - alpha p - beta p^3 + u with
  per-sequence random (unobserved) parameters. Input: noisy nonlinear position sensors tanh(p),
  sin(2p) and the noisy forcing u. Target: the hidden state [p, v].

The long, high-rate tasks of :mod:`hierseq.data.long_signals` (``imu9_odometry``, ``tactile_drift``: 100 Hz,
9 and 16 channels, thousands of steps, a target every 50 steps whatever the chunk size) are registered here
too, so every signal task is made, split and trained the same way.

Every task returns a :class:`SignalTask` of float32 numpy arrays; nothing touches the network or disk.

Reference estimators (:data:`REFERENCE_ESTIMATORS`) that know the physics and read only the noisy inputs,
with the same causal alignment as the models (estimate k uses inputs up to the end of chunk k):

* ``imu_integration``: dead reckoning - rotate the measured accelerations by the integrated gyro and
  integrate twice, exactly as the generator does. Only sensor noise and bias separate it from the targets,
  so it shows how predictable the targets are (about 0.005 in standardised units at the benchmark size).
* ``hidden_dynamics``: local sensor inversion - the position that best explains both position sensors at
  each step of the last chunk (Gauss-Newton), a straight line through those positions giving position and
  velocity at the chunk end. It uses no dynamics model and no history beyond one chunk, so a model that
  beats it has learned to filter over time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import check_positive_int, config_error
from .long_signals import LONG_REFERENCE_ESTIMATORS, LONG_SIMULATORS, OUTPUT_PERIOD
from .signal_common import ar1_noise, at_chunk_ends, drag_limited_velocity

SAMPLE_RATE_HZ = 50.0
DT = 1.0 / SAMPLE_RATE_HZ


@dataclass
class SignalTask:
    """x: [N, T, D_in] inputs; y: [N, T // C, D_out] targets; mask: [N, T // C] bool (True = labelled)."""

    name: str
    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray
    chunk_size: int
    input_names: tuple[str, ...]
    target_names: tuple[str, ...]

    @property
    def d_in(self) -> int:
        return self.x.shape[-1]

    @property
    def d_out(self) -> int:
        return self.y.shape[-1]

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, index: np.ndarray | slice) -> SignalTask:
        """The sequences selected by ``index`` (a new task sharing nothing mutable with this one)."""
        return SignalTask(
            self.name,
            self.x[index].copy(),
            self.y[index].copy(),
            self.mask[index].copy(),
            self.chunk_size,
            self.input_names,
            self.target_names,
        )


def _label_mask(rng: np.random.Generator, n_seq: int, n_targets: int, label_dropout: float) -> np.ndarray:
    mask = rng.random((n_seq, n_targets)) >= label_dropout
    mask[:, -1] = True  # every sequence keeps at least one label
    return mask


def _simulate_imu(rng: np.random.Generator, n: int, length: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """A planar vehicle -> (sensors [N, T, 3] (acc_fwd, acc_lat, gyro_z), states [N, T, 4] (px, py, vx, vy))
    in metres and m/s, world frame, from the start pose."""
    thrust = ar1_noise(rng, (n, length, 2), corr=0.97, scale=1.0)  # body frame, m/s^2
    thrust[..., 0] += 0.3  # a tendency to drive forwards
    yaw_rate = ar1_noise(rng, (n, length), corr=0.98, scale=0.6)  # rad/s
    drag = rng.uniform(0.2, 0.6, size=(n, 1))  # 1/s, unobserved
    heading = np.cumsum(yaw_rate, axis=1) * DT
    cos, sin = np.cos(heading), np.sin(heading)
    world_thrust = np.stack(
        (cos * thrust[..., 0] - sin * thrust[..., 1], sin * thrust[..., 0] + cos * thrust[..., 1]), axis=-1
    )
    velocity, accel_world = drag_limited_velocity(world_thrust, drag, DT)  # what an ideal accelerometer measures
    accel_body = np.stack(
        (cos * accel_world[..., 0] + sin * accel_world[..., 1], -sin * accel_world[..., 0] + cos * accel_world[..., 1]),
        axis=-1,
    )
    position = np.cumsum(velocity, axis=1) * DT
    bias = rng.normal(0.0, noise * 0.2, size=(n, 1, 3))
    sensors = np.concatenate((accel_body, yaw_rate[..., None]), axis=-1)
    sensors = sensors + bias + rng.normal(0.0, noise, size=sensors.shape)
    return sensors, np.concatenate((position, velocity), axis=-1)


def _simulate_duffing(rng: np.random.Generator, n: int, length: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """A forced Duffing oscillator -> (sensors [N, T, 3] (tanh(p), sin(2p), u), noisy; states [N, T, 2]
    (p, v), the hidden state)."""
    alpha = rng.uniform(4.0, 16.0, size=n)  # stiffness: 0.3 - 0.6 Hz natural frequency
    beta = rng.uniform(0.0, 4.0, size=n)  # hardening
    damping = rng.uniform(0.1, 0.6, size=n)
    forcing = ar1_noise(rng, (n, length), corr=0.95, scale=4.0)
    p = rng.normal(0.0, 0.5, size=n)
    v = rng.normal(0.0, 0.5, size=n)
    states = np.zeros((n, length, 2))
    substeps = 4  # semi-implicit Euler with 4 sub-steps per sample keeps the stiff cases stable
    h = DT / substeps
    for t in range(length):
        for _ in range(substeps):
            v = v + h * (-damping * v - alpha * p - beta * p**3 + forcing[:, t])
            p = p + h * v
        states[:, t, 0], states[:, t, 1] = p, v
    sensors = np.stack((np.tanh(states[..., 0]), np.sin(2 * states[..., 0]), forcing), axis=-1)
    sensors = sensors + rng.normal(0.0, noise, size=sensors.shape) * np.array([1.0, 1.0, 4.0])
    return sensors, states


Simulator = Callable[[np.random.Generator, int, int, float], tuple[np.ndarray, np.ndarray]]

#: task -> (simulator(rng, n, length, noise) -> (sensors, states), input names, target names).
_SIMULATORS: dict[str, tuple[Simulator, tuple[str, ...], tuple[str, ...]]] = {
    "imu_integration": (_simulate_imu, ("acc_fwd", "acc_lat", "gyro_z"), ("px", "py", "vx", "vy")),
    "hidden_dynamics": (_simulate_duffing, ("tanh_p", "sin_2p", "forcing"), ("p", "v")),
    **LONG_SIMULATORS,
}
#: task -> input steps per target, for tasks whose targets come at a fixed rate whatever the chunk size
#: (the long tasks): only chunks that end on that grid are labelled, so models with different chunk
#: sizes are scored on the same targets.
OUTPUT_PERIODS: dict[str, int] = {name: OUTPUT_PERIOD for name in LONG_SIMULATORS}


def make_signal_task(
    name: str,
    n_sequences: int,
    length: int = 500,
    chunk_size: int = 10,
    seed: int = 0,
    noise: float = 0.05,
    label_dropout: float = 0.0,
) -> SignalTask:
    """Task ``name`` (see :data:`SIGNAL_TASKS`): ``n_sequences`` sequences of ``length`` steps from
    ``seed``, white sensor noise of std ``noise``, one target per chunk of ``chunk_size`` steps, each
    unlabelled with probability ``label_dropout`` (the last target of a sequence is always labelled)."""
    if name not in _SIMULATORS:
        raise config_error("task", name, f"must be one of {sorted(_SIMULATORS)}")
    check_positive_int("n_sequences", n_sequences)
    check_positive_int("length", length)
    check_positive_int("chunk_size", chunk_size)
    if length < chunk_size:
        raise config_error("length", length, f"must be >= chunk_size={chunk_size} (at least one target)")
    if not noise >= 0:
        raise config_error("noise", noise, "must be >= 0")
    if not 0 <= label_dropout < 1:
        raise config_error("label_dropout", label_dropout, "must be in [0, 1)")
    period = OUTPUT_PERIODS.get(name)
    if period is not None and period % chunk_size:
        raise config_error(
            "chunk_size", chunk_size, f"must divide {period}: task {name} has a target every {period} steps"
        )
    simulate, input_names, target_names = _SIMULATORS[name]
    rng = np.random.default_rng(seed)
    sensors, states = simulate(rng, n_sequences, length, noise)
    targets = at_chunk_ends(states, chunk_size)
    mask = _label_mask(rng, n_sequences, targets.shape[1], label_dropout)
    if period is not None:  # a target only where a chunk ends on the task's output grid (none before it)
        on_grid = (np.arange(1, targets.shape[1] + 1) * chunk_size) % period == 0
        mask &= on_grid
    return SignalTask(
        name, sensors.astype(np.float32), targets.astype(np.float32), mask, chunk_size, input_names, target_names
    )


def make_imu_integration(n_sequences: int, **options: Any) -> SignalTask:
    """Dead reckoning from a noisy planar IMU. x: [N, T, 3] (acc_fwd, acc_lat, gyro_z);
    y: [N, T // C, 4] (px, py, vx, vy). ``options``: those of :func:`make_signal_task`."""
    return make_signal_task("imu_integration", n_sequences, **options)


def make_hidden_dynamics(n_sequences: int, **options: Any) -> SignalTask:
    """A forced Duffing oscillator seen through nonlinear sensors. x: [N, T, 3] (tanh(p), sin(2p), u);
    y: [N, T // C, 2] (p, v). ``options``: those of :func:`make_signal_task`."""
    return make_signal_task("hidden_dynamics", n_sequences, **options)


def _full_chunks(x: np.ndarray, chunk_size: int) -> np.ndarray:
    """x: [N, T, D] -> the full chunks [N, T // C, C, D] (float64)."""
    n = x.shape[1] // chunk_size
    return np.asarray(x[:, : n * chunk_size], dtype=np.float64).reshape(x.shape[0], n, chunk_size, x.shape[-1])


def imu_dead_reckoning(x: np.ndarray, chunk_size: int) -> np.ndarray:
    """Analytic estimator for ``imu_integration``: heading = integrated gyro, world acceleration = the
    measured body acceleration rotated by it, integrated twice (the generator's rectangle rule).
    x: [N, T, 3] (acc_fwd, acc_lat, gyro_z) -> [N, T // C, 4] (px, py, vx, vy) at every chunk end.
    Exact on noise-free inputs; sensor noise and bias make it drift."""
    x = np.asarray(x, dtype=np.float64)
    heading = np.cumsum(x[..., 2], axis=1) * DT
    cos, sin = np.cos(heading), np.sin(heading)
    acc_fwd, acc_lat = x[..., 0], x[..., 1]
    world = np.stack((cos * acc_fwd - sin * acc_lat, sin * acc_fwd + cos * acc_lat), axis=-1)
    velocity = np.cumsum(world, axis=1) * DT
    position = np.cumsum(velocity, axis=1) * DT
    return at_chunk_ends(np.concatenate((position, velocity), axis=-1), chunk_size)


def dynamics_sensor_inversion(x: np.ndarray, chunk_size: int) -> np.ndarray:
    """Local reference for ``hidden_dynamics`` (no dynamics model, one chunk of history).
    x: [N, T, 3] (tanh_p, sin_2p, forcing) -> [N, T // C, 2] (p, v) at every chunk end.

    At each step of chunk k, p is the least-squares solution of tanh(p) = s1, sin(2p) = s2 (the best of a
    grid over [-4, 4] in steps of 0.005); a least-squares line through the C positions gives p and
    v = dp/dt at the chunk end."""
    chunks = _full_chunks(x, chunk_size)
    s1, s2 = chunks[..., 0], chunks[..., 1]
    grid = np.linspace(-4.0, 4.0, 1601)
    flat1, flat2 = s1.reshape(-1, 1), s2.reshape(-1, 1)
    p = np.empty(flat1.shape[0])
    for start in range(0, flat1.shape[0], 4096):  # bounded memory: 4096 x 1601 residuals at a time
        sl = slice(start, start + 4096)
        cost = (flat1[sl] - np.tanh(grid)) ** 2 + (flat2[sl] - np.sin(2 * grid)) ** 2
        p[sl] = grid[cost.argmin(axis=1)]
    p = p.reshape(s1.shape)
    t = (np.arange(chunk_size) - (chunk_size - 1)) * DT  # time relative to the chunk's last step
    t_mean = t.mean()
    p_mean = p.mean(axis=-1)
    slope = ((t - t_mean) * (p - p_mean[..., None])).sum(axis=-1) / max(((t - t_mean) ** 2).sum(), 1e-12)
    return np.stack((p_mean - slope * t_mean, slope), axis=-1)


#: task -> (description, estimator(x [N, T, D_in], chunk_size) -> [N, T // C, D_out] in raw target units).
REFERENCE_ESTIMATORS: dict[str, tuple[str, Callable[[np.ndarray, int], np.ndarray]]] = {
    "imu_integration": ("dead reckoning (exact double integration of the noisy IMU)", imu_dead_reckoning),
    "hidden_dynamics": ("sensor inversion (last chunk only, no dynamics model)", dynamics_sensor_inversion),
    **LONG_REFERENCE_ESTIMATORS,
}


SIGNAL_TASKS: dict[str, Callable[..., SignalTask]] = {
    "imu_integration": make_imu_integration,
    "hidden_dynamics": make_hidden_dynamics,
    **{name: functools.partial(make_signal_task, name) for name in LONG_SIMULATORS},
}
#: the two short tasks of ``hierseq bench signals``; the long ones are ``bench signals --long``'s.
SHORT_TASKS = ("imu_integration", "hidden_dynamics")


def make_signal_splits(
    name: str, n_train: int, n_val: int, n_test: int, seed: int = 0, **kwargs
) -> tuple[SignalTask, SignalTask, SignalTask]:
    """Train / validation / test sets of task ``name`` from one seed (disjoint sequences)."""
    for arg, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        check_positive_int(arg, value)
    task = make_signal_task(name, n_train + n_val + n_test, seed=seed, **kwargs)
    return (
        task.subset(slice(0, n_train)),
        task.subset(slice(n_train, n_train + n_val)),
        task.subset(slice(n_train + n_val, None)),
    )
