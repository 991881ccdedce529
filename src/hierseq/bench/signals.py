"""HiSS vs flat controls on the synthetic continuous sequence-to-sequence tasks (``data/signals.py``).

Models (all through the registry, at matched parameter counts, same data, same training budget and
schedule): ``hiss`` (Mamba low level over chunks, Mamba high level over chunk features) and the flat
``flat_regressor`` with a Mamba, LSTM or causal Transformer backbone. Every model's prediction for
chunk k sees exactly the inputs up to the end of chunk k (the flat models read out at the chunk's last
step), which the HiSS paper's own comparison did not ensure.

Reported: test MSE in standardised target units (mean +- std over seeds; each seed re-draws the data,
the initialisation and the batch order), the parameter count, training time, and HiSS's relative
change against the best flat model (the paper claims >= 23% lower MSE on its real CSP-Bench data).

Entry point: :func:`run_signals_bench` (the ``hierseq bench signals`` command calls it).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.signals import SIGNAL_TASKS, make_signal_splits
from ..registry import build_model, count_parameters
from ..training.regression import (
    RegressionPreprocessor,
    RegressionTrainConfig,
    evaluate_regression,
    train_regression,
)

#: model label -> (registry name, fixed overrides); d_model is chosen to match the parameter budget.
MODEL_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "hiss": ("hiss", {"low_level": "mamba", "high_level": "mamba", "n_low_layers": 1, "n_layers": 1}),
    "mamba": ("flat_regressor", {"backbone": "mamba", "n_layers": 2}),
    "lstm": ("flat_regressor", {"backbone": "lstm", "n_layers": 2}),
    "transformer": ("flat_regressor", {"backbone": "transformer", "n_layers": 2, "n_heads": 2}),
}

#: full / quick settings: data sizes, training length, parameter budget.
SETTINGS: dict[str, dict[str, Any]] = {
    "full": {"n_train": 192, "n_val": 64, "n_test": 128, "length": 500, "epochs": 6, "params": 20000},
    "quick": {"n_train": 32, "n_val": 8, "n_test": 8, "length": 60, "epochs": 2, "params": 3000},
}


def matched_overrides(label: str, d_in: int, d_out: int, chunk_size: int, budget: int) -> dict[str, Any]:
    """Overrides for model ``label`` whose parameter count is closest to ``budget`` (width searched in
    steps of 4, which keeps Transformer heads even)."""
    name, fixed = MODEL_SPECS[label]
    base = {**fixed, "d_in": d_in, "d_out": d_out, "chunk_size": chunk_size}
    best: tuple[int, dict[str, Any]] | None = None
    for width in range(4, 513, 4):
        over = {**base, "d_model": width}
        params = count_parameters(build_model(name, **over))
        if best is None or abs(params - budget) < abs(best[0] - budget):
            best = (params, over)
        if params > budget:
            break
    assert best is not None
    return best[1]


def _one_run(task: str, label: str, seed: int, setting: dict[str, Any]) -> dict[str, Any]:
    train_set, val_set, test_set = make_signal_splits(
        task, setting["n_train"], setting["n_val"], setting["n_test"], seed=1000 + seed, length=setting["length"]
    )
    cfg = RegressionTrainConfig(epochs=setting["epochs"], seed=seed)
    prep = RegressionPreprocessor(cfg.first_differences, cfg.normalize_inputs, cfg.normalize_targets)
    prep.fit(train_set.x, train_set.y, train_set.mask)
    train, val, test = (prep.transform(s.x, s.y, s.mask) for s in (train_set, val_set, test_set))
    name, _ = MODEL_SPECS[label]
    over = matched_overrides(
        label, prep.input_dim(train_set.d_in), train_set.d_out, train_set.chunk_size, setting["params"]
    )
    torch.manual_seed(seed)
    model = build_model(name, **over)
    fit = train_regression(model, train, val, cfg)
    return {
        "task": task,
        "model": label,
        "registry_name": name,
        "seed": seed,
        "overrides": over,
        "params": count_parameters(model),
        "test_mse": evaluate_regression(model, test),
        "best_val_mse": fit["best_val_mse"],
        "best_epoch": fit["best_epoch"],
        "train_seconds": fit["seconds"],
        "history": fit["history"],
    }


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, model): mean / std of the test MSE over seeds, params, mean train time."""
    rows = []
    keys = sorted({(r["task"], r["model"]) for r in runs}, key=lambda k: (k[0], list(MODEL_SPECS).index(k[1])))
    for task, label in keys:
        group = [r for r in runs if r["task"] == task and r["model"] == label]
        mses = [r["test_mse"] for r in group]
        rows.append(
            {
                "task": task,
                "model": label,
                "params": group[0]["params"],
                "seeds": len(group),
                "test_mse_mean": statistics.fmean(mses),
                "test_mse_std": statistics.stdev(mses) if len(mses) > 1 else 0.0,
                "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in group),
            }
        )
    for task in {r["task"] for r in rows}:
        task_rows = [r for r in rows if r["task"] == task]
        flat = [r for r in task_rows if r["model"] != "hiss"]
        hiss = [r for r in task_rows if r["model"] == "hiss"]
        if flat and hiss:
            best_flat = min(flat, key=lambda r: r["test_mse_mean"])
            change = hiss[0]["test_mse_mean"] / best_flat["test_mse_mean"] - 1.0
            for r in task_rows:
                r["best_flat"] = best_flat["model"]
                r["hiss_vs_best_flat"] = change
    return rows


def to_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# HiSS vs flat models on synthetic sensor tasks",
        "",
        f"Command: `{meta['command']}`  ",
        f"Mode: {meta['mode']}; seeds {meta['seeds']}; {meta['setting']['epochs']} epochs; "
        f"{meta['setting']['n_train']} train / {meta['setting']['n_test']} test sequences of "
        f"{meta['setting']['length']} steps (50 Hz), one target per 10 steps; parameter budget "
        f"{meta['setting']['params']}; machine {meta['machine']}; total {meta['seconds']:.0f} s.",
        "",
        "Test MSE in standardised target units (1.0 = predicting the training mean); mean +- std over seeds.",
        "Every model's prediction for chunk k sees inputs up to the end of chunk k.",
        "",
        "| task | model | params | test MSE | train s/run |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['model']} | {r['params']} | {r['test_mse_mean']:.4f} +- {r['test_mse_std']:.4f} "
            f"| {r['train_seconds_mean']:.1f} |"
        )
    lines.append("")
    for task in sorted({r["task"] for r in rows}):
        r = next(r for r in rows if r["task"] == task)
        if "hiss_vs_best_flat" in r:
            change = r["hiss_vs_best_flat"]
            verdict = "lower" if change < 0 else "higher"
            lines.append(
                f"- {task}: HiSS MSE is {abs(change) * 100:.1f}% {verdict} than the best flat model "
                f"({r['best_flat']}); the paper's claim is >= 23% lower."
            )
    return "\n".join(lines) + "\n"


def run_signals_bench(
    out_dir: str | Path = "runs/signals",
    quick: bool = False,
    seeds: Sequence[int] = (0, 1, 2),
    tasks: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
    params: int | None = None,
    epochs: int | None = None,
    threads: int | None = None,
    command: str = "hierseq bench signals",
    progress: bool = True,
) -> dict[str, Any]:
    """Train and test every (task, model, seed); write ``signals.json`` and ``signals.md`` to ``out_dir``.

    Args:
        out_dir: output folder (created).
        quick: tiny data and 2 epochs (a smoke run in seconds; numbers meaningless).
        seeds: each seed re-draws data, initialisation and batch order.
        tasks: subset of :data:`hierseq.data.signals.SIGNAL_TASKS` (default all).
        models: subset of :data:`MODEL_SPECS` labels (default all four).
        params, epochs: override the setting's parameter budget / epochs.
        threads: torch intra-op threads (default: leave as is).
        command: the command line recorded in the report.
    Returns the report dict (also written as JSON): {"meta", "rows", "runs"}.
    """
    setting = dict(SETTINGS["quick" if quick else "full"])
    if params is not None:
        setting["params"] = params
    if epochs is not None:
        setting["epochs"] = epochs
    tasks = list(tasks) if tasks is not None else list(SIGNAL_TASKS)
    models = list(models) if models is not None else list(MODEL_SPECS)
    for t in tasks:
        if t not in SIGNAL_TASKS:
            raise ValueError(f"tasks={t!r}: must be among {sorted(SIGNAL_TASKS)}")
    for m in models:
        if m not in MODEL_SPECS:
            raise ValueError(f"models={m!r}: must be among {list(MODEL_SPECS)}")
    if not seeds:
        raise ValueError("seeds=[]: need at least one seed")
    if threads is not None:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    runs = []
    for task in tasks:
        for label in models:
            for seed in seeds:
                run = _one_run(task, label, seed, setting)
                runs.append(run)
                if progress:
                    print(
                        f"[signals] {task:16s} {label:12s} seed {seed}: test MSE {run['test_mse']:.4f} "
                        f"({run['params']} params, {run['train_seconds']:.1f} s)",
                        flush=True,
                    )
    rows = summarise(runs)
    meta = {
        "command": command,
        "mode": "quick" if quick else "full",
        "seeds": list(seeds),
        "setting": setting,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "seconds": time.perf_counter() - start,
    }
    report = {"meta": meta, "rows": rows, "runs": runs}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "signals.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "signals.md").write_text(to_markdown(rows, meta))
    return report
