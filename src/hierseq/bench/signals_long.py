"""HiSS where it is meant to win: long, high-rate, many-channel sensor sequences
(:mod:`hierseq.data.long_signals`), quality and cost against flat models.

Tasks: ``imu9_odometry`` (9-axis IMU, 100 Hz; unwrapped heading and world velocity) and ``tactile_drift``
(4 x 4 tactile array with a drifting baseline; force, position and impulse). Sequences of ``length``
input steps (2,000 = 20 s by default), a target every 50 steps whatever the model's chunk size, so every
model is scored on the same targets.

Models (:data:`LONG_MODEL_SPECS`, all through the registry, matched to one parameter budget): HiSS with
chunks of 10 and 50, low level Mamba or LSTM, high level Mamba or Transformer, and one or two high-level
layers (the ablation of chunk size and high-level depth); the flat Mamba, LSTM and causal Transformer, and
the recurrent controls Gated DeltaNet and Mamba-2 as flat backbones. Flat models read out at the same
50-step grid.

Two budgets per model, each its own training run (two columns): **equal optimiser steps** (``steps``) and
**equal wall-clock** (``time_s`` of training, as many steps as fit). Each keeps its best validation epoch.
Reference rows as in ``bench signals``: the training mean, ridge regression on causal running sums, and
the task's physics-aware estimator.

Cost, per 1k input steps: training (the equal-steps run's seconds over the input steps it processed) and
inference (forward, no grad, batch 1, at ``cost_lengths``); streaming (:class:`~hierseq.models.hiss.ChunkStream`
for HiSS, the same push API for the flat models): milliseconds per 50-step push at stream positions
across ``stream_length``, flat in stream length for the recurrent models.

Run: ``hierseq bench signals --long [--seeds 0,1,2] [--threads 1]``; :func:`run_long_signals_bench`.
Writes ``signals_long.json``, ``signals_long.md`` and ``signals_long.png``.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.long_signals import LONG_SIMULATORS, OUTPUT_PERIOD
from ..registry import build_model
from .report import machine_facts, markdown_table, pyplot, write_report
from .signals import PAPER_CLAIM, is_hierarchical, model_run, prepare_task, reference_runs, select_runs, summarise

_MAMBA = {"low_level": "mamba", "high_level": "mamba", "n_low_layers": 1}

#: label -> (registry name, fixed overrides, chunk size).
LONG_MODEL_SPECS: dict[str, tuple[str, dict[str, Any], int]] = {
    "hiss_c10": ("hiss", {**_MAMBA, "n_layers": 1}, 10),
    "hiss_c50": ("hiss", {**_MAMBA, "n_layers": 1}, 50),
    "hiss_c50_h2": ("hiss", {**_MAMBA, "n_layers": 2}, 50),
    "hiss_c10_lstm": ("hiss", {**_MAMBA, "low_level": "lstm", "n_layers": 1}, 10),
    "hiss_c10_tf": ("hiss", {**_MAMBA, "high_level": "transformer", "n_layers": 1}, 10),
    "mamba": ("flat_regressor", {"backbone": "mamba", "n_layers": 2}, OUTPUT_PERIOD),
    "lstm": ("flat_regressor", {"backbone": "lstm", "n_layers": 2}, OUTPUT_PERIOD),
    "transformer": ("flat_regressor", {"backbone": "transformer", "n_layers": 2, "n_heads": 2}, OUTPUT_PERIOD),
    "gated_deltanet": ("flat_regressor", {"backbone": "gated_deltanet", "n_layers": 2}, OUTPUT_PERIOD),
    "mamba2": ("flat_regressor", {"backbone": "mamba2", "n_layers": 2}, OUTPUT_PERIOD),
}

LONG_MODEL_NOTES: dict[str, str] = {
    "hiss_c10": "HiSS, chunks of 10, Mamba low + 1 Mamba high layer",
    "hiss_c50": "HiSS, chunks of 50, Mamba low + 1 Mamba high layer",
    "hiss_c50_h2": "HiSS, chunks of 50, Mamba low + 2 Mamba high layers",
    "hiss_c10_lstm": "HiSS, chunks of 10, LSTM low + 1 Mamba high layer",
    "hiss_c10_tf": "HiSS, chunks of 10, Mamba low + 1 Transformer high layer",
    "mamba": "flat Mamba, 2 layers",
    "lstm": "flat LSTM, 2 layers",
    "transformer": "flat causal Transformer, 2 layers, 2 heads",
    "gated_deltanet": "flat Gated DeltaNet, 2 layers",
    "mamba2": "flat Mamba-2, 2 layers",
}

BUDGETS = ("steps", "time")

LONG_SETTINGS: dict[str, dict[str, Any]] = {
    "full": {
        "n_train": 256,
        "n_val": 32,
        "n_test": 64,
        "length": 2000,
        "epochs": 3,
        "batch_size": 8,
        "lr": 1e-2,
        "params": 20000,
        "time_s": 10.0,
        "cost_lengths": [2000, 20000],
        "stream_length": 20000,
    },
    "quick": {
        "n_train": 8,
        "n_val": 4,
        "n_test": 4,
        "length": 100,
        "epochs": 1,
        "batch_size": 4,
        "lr": 1e-2,
        "params": 3000,
        "time_s": 1.0,
        "cost_lengths": [100, 200],
        "stream_length": 200,
    },
}


@torch.no_grad()
def forward_ms_per_1k(model: torch.nn.Module, d_in: int, length: int, repeats: int = 3) -> float:
    """Median forward time (no grad, batch 1) over ``length`` input steps, in ms per 1k steps."""
    model.eval()
    x = torch.randn(1, length, d_in, generator=torch.Generator().manual_seed(0))
    model(x)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3 * 1000 / length


@torch.no_grad()
def stream_ms_per_push(model: torch.nn.Module, d_in: int, length: int, windows: int = 3) -> list[float]:
    """Median milliseconds per push of one output period (50 steps) through ``model.stream(1)``, in
    ``windows`` windows spread over a stream of ``length`` steps (the first, the middle, the last)."""
    model.eval()
    stream = model.stream(1)
    x = torch.randn(1, length, d_in, generator=torch.Generator().manual_seed(0))
    pushes = length // OUTPUT_PERIOD
    per_window = max(1, pushes // (4 * windows))
    marks = sorted({0, pushes // 2 - per_window // 2, pushes - per_window})
    times: dict[int, list[float]] = {m: [] for m in marks}
    for k in range(pushes):
        piece = x[:, k * OUTPUT_PERIOD : (k + 1) * OUTPUT_PERIOD]
        start = time.perf_counter()
        stream.push(piece)
        elapsed = time.perf_counter() - start
        for m in marks:
            if m <= k < m + per_window:
                times[m].append(elapsed)
    return [statistics.median(times[m]) * 1e3 for m in marks]


def cost_rows(tasks_overrides: dict[str, dict[str, Any]], setting: dict[str, Any], d_in: int) -> list[dict[str, Any]]:
    """Inference and streaming cost of every model at its matched size for one task's input width."""
    rows = []
    for label, over in tasks_overrides.items():
        model = build_model(LONG_MODEL_SPECS[label][0], **over)
        row = {"model": label, "d_model": over["d_model"]}
        for length in setting["cost_lengths"]:
            row[f"infer_ms_per_1k@{length}"] = forward_ms_per_1k(model, d_in, length)
        row["stream_ms_per_push"] = stream_ms_per_push(model, d_in, setting["stream_length"])
        rows.append(row)
    return rows


def _budget_rows(runs: list[dict[str, Any]], budget: str) -> list[dict[str, Any]]:
    picked = [r for r in runs if r["kind"] == "reference" or r.get("budget") == budget]
    return summarise(picked, LONG_MODEL_SPECS)


def long_verdicts(
    rows_by_budget: dict[str, list[dict[str, Any]]], train_cost: dict[str, dict[str, float]]
) -> dict[str, str]:
    """task -> for each budget, the best HiSS variant against the best flat model, whether that is the
    paper's >= 23% lower MSE, and their training-cost ratio (ms per 1k input steps)."""
    out: dict[str, list[str]] = {}
    for budget, rows in rows_by_budget.items():
        for task in dict.fromkeys(r["task"] for r in rows):
            first = next(r for r in rows if r["task"] == task)
            if "best_flat" not in first:
                continue
            change = first["hiss_vs_best_flat"]
            best_flat = next(r for r in rows if r["task"] == task and r["model"] == first["best_flat"])
            reproduced = "reproduced" if change <= PAPER_CLAIM else "not reproduced"
            hiss_cost, flat_cost = (
                train_cost.get(first[k], {}).get("train_ms_per_1k") for k in ("best_hiss", "best_flat")
            )
            ratio = f", at {hiss_cost / flat_cost:.2f}x its training cost" if hiss_cost and flat_cost else ""
            out.setdefault(task, []).append(
                f"equal {budget}: best HiSS ({first['best_hiss']}) {change * 100:+.1f}% MSE against the best flat "
                f"model ({first['best_flat']}, {best_flat['test_mse_mean']:.4f}){ratio}: **{reproduced}**"
            )
    return {task: "; ".join(parts) + "." for task, parts in out.items()}


def _cost_by_model(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """model -> training ms per 1k input steps (equal-steps runs, mean over tasks and seeds)."""
    out: dict[str, list[float]] = {}
    for r in runs:
        if r["kind"] == "model" and r.get("budget") == "steps":
            out.setdefault(r["model"], []).append(r["train_ms_per_1k"])
    return {m: {"train_ms_per_1k": statistics.fmean(v)} for m, v in out.items()}


def to_markdown(report: dict[str, Any]) -> str:
    meta, s = report["meta"], report["meta"]["setting"]
    lines = [
        "# HiSS vs flat models on long, high-rate sensor sequences",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['machine']['date']}; {meta['machine']['cpus']} CPUs, {meta['machine']['threads']} torch "
        f"thread(s), load average {meta['load_before']:.2f} before / {meta['load_after']:.2f} after; total wall "
        f"time {meta['seconds'] / 60:.1f} min.  ",
        f"Mode: {meta['mode']}; seeds {meta['seeds']}; {s['n_train']} / {s['n_val']} / {s['n_test']} sequences of "
        f"{s['length']} steps (100 Hz), a target every {OUTPUT_PERIOD} steps; equal steps: {s['epochs']} epochs of "
        f"batch {s['batch_size']}; equal time: {s['time_s']:g} s of training each; lr {s['lr']:g}, cosine to 10%, "
        f"best validation epoch kept; parameter budget {s['params']}."
        + (" **Quick mode: a smoke run, the numbers mean nothing.**" if meta["mode"] == "quick" else ""),
        "",
        "Models: " + "; ".join(f"{k} = {v}" for k, v in LONG_MODEL_NOTES.items() if k in meta["models"]) + ".",
        "",
    ]
    steps_rows, time_rows = report["rows"]["steps"], report["rows"]["time"]
    time_index = {(r["task"], r["model"]): r for r in time_rows}
    train_cost = report["train_cost"]
    table = []
    for r in steps_rows:
        other = time_index.get((r["task"], r["model"]))
        is_model = r["kind"] == "model"
        table.append(
            [
                r["task"],
                r["model"] if is_model else f"*{r['model']}* (reference)",
                str(r["params"]) if is_model else "-",
                f"{r['test_mse_mean']:.4f} +- {r['test_mse_std']:.4f}",
                f"{r['vs_best_flat'] * 100:+.1f}%" if "vs_best_flat" in r else "",
                f"{other['test_mse_mean']:.4f} +- {other['test_mse_std']:.4f}" if is_model and other else "",
                f"{other['vs_best_flat'] * 100:+.1f}%" if other and "vs_best_flat" in other else "",
                f"{train_cost[r['model']]['train_ms_per_1k']:.1f}" if is_model and r["model"] in train_cost else "",
            ]
        )
    lines.append(
        markdown_table(
            [
                "task",
                "model",
                "params",
                "test MSE, equal steps",
                "vs best flat",
                "test MSE, equal time",
                "vs best flat",
                "train ms / 1k steps",
            ],
            table,
        )
    )
    lines += ["", *(f"- {task}: {text}" for task, text in report["verdicts"].items()), ""]
    cost = report["cost"]
    lengths = report["meta"]["setting"]["cost_lengths"]
    lines += [
        f"Inference cost (forward, no grad, batch 1, ms per 1k input steps) and streaming latency (ms per "
        f"{OUTPUT_PERIOD}-step push at the start / middle / end of a {s['stream_length']}-step stream), "
        f"at the sizes matched for {cost['task']}:",
        "",
        markdown_table(
            ["model", "d_model", *(f"infer @{n}" for n in lengths), "stream ms/push (start / mid / end)"],
            [
                [
                    r["model"],
                    str(r["d_model"]),
                    *(f"{r[f'infer_ms_per_1k@{n}']:.2f}" for n in lengths),
                    " / ".join(f"{t:.2f}" for t in r["stream_ms_per_push"]),
                ]
                for r in cost["rows"]
            ],
        ),
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> bool:
    """Per task: test MSE (equal steps and equal time, log scale) against training ms per 1k input steps,
    HiSS variants in red, flat models in blue, references as lines. False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    tasks = list(dict.fromkeys(r["task"] for r in report["rows"]["steps"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    cost = report["train_cost"]
    for ax, task in zip(axes[0], tasks):
        for budget, marker in (("steps", "o"), ("time", "s")):
            for r in report["rows"][budget]:
                if r["task"] != task or r["kind"] != "model" or r["model"] not in cost:
                    continue
                color = "tab:red" if is_hierarchical(r["model"], LONG_MODEL_SPECS) else "tab:blue"
                ax.errorbar(
                    cost[r["model"]]["train_ms_per_1k"],
                    r["test_mse_mean"],
                    yerr=r["test_mse_std"],
                    fmt=marker,
                    color=color,
                )
                if budget == "steps":
                    ax.annotate(r["model"], (cost[r["model"]]["train_ms_per_1k"], r["test_mse_mean"]), fontsize=7)
        for r in report["rows"]["steps"]:
            if r["task"] == task and r["kind"] == "reference":
                ax.axhline(r["test_mse_mean"], linestyle=":", color="gray")
                ax.annotate(r["model"], (ax.get_xlim()[0], r["test_mse_mean"]), fontsize=7, color="gray")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training ms per 1k input steps")
        ax.set_ylabel("test MSE (standardised); o equal steps, s equal time")
        ax.set_title(task)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_long_signals_bench(
    out_dir: str | Path = "runs/bench/signals_long",
    quick: bool = False,
    seeds: Sequence[int] = (0, 1, 2),
    tasks: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
    threads: int | None = None,
    command: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and test every (task, seed, model, budget), the references, and the cost rows; write the
    report (JSON + Markdown + PNG) to ``out_dir``. Returns the report dict."""
    setting = dict(LONG_SETTINGS["quick" if quick else "full"])
    task_list, model_list = select_runs(tasks, models, seeds, threads, list(LONG_SIMULATORS), list(LONG_MODEL_SPECS))
    command = command or "hierseq bench signals --long" + (" --quick" if quick else "")
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    chunk_sizes = sorted({LONG_MODEL_SPECS[m][2] for m in model_list} | {OUTPUT_PERIOD})
    total, done = len(task_list) * len(seeds) * len(model_list) * len(BUDGETS), 0
    matched: dict[str, dict[str, Any]] = {}
    d_in_first = 0
    for task in task_list:
        for seed in seeds:
            data = {c: prepare_task(task, seed, {**setting, "chunk_size": c}) for c in chunk_sizes}
            runs += reference_runs(task, seed, data[OUTPUT_PERIOD])
            for label in model_list:
                name, fixed, chunk = LONG_MODEL_SPECS[label]
                for budget in BUDGETS:
                    run_dir = Path(out_dir) / "runs" / f"{task}-{label}-{budget}-seed{seed}"
                    limits = {"max_time_s": setting["time_s"], "max_steps": 10**6} if budget == "time" else {}
                    run = model_run(
                        task,
                        label,
                        seed,
                        data[chunk],
                        {**setting, "chunk_size": chunk},
                        run_dir,
                        spec=(name, fixed),
                        **limits,
                    )
                    run["budget"] = budget
                    run["train_ms_per_1k"] = (
                        run["train_seconds"] * 1e6 / (run["steps"] * setting["batch_size"] * setting["length"])
                    )
                    runs.append(run)
                    done += 1
                    if task == task_list[0] and seed == seeds[0]:
                        matched[label] = run["overrides"]
                        d_in_first = data[chunk].train.x.shape[-1]
                    if progress:
                        elapsed = time.perf_counter() - start
                        left = elapsed / done * (total - done)
                        print(
                            f"[signals --long {done}/{total} {elapsed / 60:.1f} min, ~{left / 60:.1f} min left] {task} "
                            f"seed {seed} {label} ({budget}): test MSE {run['test_mse']:.4f} "
                            f"({run['params']} params, {run['steps']} steps, {run['train_seconds']:.1f} s)",
                            flush=True,
                        )
    cost = {"task": task_list[0], "rows": cost_rows(matched, setting, d_in_first)}
    rows = {budget: _budget_rows(runs, budget) for budget in BUDGETS}
    meta = {
        "command": command,
        "mode": "quick" if quick else "full",
        "seeds": list(seeds),
        "models": model_list,
        "setting": setting,
        "machine": machine_facts(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "seconds": time.perf_counter() - start,
    }
    train_cost = _cost_by_model(runs)
    report = {
        "meta": meta,
        "rows": rows,
        "verdicts": long_verdicts(rows, train_cost),
        "train_cost": train_cost,
        "cost": cost,
        "runs": runs,
    }
    return write_report(
        out_dir, "signals_long", report, to_markdown(report), plot=lambda p: plot(report, p), echo=progress
    )


__all__ = ["LONG_MODEL_SPECS", "run_long_signals_bench"]
