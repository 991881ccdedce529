"""HiSS vs flat controls on the synthetic continuous sequence-to-sequence tasks (``data/signals.py``).

Models (all through the registry, at matched parameter counts, same data, same training budget and
schedule): ``hiss`` (one Mamba layer over every chunk, one Mamba layer over the chunk features),
``hiss_h2`` (the same with two high-level layers: after a single high-level layer's state come only
its gate, a norm and the linear head, so it can hardly apply a nonlinear function - e.g. a rotation by
the integrated heading - to what it has accumulated) and the flat ``flat_regressor`` with a 2-layer
Mamba, LSTM or causal Transformer backbone.
Every model's prediction for chunk k sees exactly the inputs up to the end of chunk k (the flat models
read out at the chunk's last step), which the HiSS paper's own comparison did not ensure.

Reference rows, computed on the same test data with the same alignment: ``mean`` (the training mean,
1.0 by construction up to test-set sampling), ``linear`` (ridge regression on causal running sums of
the inputs, :class:`LinearChunkBaseline`) and ``analytic`` (the task's
physics-aware estimator from :data:`hierseq.data.signals.REFERENCE_ESTIMATORS`).

Reported: test MSE in standardised target units (mean +- std over seeds; each seed re-draws the data,
the initialisation and the batch order), the parameter count, training time, and HiSS's relative
change against the best flat model (the paper claims >= 23% lower MSE on its real CSP-Bench data).

Every model trains through the one training loop (:func:`hierseq.training.train`, task ``regression``,
one run folder per model under ``OUT/runs/``). Budget (``full``): 1024 training sequences of 160 steps,
5 epochs of batch 8 (640 Adam steps) at lr 1e-2 with cosine decay, best validation epoch kept - about
14 minutes for 5 models x 2 tasks x 3 seeds on one thread of the 2-core development machine. Earlier
settings (192 sequences of 500 steps, 6 epochs of batch 16 = 72 steps) left every model at the mean
predictor's MSE on ``imu_integration`` although dead reckoning reaches ~0.005 there: the models were
stopped before they learned, not unable to.

Entry point: :func:`run_signals_bench` (the ``hierseq bench signals`` command calls it).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import check_positive_int
from ..data.signals import REFERENCE_ESTIMATORS, SHORT_TASKS, SIGNAL_TASKS
from ..registry import build_model, count_parameters
from ..training import TrainConfig, train
from ..training.metrics import read_metrics
from ..training.tasks.base import resolve_options
from ..training.tasks.regression import (
    RegressionData,
    RegressionSplits,
    RegressionTask,
    Standardizer,
    prediction_mse,
    prepare_regression,
)
from .report import machine_facts, markdown_table, pyplot, set_threads, write_report

#: model label -> (registry name, fixed overrides); d_model is chosen to match the parameter budget.
MODEL_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "hiss": ("hiss", {"low_level": "mamba", "high_level": "mamba", "n_low_layers": 1, "n_layers": 1}),
    "hiss_h2": ("hiss", {"low_level": "mamba", "high_level": "mamba", "n_low_layers": 1, "n_layers": 2}),
    "mamba": ("flat_regressor", {"backbone": "mamba", "n_layers": 2}),
    "lstm": ("flat_regressor", {"backbone": "lstm", "n_layers": 2}),
    "transformer": ("flat_regressor", {"backbone": "transformer", "n_layers": 2, "n_heads": 2}),
}

#: what each model label is (for the report).
MODEL_NOTES: dict[str, str] = {
    "hiss": "HiSS, 1 low-level + 1 high-level Mamba layer",
    "hiss_h2": "HiSS, 1 low-level + 2 high-level Mamba layers",
    "mamba": "flat Mamba, 2 layers",
    "lstm": "flat LSTM, 2 layers",
    "transformer": "flat causal Transformer, 2 layers, 2 heads",
}

#: reference rows (not trained models): label -> what it is.
REFERENCES: dict[str, str] = {
    "mean": "training-set mean (the trivial predictor)",
    "linear": "ridge regression on the chunk's inputs and their running sums (a linear integrator)",
    "analytic": "the task's physics-aware estimator (data.signals.REFERENCE_ESTIMATORS)",
}

#: full / quick settings: data sizes, training length and schedule, parameter budget.
SETTINGS: dict[str, dict[str, Any]] = {
    "full": {
        "n_train": 1024,
        "n_val": 64,
        "n_test": 256,
        "length": 160,
        "epochs": 5,
        "batch_size": 8,
        "lr": 1e-2,
        "params": 20000,
    },
    "quick": {
        "n_train": 32,
        "n_val": 8,
        "n_test": 8,
        "length": 60,
        "epochs": 2,
        "batch_size": 8,
        "lr": 1e-2,
        "params": 3000,
    },
}

#: the HiSS paper's claim: at least this much lower MSE than the best flat model.
PAPER_CLAIM = -0.23


def matched_overrides(
    label: str, d_in: int, d_out: int, chunk_size: int, budget: int, spec: tuple[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Overrides for model ``label`` (its :data:`MODEL_SPECS` entry, or ``spec`` = (registry name, fixed
    overrides)) whose parameter count is closest to ``budget`` (width searched in steps of 4, which keeps
    Transformer heads even; widths the model refuses, such as Mamba-2's head multiples, are skipped)."""
    name, fixed = spec or MODEL_SPECS[label]
    base = {**fixed, "d_in": d_in, "d_out": d_out, "chunk_size": chunk_size}
    best: tuple[int, dict[str, Any]] | None = None
    for width in range(4, 513, 4):
        over = {**base, "d_model": width}
        try:
            params = count_parameters(build_model(name, **over))
        except ValueError:
            continue
        if best is None or abs(params - budget) < abs(best[0] - budget):
            best = (params, over)
        if params > budget:
            break
    assert best is not None
    return best[1]


def chunk_history_features(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Causal hand-made features for a linear reference. x: [N, T, D] -> [N, T // C, C * D + 2 * D + 2]:
    at the end of chunk k, the chunk's own C input steps, the running sum and the running double sum of
    the inputs (a linear integrator's state) up to that step, and the chunk's relative time and its square."""
    x = x.to(torch.float64)
    batch, length, d = x.shape
    n = length // chunk_size
    ends = torch.arange(chunk_size - 1, n * chunk_size, chunk_size)
    once = x.cumsum(dim=1) / length
    twice = once.cumsum(dim=1) / length
    time = (torch.arange(1, n + 1, dtype=torch.float64) / n).expand(batch, n)
    return torch.cat(
        (
            x[:, : n * chunk_size].reshape(batch, n, chunk_size * d),
            once[:, ends],
            twice[:, ends],
            time.unsqueeze(-1),
            time.unsqueeze(-1) ** 2,
        ),
        dim=-1,
    )


class LinearChunkBaseline:
    """Ridge regression from :func:`chunk_history_features` to the targets: what a linear integrator can
    do with the same inputs and alignment as the models. ``fit`` picks the ridge strength on ``val``."""

    RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # times the number of labelled training chunks

    def __init__(self, chunk_size: int) -> None:
        check_positive_int("chunk_size", chunk_size)
        self.chunk_size = chunk_size
        self.features: Standardizer | None = None
        self.weight: torch.Tensor | None = None
        self.ridge: float | None = None

    def _design(self, x: torch.Tensor) -> torch.Tensor:
        assert self.features is not None
        f = self.features(chunk_history_features(x, self.chunk_size))
        return torch.cat((f, torch.ones(*f.shape[:-1], 1, dtype=f.dtype)), dim=-1)

    def fit(self, train: RegressionData, val: RegressionData) -> LinearChunkBaseline:
        raw = chunk_history_features(train.x, self.chunk_size)
        self.features = Standardizer.fit(raw, train.mask)
        design = self._design(train.x)[train.mask]
        target = train.y.to(torch.float64)[train.mask]
        gram, rhs = design.T @ design, design.T @ target
        best = (math.inf, None, None)
        for ridge in self.RIDGES:
            reg = ridge * design.shape[0] * torch.eye(gram.shape[0], dtype=gram.dtype)
            reg[-1, -1] = 0.0  # no penalty on the bias
            self.weight = torch.linalg.solve(gram + reg, rhs)
            score = prediction_mse(self.predict(val.x), val)
            if score < best[0]:
                best = (score, ridge, self.weight)
        _, self.ridge, self.weight = best
        return self

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, T, D] model inputs -> [N, T // C, D_out] (standardised target units)."""
        if self.weight is None:
            raise RuntimeError("LinearChunkBaseline: call fit() first")
        return self._design(x) @ self.weight


def _task_options(task: str, seed: int, setting: dict[str, Any]) -> dict[str, Any]:
    """The regression task options of one (task, seed): data sizes, the data seed 1000 + seed, and the
    chunk size when the setting names one."""
    sizes = {k: setting[k] for k in ("n_train", "n_val", "n_test")}
    chunk = {"chunk_size": setting["chunk_size"]} if "chunk_size" in setting else {}
    return {"signal": task, **sizes, "data_seed": 1000 + seed, **chunk}


def prepare_task(task: str, seed: int, setting: dict[str, Any]) -> RegressionSplits:
    """Data of one (task, seed), exactly as the training runs draw it: raw splits, the preprocessor
    fitted on train, model-ready tensors."""
    opts = resolve_options(RegressionTask.name, RegressionTask.options, _task_options(task, seed, setting))
    return prepare_regression(opts, setting["length"])


def reference_runs(task: str, seed: int, data: dict[str, Any]) -> list[dict[str, Any]]:
    """The mean, linear and analytic reference estimators on the test split (standardised units)."""
    train_set, _, test_set = data.raw
    test = data.test
    runs = []
    start = time.perf_counter()
    runs.append(("mean", 0, prediction_mse(torch.zeros_like(test.y), test), time.perf_counter() - start))
    start = time.perf_counter()
    linear = LinearChunkBaseline(train_set.chunk_size).fit(data.train, data.val)
    n_weights = int(linear.weight.numel()) if linear.weight is not None else 0
    runs.append(("linear", n_weights, prediction_mse(linear.predict(test.x), test), time.perf_counter() - start))
    if task in REFERENCE_ESTIMATORS:
        start = time.perf_counter()
        estimate = REFERENCE_ESTIMATORS[task][1](test_set.x, test_set.chunk_size)
        standardised = data.prep.targets(torch.as_tensor(estimate, dtype=torch.float64))
        runs.append(("analytic", 0, prediction_mse(standardised, test), time.perf_counter() - start))
    return [
        {
            "task": task,
            "model": label,
            "kind": "reference",
            "seed": seed,
            "params": params,
            "test_mse": mse,
            "train_seconds": seconds,
        }
        for label, params, mse, seconds in runs
    ]


def model_run(
    task: str,
    label: str,
    seed: int,
    data: RegressionSplits,
    setting: dict[str, Any],
    run_dir: Path,
    spec: tuple[str, dict[str, Any]] | None = None,
    max_steps: int | None = None,
    max_time_s: float = 0.0,
) -> dict[str, Any]:
    """Train model ``label`` (or ``spec`` = (registry name, fixed overrides)) on (task, seed) with the one
    training loop (task ``regression``, one validation pass per epoch, the best epoch's weights kept) and
    test it. ``max_steps`` (default: the setting's epochs) and ``max_time_s`` (0: none) end the run."""
    name, _ = spec or MODEL_SPECS[label]
    over = matched_overrides(
        label, data.train.x.shape[-1], data.train.y.shape[-1], data.raw[0].chunk_size, setting["params"], spec
    )
    steps_per_epoch = setting["n_train"] // setting["batch_size"]
    cfg = TrainConfig(
        model=name,
        model_config=over,
        task="regression",
        task_options=_task_options(task, seed, setting),
        seq_len=setting["length"],
        batch_size=setting["batch_size"],
        max_steps=max_steps or setting["epochs"] * steps_per_epoch,
        max_time_s=max_time_s,
        lr=setting["lr"],
        warmup_steps=0,
        min_lr_ratio=0.1,  # cosine decay to 10%: the same schedule for every model in the comparison
        weight_decay=0.0,
        beta2=0.999,  # Adam's
        eval_every=steps_per_epoch,
        eval_batch_size=32,
        log_every=steps_per_epoch,
        save_every=0,
        keep_best=True,
        seed=seed,
        out_dir=str(run_dir),
        progress=False,
    )
    result = train(cfg, log=None)
    history = [
        {
            "epoch": e["step"] // steps_per_epoch,
            "train_mse": e["loss"],
            "val_mse": e["val_loss"],
            "seconds": e["elapsed_s"],
        }
        for e in read_metrics(run_dir / "metrics.jsonl")
        if e["event"] == "eval"
    ]
    return {
        "task": task,
        "model": label,
        "kind": "model",
        "registry_name": name,
        "seed": seed,
        "overrides": over,
        "params": result["n_params"],
        "test_mse": result["test"]["mse"],
        "best_val_mse": result["val_loss"],
        "best_epoch": result["best_step"] // steps_per_epoch,
        "steps": result["step"],
        "train_seconds": result["elapsed_s"],
        "history": history,
        "run_dir": str(run_dir),
    }


def _row_key(task: str, label: str, specs: Mapping[str, tuple]) -> tuple[int, str, int]:
    """Tasks in SIGNAL_TASKS order, then models in ``specs`` order, then the references."""
    tasks, labels = list(SIGNAL_TASKS), [*specs, *REFERENCES]
    return (
        tasks.index(task) if task in tasks else len(tasks),
        task,
        labels.index(label) if label in labels else len(labels),
    )


def is_hierarchical(label: str, specs: Mapping[str, tuple] = MODEL_SPECS) -> bool:
    """True for the HiSS variants of ``specs`` (label -> (registry name, ...)); the rest are flat controls."""
    return label in specs and specs[label][0] == "hiss"


def summarise(runs: list[dict[str, Any]], specs: Mapping[str, tuple] = MODEL_SPECS) -> list[dict[str, Any]]:
    """One row per (task, model or reference): mean / std of the test MSE over seeds, params, mean time.

    In a task with HiSS variants and flat models, every HiSS row gets ``vs_best_flat`` (relative change of
    its mean MSE against the best flat model's) and every row of the task ``best_flat``, ``best_hiss`` and
    ``hiss_vs_best_flat`` (the best HiSS variant's relative change). ``specs`` (label -> (registry name,
    ...), default :data:`MODEL_SPECS`) tells the HiSS rows and orders the models."""
    rows = []
    keys = sorted({(r["task"], r["model"]) for r in runs}, key=lambda k: _row_key(*k, specs))
    for task, label in keys:
        group = [r for r in runs if r["task"] == task and r["model"] == label]
        mses = [r["test_mse"] for r in group]
        rows.append(
            {
                "task": task,
                "model": label,
                "kind": group[0].get("kind", "model"),
                "params": group[0]["params"],
                "seeds": len(group),
                "test_mse_mean": statistics.fmean(mses),
                "test_mse_std": statistics.stdev(mses) if len(mses) > 1 else 0.0,
                "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in group),
            }
        )
    for task in {r["task"] for r in rows}:
        task_rows = [r for r in rows if r["task"] == task]
        flat = [r for r in task_rows if r["kind"] == "model" and not is_hierarchical(r["model"], specs)]
        hiss = [r for r in task_rows if is_hierarchical(r["model"], specs)]
        if flat and hiss:
            best_flat = min(flat, key=lambda r: r["test_mse_mean"])
            for r in hiss:
                r["vs_best_flat"] = r["test_mse_mean"] / best_flat["test_mse_mean"] - 1.0
            best_hiss = min(hiss, key=lambda r: r["test_mse_mean"])
            for r in task_rows:
                r["best_flat"] = best_flat["model"]
                r["best_hiss"] = best_hiss["model"]
                r["hiss_vs_best_flat"] = best_hiss["vs_best_flat"]
    return rows


def verdicts(rows: list[dict[str, Any]]) -> dict[str, str]:
    """task -> the relative MSE change of every HiSS variant against the best flat model, and whether the
    best variant reproduces the paper's >= 23% reduction."""
    out = {}
    for task in dict.fromkeys(r["task"] for r in rows):  # row order
        task_rows = [r for r in rows if r["task"] == task]
        first = task_rows[0]
        if "best_flat" not in first:
            continue
        best = next(r for r in task_rows if r["model"] == first["best_flat"])
        parts = [
            f"{r['model']} {r['test_mse_mean']:.4f} ({r['vs_best_flat'] * 100:+.1f}%)"
            for r in task_rows
            if "vs_best_flat" in r
        ]
        change = first["hiss_vs_best_flat"]
        reproduced = "reproduced" if change <= PAPER_CLAIM else "not reproduced"
        out[task] = (
            f"best flat model ({best['model']}) {best['test_mse_mean']:.4f}; " + ", ".join(parts) + ". "
            f"Best HiSS variant ({first['best_hiss']}): {change * 100:+.1f}% MSE "
            f"({'lower' if change < 0 else 'higher'}); the paper's >= 23% lower MSE is **{reproduced}** here."
        )
    return out


def _fmt_params(row: dict[str, Any]) -> str:
    if row["kind"] == "reference":
        return f"({row['params']} weights)" if row["params"] else "-"
    return str(row["params"])


def to_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    s = meta["setting"]
    steps = s["epochs"] * (s["n_train"] // s["batch_size"])
    lines = [
        "# HiSS vs flat models on synthetic sensor tasks",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['machine']['date']}; machine: {meta['machine']['cpus']} CPUs, {meta['machine']['threads']} "
        f"torch thread(s), load average {meta['load_before']:.2f} before / {meta['load_after']:.2f} after; "
        f"torch {meta['machine']['torch']}; total wall time {meta['seconds'] / 60:.1f} min "
        f"({meta['cpu_seconds'] / 60:.1f} min of CPU time in this process).  ",
        f"Mode: {meta['mode']}; seeds {meta['seeds']}; {s['n_train']} train / {s['n_val']} val / {s['n_test']} "
        f"test sequences of {s['length']} steps (50 Hz), one target per 10 steps; {s['epochs']} epochs of batch "
        f"{s['batch_size']} ({steps} Adam steps, lr {s['lr']:g}, cosine to 10%, best validation epoch kept); "
        f"parameter budget {s['params']}."
        + (" **Quick mode: a smoke run, the numbers mean nothing.**" if meta["mode"] == "quick" else ""),
        "",
        "Test MSE in standardised target units (1.0 ~ predicting the training mean); mean +- std over seeds "
        "(each seed re-draws data, initialisation and batch order). Every model's and reference's prediction "
        "for chunk k sees inputs up to the end of chunk k. Models: "
        + "; ".join(f"{k} = {v}" for k, v in MODEL_NOTES.items() if any(r["model"] == k for r in rows))
        + ". Reference rows: "
        + "; ".join(f"{k} = {v}" for k, v in REFERENCES.items())
        + ".",
        "",
    ]
    table = [
        [
            r["task"],
            r["model"] if r["kind"] == "model" else f"*{r['model']}* (reference)",
            _fmt_params(r),
            f"{r['test_mse_mean']:.4f} +- {r['test_mse_std']:.4f}",
            f"{r['train_seconds_mean']:.1f}",
        ]
        for r in rows
    ]
    lines.append(markdown_table(["task", "model", "params", "test MSE", "train s/run"], table))
    lines.append("")
    lines += [f"- {task}: {text}" for task, text in verdicts(rows).items()]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    """One panel per task: model MSE bars (mean +- std over seeds, log scale) with the reference
    estimators as horizontal lines. Returns False when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    styles = {"mean": ("k", "--"), "linear": ("tab:gray", ":"), "analytic": ("tab:green", "-.")}
    for ax, task in zip(axes[0], tasks):
        models = [r for r in rows if r["task"] == task and r["kind"] == "model"]
        ax.bar(
            [r["model"] for r in models],
            [r["test_mse_mean"] for r in models],
            yerr=[r["test_mse_std"] for r in models],
            color=["tab:red" if is_hierarchical(r["model"]) else "tab:blue" for r in models],
            capsize=4,
        )
        for r in (r for r in rows if r["task"] == task and r["kind"] == "reference"):
            color, style = styles.get(r["model"], ("tab:purple", "-"))
            ax.axhline(r["test_mse_mean"], color=color, linestyle=style, label=f"{r['model']} {r['test_mse_mean']:.3g}")
        ax.set_yscale("log")
        ax.set_title(task)
        ax.set_ylabel("test MSE (standardised)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _command_line(quick: bool, seeds, tasks, models, threads, out_dir, params, epochs) -> str:
    """The ``hierseq bench signals`` command equivalent to these arguments (API-only ones noted)."""
    parts = ["hierseq bench signals"]
    if quick:
        parts.append("--quick")
    if list(seeds) != [0, 1, 2]:
        parts.append("--seeds " + ",".join(map(str, seeds)))
    if tasks is not None:
        parts.append("--tasks " + ",".join(tasks))
    if models is not None:
        parts.append("--models " + ",".join(models))
    if threads is not None:
        parts.append(f"--threads {threads}")
    if str(out_dir) != "runs/bench/signals":
        parts.append(f"--out {out_dir}")
    api = [f"{k}={v}" for k, v in (("params", params), ("epochs", epochs)) if v is not None]
    return " ".join(parts) + (f" (Python API: {', '.join(api)})" if api else "")


def select_runs(
    tasks: Sequence[str] | None,
    models: Sequence[str] | None,
    seeds: Sequence[int],
    threads: int | None,
    known_tasks: Sequence[str],
    known_models: Sequence[str],
) -> tuple[list[str], list[str]]:
    """The tasks and models to run (default: all known), checked, with the seeds checked and the torch
    thread count set (when given)."""
    task_list = list(tasks) if tasks is not None else list(known_tasks)
    model_list = list(models) if models is not None else list(known_models)
    for t in task_list:
        if t not in known_tasks:
            raise ValueError(f"tasks={t!r}: must be among {list(known_tasks)}")
    for m in model_list:
        if m not in known_models:
            raise ValueError(f"models={m!r}: must be among {list(known_models)}")
    if not seeds:
        raise ValueError("seeds=[]: need at least one seed")
    set_threads(threads)
    return task_list, model_list


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def run_signals_bench(
    out_dir: str | Path = "runs/bench/signals",
    quick: bool = False,
    seeds: Sequence[int] = (0, 1, 2),
    tasks: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
    params: int | None = None,
    epochs: int | None = None,
    threads: int | None = None,
    command: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and test every (task, seed, model) and the reference estimators; write ``signals.json``,
    ``signals.md`` and ``signals.png`` to ``out_dir``.

    Args:
        out_dir: output folder (created); every model run's own folder (metrics.jsonl, loss.png, checkpoint,
            final model) goes under ``out_dir/runs/``.
        quick: tiny data and 2 epochs (a smoke run in seconds; numbers meaningless).
        seeds: each seed re-draws data, initialisation and batch order.
        tasks: subset of :data:`hierseq.data.signals.SHORT_TASKS` (default both).
        models: subset of :data:`MODEL_SPECS` labels (default all four).
        params, epochs: override the setting's parameter budget / epochs.
        threads: torch intra-op threads (default: leave as is).
        command: the command line recorded in the report (default: rebuilt from the arguments).
        progress: print one line per finished run (with elapsed time and a rough time left).
    Returns the report dict (also written as JSON): {"meta", "rows", "verdicts", "runs"}.
    """
    setting = dict(SETTINGS["quick" if quick else "full"])
    if params is not None:
        setting["params"] = params
    if epochs is not None:
        setting["epochs"] = epochs
    task_list, model_list = select_runs(tasks, models, seeds, threads, SHORT_TASKS, MODEL_SPECS)
    if command is None:
        command = _command_line(quick, seeds, tasks, models, threads, out_dir, params, epochs)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    start, cpu_start = time.perf_counter(), time.process_time()
    runs: list[dict[str, Any]] = []
    total, done = len(task_list) * len(seeds) * len(model_list), 0
    for task in task_list:
        for seed in seeds:
            data = prepare_task(task, seed, setting)
            refs = reference_runs(task, seed, data)
            runs += refs
            if progress:
                text = ", ".join(f"{r['model']} {r['test_mse']:.4f}" for r in refs)
                print(f"[signals] {task} seed {seed}: references {text}", flush=True)
            for label in model_list:
                run = model_run(task, label, seed, data, setting, Path(out_dir) / "runs" / f"{task}-{label}-seed{seed}")
                runs.append(run)
                done += 1
                if progress:
                    elapsed = time.perf_counter() - start
                    left = elapsed / done * (total - done)
                    print(
                        f"[signals {done}/{total} {_clock(elapsed)}, ~{_clock(left)} left] {task} seed {seed} "
                        f"{label}: test MSE {run['test_mse']:.4f} ({run['params']} params, {run['steps']} steps, "
                        f"{run['train_seconds']:.1f} s)",
                        flush=True,
                    )
    rows = summarise(runs)
    meta = {
        "command": command,
        "mode": "quick" if quick else "full",
        "seeds": list(seeds),
        "setting": setting,
        "machine": machine_facts(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
    }
    report = {"meta": meta, "rows": rows, "verdicts": verdicts(rows), "runs": runs}
    return write_report(
        out_dir, "signals", report, to_markdown(rows, meta), plot=lambda path: plot(rows, path), echo=progress
    )
