"""Shared timing plumbing for the speed-type benchmarks: wall-clock one call (synchronising CUDA), and
sweep a measurement over growing sizes with a time budget, recording out-of-memory and budget stops
as a row status instead of crashing the whole run."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes on ``device`` (CUDA work is synchronised before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def time_alternated(
    steps: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds of each step in each of ``repeats`` rounds, after one warm-up call each; every round runs
    the steps one after the other, so load changes on a shared machine hit all of them alike."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(time_call(step, device))
    return times


def is_out_of_memory(error: BaseException) -> bool:
    """True for a CPU ``MemoryError`` or a torch out-of-memory error (CUDA or CPU allocator)."""
    return isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def predicted_peak(rows: Sequence[dict], point: int, key: str, mem_key: str) -> float | None:
    """Peak memory at ``point`` extrapolated from the ok rows measured so far: a power law through the
    last two (its exponent clamped to [1, 2]), or quadratic growth from a single one. None before any."""
    done = [(r[key], r[mem_key]) for r in rows if r.get("status") == "ok" and r.get(mem_key, 0) > 0]
    if not done:
        return None
    (p1, m1), exponent = done[-1], 2.0
    if len(done) >= 2 and done[-2][0] < p1:
        p0, m0 = done[-2]
        exponent = min(2.0, max(1.0, math.log(m1 / m0) / math.log(p1 / p0)))
    return m1 * (point / p1) ** exponent


def budgeted_sweep(
    points: Sequence[int],
    measure: Callable[[int], dict],
    time_budget_s: float,
    key: str = "length",
    desc: str | None = None,
    memory_limit_mb: float | None = None,
    mem_key: str = "peak_mem_mb",
) -> list[dict]:
    """Run ``measure(point)`` for each point in order; each call returns a row dict.

    After an out-of-memory error the row says ``status: "oom"`` and every later (larger) point is
    recorded with the same status without running it; once the calls together took more than
    ``time_budget_s`` seconds the later points get ``status: "time budget"``. With ``memory_limit_mb``
    a point whose extrapolated peak (:func:`predicted_peak` over the rows' ``mem_key``) exceeds it is
    not run and gets ``status: "predicted oom"``, as do the later ones: on CPU an allocation past the
    machine's memory is not an error but a kill of the whole process by the kernel. Every row carries
    ``{key: point}``. Errors other than out-of-memory propagate."""
    rows: list[dict] = []
    spent, stopped = 0.0, None
    for point in tqdm(points, desc=desc, leave=False, disable=desc is None):
        if not stopped and memory_limit_mb is not None:
            guess = predicted_peak(rows, point, key, mem_key)
            if guess is not None and guess > memory_limit_mb:
                stopped = "predicted oom"
        if stopped:
            rows.append({key: point, "status": stopped})
            continue
        t0 = time.perf_counter()
        try:
            row = measure(point)
        except (RuntimeError, MemoryError) as e:
            if not is_out_of_memory(e):
                raise
            stopped = "oom"
            row = {"status": "oom"}
        rows.append({key: point, **row})
        spent += time.perf_counter() - t0
        if not stopped and spent > time_budget_s:
            stopped = "time budget"
    return rows


def add_control_ratios(
    results: dict[str, list[dict]], point_key: str, field: str, ratio_key: str, control: str = "transformer"
) -> None:
    """For every ok row whose ``point_key`` value (length, context) the ``control`` model also ran ok,
    set ``row[ratio_key] = row[field] / control_row[field]`` (None when the control's value is 0).

    results: model label -> sweep rows as returned by :func:`budgeted_sweep`."""
    base = {r[point_key]: r[field] for r in results.get(control, []) if r["status"] == "ok"}
    for rows in results.values():
        for r in rows:
            if r["status"] == "ok" and r[point_key] in base:
                r[ratio_key] = r[field] / base[r[point_key]] if base[r[point_key]] > 0 else None
