"""Long, high-rate sensor tasks (the regime HiSS is for): thousands of input steps at 100 Hz, many
channels, a low-rate target that depends on the whole history. Seeded and offline like
:mod:`hierseq.data.signals`, whose :class:`~hierseq.data.signals.SignalTask` container and chunk alignment
they share (target k is the true value at the last step of chunk k).

* ``imu9_odometry``: a rigid body tumbling in 3-D and pushed by smooth random thrust against drag, seen
  by a 9-axis IMU: a 3-axis accelerometer (specific force in the body frame, gravity included), a 3-axis
  gyroscope with a per-sequence bias that drifts as a random walk, and a calibrated 3-axis
  magnetometer. Target: world-frame displacement from the start and world-frame velocity
  [px, py, pz, vx, vy, vz]. The velocity integrates every past acceleration rotated by an orientation
  that itself integrates every past angular rate, so the target depends on the whole sequence; the
  magnetometer and gravity make the orientation observable at each step, which a good model uses to
  cancel the gyro drift.
* ``tactile_drift``: a 4 x 4 tactile array (16 channels) touched by contacts that come and go, press
  with a smooth force and slide across the array. Each taxel responds to the force through a Gaussian
  footprint around the contact point and a saturating transduction, on top of a baseline that drifts
  (a common thermal drift plus a per-taxel random walk) and white noise. Target: the contact force, the
  force-weighted contact position and the impulse (the integral of the force) since the start
  [F, F*cx, F*cy, impulse]. The baseline is only observable when nothing touches the array, and the
  impulse integrates the whole sequence.

Reference estimators (:data:`LONG_REFERENCE_ESTIMATORS`), physics-aware and reading only the noisy
inputs with the same causal alignment:

* ``imu9_odometry``: a complementary filter and strapdown integration - propagate the orientation with
  the gyro as the generator does, pull it a little towards the orientation that gravity and the
  magnetic field give at that step (which cancels the gyro drift; the thrust perturbs that estimate),
  rotate the specific force into the world frame, remove gravity, integrate twice.
* ``tactile_drift``: track the baseline as an exponential average while the array reads as untouched,
  invert the saturation, and read the force and position off the baseline-free footprint; integrate
  the force for the impulse.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .signal_common import ar1_noise, at_chunk_ends, drag_limited_velocity

SAMPLE_RATE_HZ = 100.0
DT = 1.0 / SAMPLE_RATE_HZ
GRAVITY = np.array([0.0, 0.0, -9.81])  # world frame, m/s^2
MAGNETIC_FIELD = np.array([0.2, 0.0, -0.45])  # world frame, normalised units (a field with a dip)
TAXEL_GRID = 4  # the tactile array is TAXEL_GRID x TAXEL_GRID
FOOTPRINT_SIGMA = 0.8  # taxel pitches
SATURATION = 2.0  # transduction saturates at this reading
OUTPUT_PERIOD = 50  # input steps per target (2 Hz at 100 Hz): a chunk is labelled when it ends on this grid


def rotation_step(rates: np.ndarray) -> np.ndarray:
    """The body-frame rotation over one sample at angular rates ``rates``: [N, 3] rad/s -> [N, 3, 3]
    (Rodrigues' formula for exp([rates * DT]_x))."""
    angle_vec = rates * DT
    angle = np.linalg.norm(angle_vec, axis=-1, keepdims=True)
    axis = angle_vec / np.maximum(angle, 1e-12)
    x, y, z = axis[:, 0], axis[:, 1], axis[:, 2]
    zero = np.zeros_like(x)
    skew = np.stack((zero, -z, y, z, zero, -x, -y, x, zero), axis=-1).reshape(-1, 3, 3)
    s, c = np.sin(angle)[..., None], np.cos(angle)[..., None]
    return np.eye(3) + s * skew + (1 - c) * skew @ skew


def euler_to_matrix(roll: np.ndarray, pitch: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    """Body -> world rotations R = Rz(yaw) Ry(pitch) Rx(roll): angles [...] -> [..., 3, 3]."""
    cr, sr, cp, sp, cy, sy = np.cos(roll), np.sin(roll), np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw)
    rows = (
        (cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr),
        (sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr),
        (-sp, cp * sr, cp * cr),
    )
    return np.stack([np.stack(row, axis=-1) for row in rows], axis=-2)


def rotation_rates(orientation: np.ndarray) -> np.ndarray:
    """Body-frame angular rates [N, T, 3] that carry orientation[:, t] to orientation[:, t + 1] in one
    sample (the inverse of :func:`rotation_step`; the last step repeats the one before).
    orientation: [N, T, 3, 3] body -> world."""
    relative = orientation[:, :-1].swapaxes(-1, -2) @ orientation[:, 1:]
    cos_angle = np.clip((np.trace(relative, axis1=-2, axis2=-1) - 1) / 2, -1.0, 1.0)
    angle = np.arccos(cos_angle)
    vee = np.stack(
        (
            relative[..., 2, 1] - relative[..., 1, 2],
            relative[..., 0, 2] - relative[..., 2, 0],
            relative[..., 1, 0] - relative[..., 0, 1],
        ),
        axis=-1,
    )
    scale = np.where(angle > 1e-9, angle / np.maximum(2 * np.sin(angle), 1e-12), 0.5)
    rates = vee * scale[..., None] / DT
    return np.concatenate((rates, rates[:, -1:]), axis=1)


def _simulate_imu9(rng: np.random.Generator, n: int, length: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """-> (sensors [N, T, 9] (acc xyz, gyro xyz, mag xyz; body frame), states [N, T, 6]
    (unwrapped yaw, its cosine and sine, vx, vy, vz; world frame))."""
    # The body starts level, at yaw 0 and at rest (what the reference assumes), wobbles in roll and pitch
    # but stays upright, and turns freely in yaw, so the turns add up.
    decay = 0.998 ** np.arange(length)
    roll, pitch = (w - w[:, :1] * decay for w in (ar1_noise(rng, (n, length), 0.998, 0.25) for _ in range(2)))
    yaw_rate = ar1_noise(rng, (n, length), corr=0.995, scale=0.8)
    yaw = np.concatenate((np.zeros((n, 1)), np.cumsum(yaw_rate[:, :-1], axis=1) * DT), axis=1)
    orientation = euler_to_matrix(roll, pitch, yaw)  # [N, T, 3, 3]
    rates = rotation_rates(orientation)
    thrust = ar1_noise(rng, (n, length, 3), corr=0.99, scale=1.5) * np.array([1.0, 1.0, 0.3])  # body, m/s^2
    thrust[..., 0] += 0.5  # a tendency to move forwards
    world_thrust = np.einsum("ntij,ntj->nti", orientation, thrust)
    drag = rng.uniform(0.2, 0.6, size=(n, 1))  # 1/s, unobserved
    velocity, accel = drag_limited_velocity(world_thrust, drag, DT)  # accel: world frame
    to_body = orientation.swapaxes(-1, -2)
    # The gyro bias (a constant plus a random walk) scales with ``noise``: noise 0 is an ideal IMU.
    gyro_bias = rng.normal(0.0, 0.1 * noise, size=(n, 1, 3)) + np.cumsum(
        rng.normal(0.0, 2e-3 * noise, size=(n, length, 3)), axis=1
    )
    sensors = np.concatenate(
        (
            np.einsum("ntij,ntj->nti", to_body, accel - GRAVITY),
            rates + gyro_bias,
            to_body @ MAGNETIC_FIELD,
        ),
        axis=-1,
    )
    sensors += rng.normal(0.0, noise, size=sensors.shape) * np.array([4.0] * 3 + [0.2] * 3 + [0.2] * 3)
    return sensors, np.concatenate((np.stack((yaw, np.cos(yaw), np.sin(yaw)), axis=-1), velocity), axis=-1)


def _footprint(cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
    """Gaussian footprint of contacts at (cx, cy) [N, T] (taxel pitches) -> [N, T, TAXEL_GRID**2]."""
    grid = np.arange(TAXEL_GRID, dtype=np.float64)
    gx, gy = np.meshgrid(grid, grid, indexing="ij")
    d2 = (cx[..., None] - gx.ravel()) ** 2 + (cy[..., None] - gy.ravel()) ** 2
    return np.exp(-d2 / (2 * FOOTPRINT_SIGMA**2))


def _simulate_tactile(rng: np.random.Generator, n: int, length: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """-> (sensors [N, T, 16] taxel readings, states [N, T, 4] (F, F*cx, F*cy, impulse))."""
    # Contacts: a two-state Markov chain with mean dwell 1.5 s touching and 1 s released.
    p_release, p_touch = DT / 1.5, DT / 1.0
    touching = np.zeros((n, length), dtype=bool)
    state = rng.random(n) < 0.5
    flips = rng.random((n, length))
    for t in range(length):
        state = np.where(state, flips[:, t] >= p_release, flips[:, t] < p_touch)
        touching[:, t] = state
    force = np.log1p(np.exp(ar1_noise(rng, (n, length), corr=0.995, scale=1.0) + 1.0)) * touching  # newtons
    centre = (TAXEL_GRID - 1) / 2 + ar1_noise(rng, (n, length, 2), corr=0.998, scale=0.9)
    centre = np.clip(centre, 0.0, TAXEL_GRID - 1.0)
    response = force[..., None] * _footprint(centre[..., 0], centre[..., 1])
    reading = SATURATION * np.tanh(response / SATURATION)
    # The baseline drifts (thermal + per taxel) in proportion to ``noise``: noise 0 is a stable sensor.
    thermal = np.cumsum(rng.normal(0.0, 0.08 * noise, size=(n, length, 1)), axis=1)
    per_taxel = np.cumsum(rng.normal(0.0, 0.04 * noise, size=(n, length, TAXEL_GRID**2)), axis=1)
    offset = rng.normal(0.0, 0.2, size=(n, 1, TAXEL_GRID**2))
    sensors = reading + offset + thermal + per_taxel + rng.normal(0.0, noise, size=reading.shape)
    impulse = np.cumsum(force, axis=1) * DT
    states = np.stack((force, force * centre[..., 0], force * centre[..., 1], impulse), axis=-1)
    return sensors, states


LongSimulator = Callable[[np.random.Generator, int, int, float], tuple[np.ndarray, np.ndarray]]

#: task -> (simulator(rng, n, length, noise) -> (sensors, states), input names, target names).
LONG_SIMULATORS: dict[str, tuple[LongSimulator, tuple[str, ...], tuple[str, ...]]] = {
    "imu9_odometry": (
        _simulate_imu9,
        tuple(f"{kind}_{axis}" for kind in ("acc", "gyro", "mag") for axis in "xyz"),
        ("yaw", "cos_yaw", "sin_yaw", "vx", "vy", "vz"),
    ),
    "tactile_drift": (
        _simulate_tactile,
        tuple(f"taxel_{i}_{j}" for i in range(TAXEL_GRID) for j in range(TAXEL_GRID)),
        ("force", "force_cx", "force_cy", "impulse"),
    ),
}


def _triad(up: np.ndarray, north: np.ndarray) -> np.ndarray:
    """Orthonormal frames [N, 3, 3] (columns) from an "up" and a "north-ish" direction [N, 3]."""
    first = up / np.linalg.norm(up, axis=-1, keepdims=True)
    second = np.cross(first, north)
    second /= np.maximum(np.linalg.norm(second, axis=-1, keepdims=True), 1e-12)
    return np.stack((first, second, np.cross(first, second)), axis=-1)


def complementary_dead_reckoning(x: np.ndarray, chunk_size: int, gain: float = 0.01) -> np.ndarray:
    """Reference for ``imu9_odometry``. x: [N, T, 9] -> [N, T // C, 6] (yaw, cos, sin, v) at every chunk end. Each
    step the gyro-propagated orientation moves a fraction ``gain`` towards the gravity / magnetometer
    orientation and is re-orthonormalised (polar decomposition)."""
    x = np.asarray(x, dtype=np.float64)
    n, length, _ = x.shape
    world_frame = _triad(-GRAVITY[None], MAGNETIC_FIELD[None])  # [1, 3, 3]
    orientation = np.broadcast_to(np.eye(3), (n, 3, 3)).copy()  # body -> world
    v = np.zeros((n, 3))
    heading = np.empty((n, length))
    velocity = np.empty((n, length, 3))
    for t in range(length):
        if gain:
            measured = world_frame @ _triad(x[:, t, 0:3], x[:, t, 6:9]).transpose(0, 2, 1)
            u, _, vt = np.linalg.svd(orientation + gain * (measured - orientation))
            orientation = u @ vt
        v = v + (np.einsum("nij,nj->ni", orientation, x[:, t, 0:3]) + GRAVITY) * DT
        velocity[:, t] = v
        heading[:, t] = np.arctan2(orientation[:, 1, 0], orientation[:, 0, 0])
        orientation = orientation @ rotation_step(x[:, t, 3:6])
    yaw = np.unwrap(heading, axis=1)
    states = np.concatenate((np.stack((yaw, np.cos(yaw), np.sin(yaw)), axis=-1), velocity), axis=-1)
    return at_chunk_ends(states, chunk_size)


def tactile_baseline_tracking(x: np.ndarray, chunk_size: int, touch_threshold: float = 0.4) -> np.ndarray:
    """Reference for ``tactile_drift``. x: [N, T, 16] -> [N, T // C, 4] (F, F*cx, F*cy, impulse) at every
    chunk end. The baseline starts at the first reading and follows an exponential average (time
    constant 0.5 s) while the summed baseline-free reading stays under ``touch_threshold``."""
    x = np.asarray(x, dtype=np.float64)
    n, length, channels = x.shape
    alpha = DT / 0.5
    baseline = x[:, 0].copy()
    free = np.empty_like(x)
    for t in range(length):
        free[:, t] = x[:, t] - baseline
        untouched = np.abs(free[:, t]).sum(axis=-1, keepdims=True) < touch_threshold
        baseline = np.where(untouched, baseline + alpha * free[:, t], baseline)
    response = SATURATION * np.arctanh(np.clip(free / SATURATION, 0.0, 0.995))
    grid = np.arange(TAXEL_GRID, dtype=np.float64)
    gx, gy = (g.ravel() for g in np.meshgrid(grid, grid, indexing="ij"))
    mass = response.sum(axis=-1)
    cx = (response * gx).sum(axis=-1) / np.maximum(mass, 1e-9)
    cy = (response * gy).sum(axis=-1) / np.maximum(mass, 1e-9)
    force = mass / _footprint(cx, cy).sum(axis=-1)
    impulse = np.cumsum(force, axis=1) * DT
    return at_chunk_ends(np.stack((force, force * cx, force * cy, impulse), axis=-1), chunk_size)


#: task -> (description, estimator(x [N, T, D_in], chunk_size) -> [N, T // C, D_out] in raw target units).
LONG_REFERENCE_ESTIMATORS: dict[str, tuple[str, Callable[[np.ndarray, int], np.ndarray]]] = {
    "imu9_odometry": ("complementary filter + strapdown integration", complementary_dead_reckoning),
    "tactile_drift": ("baseline tracking while untouched, inverted saturation", tactile_baseline_tracking),
}
