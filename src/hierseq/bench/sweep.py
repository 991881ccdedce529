"""Shared timing plumbing for the speed-type benchmarks: wall-clock one call (synchronising CUDA), and
sweep a measurement over growing sizes with a time budget, recording out-of-memory and budget stops
as a row status instead of crashing the whole run."""

from __future__ import annotations

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


def budgeted_sweep(
    points: Sequence[int],
    measure: Callable[[int], dict],
    time_budget_s: float,
    key: str = "length",
    desc: str | None = None,
) -> list[dict]:
    """Run ``measure(point)`` for each point in order; each call returns a row dict.

    After an out-of-memory error the row says ``status: "oom"`` and every later (larger) point is
    recorded with the same status without running it; once the calls together took more than
    ``time_budget_s`` seconds the later points get ``status: "time budget"``. Every row carries
    ``{key: point}``. Errors other than out-of-memory propagate."""
    rows: list[dict] = []
    spent, stopped = 0.0, None
    for point in tqdm(points, desc=desc, leave=False, disable=desc is None):
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
