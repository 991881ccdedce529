"""Associative-recall benchmarks: train small causal LMs on MQAR and report query accuracy.

For every model spec x width x learning rate x seed: size the model (``d_model=width``, ``n_layers``,
``vocab_size``, plus the spec's overrides; :func:`_sizing`) and train it with the one training loop
(:func:`hierseq.training.train`, task ``mqar``) for ``steps`` AdamW steps on fresh MQAR batches (linear
warm-up, cosine decay to 0, clipping at 1.0, no weight decay on norms, biases and embeddings), measuring
argmax accuracy at the query positions of one fixed evaluation set shared by all runs. The tables report, per
model and width, the best learning rate's accuracy (mean over seeds), as in Zoology, next to the
decoding state per layer (floats per sequence; for attention the KV cache at ``seq_len``).

Model specs are registry names with optional overrides: ``hamt``, ``hamt:binding=circular``,
``linear_attn:n_heads=1+key_dim=64`` (values parsed as YAML scalars).

Python:

* ``run_recall_bench(out_dir, models, widths, seq_len, n_pairs, vocab_size, lrs, steps, seeds)``: writes
  ``recall.json`` and ``recall.md`` under ``out_dir`` (and every run's folder under ``out_dir/runs/``)
  and prints the table.
* ``run_recall_sweep(out_dir, models, widths, ...)``: Zoology's accuracy-against-state-size plot for every
  causal LM (``models=None``) over ``widths``; resumable (each finished run leaves ``result.json`` in its
  folder and a rerun with the same settings reuses it); writes ``recall_sweep.json`` / ``.md`` / ``.png``
  with each model's points, error bars over seeds and the Pareto frontier.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import config_error
from ..serialization import atomic_write
from ..training import TrainConfig, train
from ..training.metrics import read_metrics
from ..training.tasks.mqar import EVAL_SEED
from .report import code_digest, markdown_table, parse_model_spec, pyplot, run_record, set_threads, write_report

#: The file a finished sweep run leaves in its folder: {"settings", "row", "record"} (see _train_grid).
RESULT_FILE = "result.json"
#: train_mqar's optimiser settings the benchmarks do not expose; the sweep records them with every run.
WEIGHT_DECAY = 0.1
WARMUP_FRAC = 0.1


def _largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of ``n`` that is <= ``at_most`` (1 at least)."""
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def _sizing(name: str, overrides: dict[str, Any], width: int, n_layers: int, vocab_size: int) -> dict[str, Any]:
    """The model config overrides of one run: the bench's sizing, then the spec's overrides.

    Rules per config field, so that every registered causal LM runs at every width the sweeps use
    (16, 32, 64 and up; ``tests/bench/test_recall_bench.py`` builds and trains each one at each):

    * ``d_model = width``, ``n_layers``, ``vocab_size``: the same for every model.
    * ``n_heads`` (models with heads): ``width // 32`` heads of width 32, at least one (width 16: one head of 16).
    * ``headdim`` next to ``expand`` (Mamba-2's SSD heads, d_inner = expand * width = heads x headdim): the
      config's default headdim (64) where it divides d_inner, else the largest divisor of d_inner below it.
      Width 16 gives d_inner 32, which no 64-wide head fits, so one head of 32; widths 32 and 64 keep 64.
      The state (d_inner x d_state + the conv window) does not depend on the head width, so this changes
      the head count, not the state size the sweep plots.

    A spec that sets a field itself keeps its value (and the config may then refuse a width)."""
    import hierseq

    defaults = {f.name: f.default for f in dataclasses.fields(hierseq.get_entry(name).config_cls)}
    sizing: dict[str, Any] = {"d_model": width, "n_layers": n_layers, "vocab_size": vocab_size}
    if "n_heads" in defaults:
        sizing["n_heads"] = max(1, width // 32)  # head width 32 unless the spec says otherwise
    if "headdim" in defaults and "expand" in defaults and "headdim" not in overrides:
        expand = overrides.get("expand", defaults["expand"])
        if isinstance(expand, int) and expand > 0 and isinstance(defaults["headdim"], int):
            sizing["headdim"] = _largest_divisor(expand * width, defaults["headdim"])
    return {**sizing, **overrides}


def state_floats(model: torch.nn.Module, seq_len: int) -> int | None:
    """Decoding state per layer and sequence after ``seq_len`` tokens (``model.state_floats`` over the
    layers: constant for recurrent mixers, the KV cache 2 * seq_len * d_model for attention)."""
    if not hasattr(model, "state_floats"):
        return None
    return int(model.state_floats(seq_len)) // model.config.n_layers


def peak_state_floats(model: torch.nn.Module, seq_len: int) -> int | None:
    """The most decoding state per layer and sequence held while reading ``seq_len`` tokens: the largest
    :func:`state_floats` over the prefix lengths 1 .. ``seq_len`` (floats).

    It equals the state at ``seq_len`` where the state only grows (attention's KV cache, loglinear's
    levels) or stays constant (the recurrences). The summary tree's shrinks each time two leaves merge
    (it keeps one summary per set bit of the leaf count plus the open leaf), so at a power-of-two length it
    holds far less than it did while reading: the sweep plots the peak, which is what answering the
    queries needed."""
    if not hasattr(model, "state_floats"):
        return None
    return max(int(model.state_floats(t)) for t in range(1, seq_len + 1)) // model.config.n_layers


def eval_sizes(eval_examples: int) -> tuple[int, int]:
    """(batch size, batches) of the evaluation set: batches of at most 250 sequences."""
    batch = min(250, eval_examples)
    return batch, max(1, math.ceil(eval_examples / batch))


def train_mqar(
    spec: str,
    width: int,
    lr: float,
    seed: int,
    seq_len: int,
    n_pairs: int,
    vocab_size: int,
    steps: int,
    batch_size: int = 64,
    n_layers: int = 2,
    weight_decay: float = WEIGHT_DECAY,
    warmup_frac: float = WARMUP_FRAC,
    eval_every: int = 0,
    stop_at: float = 1.0,
    eval_examples: int = 1000,
    eval_seed: int = EVAL_SEED,
    out_dir: str | Path | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """One training run (:func:`hierseq.training.train`, task ``mqar``); returns a result row (accuracy,
    losses, time, sizes).

    The evaluation set is ``eval_examples`` sequences from the generator seeded ``eval_seed`` (the same
    for every run). Stops early when a periodic evaluation (every ``eval_every`` steps; 0 = steps // 8)
    reaches ``stop_at`` accuracy, so solved settings do not burn the CPU budget. The run's files go to
    ``out_dir`` (None: a temporary folder, deleted afterwards).

    State sizes in the row, floats per layer and sequence: ``state_floats_per_layer`` after ``seq_len``
    tokens, ``peak_state_floats_per_layer`` the most held over those tokens (:func:`peak_state_floats`),
    and ``state_grows_with_length``: whether that peak is larger over ``2 * seq_len`` tokens."""
    if out_dir is None:
        args = dict(locals())
        with tempfile.TemporaryDirectory(prefix="hierseq-mqar-") as tmp:
            return train_mqar(**{**args, "out_dir": tmp})
    import hierseq

    _, name, overrides = parse_model_spec(spec)
    eval_batch, eval_batches = eval_sizes(eval_examples)
    cfg = TrainConfig(
        model=name,
        model_config=_sizing(name, overrides, width, n_layers, vocab_size),
        task="mqar",
        task_options={"n_pairs": n_pairs, "eval_seed": eval_seed, "stop_at": stop_at},
        seq_len=seq_len,
        batch_size=batch_size,
        max_steps=steps,
        lr=lr,
        min_lr_ratio=0.0,
        warmup_steps=max(1, int(warmup_frac * steps)),
        weight_decay=weight_decay,
        beta2=0.98,
        grad_clip=1.0,
        eval_every=eval_every or max(1, steps // 8),
        eval_batches=eval_batches,
        eval_batch_size=eval_batch,
        log_every=1,  # every step's loss, for the final-loss average
        save_every=0,
        seed=seed,
        out_dir=str(out_dir),
        progress=False,
    )
    result = train(cfg, log=print if verbose else None)
    if result["stopped_reason"] == "interrupted":  # Ctrl-C: not a result, so nothing may record it as one
        print(f"[recall] stopped during {spec} width={width} lr={lr:g} seed={seed}: run the same command to continue")
        raise KeyboardInterrupt
    events = read_metrics(Path(out_dir) / "metrics.jsonl")
    losses = [e["lm_loss"] for e in events if e.get("lm_loss") is not None]  # one per step
    tail = losses[-max(1, len(losses) // 10) :]
    model = hierseq.load(Path(out_dir) / "final")
    peak = peak_state_floats(model, seq_len)
    peak_2l = peak_state_floats(model, 2 * seq_len)
    return {
        "model": spec,
        "width": width,
        "lr": lr,
        "seed": seed,
        "accuracy": result["val_accuracy"],
        "steps_run": result["step"],
        "final_train_loss": statistics.fmean(tail),
        "history": [(e["step"], e["val_accuracy"]) for e in events if e["event"] == "eval"],
        "seconds": result["elapsed_s"],
        "params": result["n_params"],
        "state_floats_per_layer": state_floats(model, seq_len),
        "peak_state_floats_per_layer": peak,
        "state_grows_with_length": None if peak is None else peak_2l > peak,
    }


# ---------------------------------------------------------------------------------- shared plumbing
def _check_options(
    models: Sequence[str],
    widths: Sequence[int],
    lrs: Sequence[float],
    seeds: Sequence[int],
    steps: int,
    batch_size: int,
    stop_at: float,
    eval_examples: int,
) -> None:
    """Refuse a bad benchmark option (:func:`config_error`: argument, value, rule) before any run starts."""
    import hierseq

    causal = hierseq.list_models(kind="causal_lm")
    for spec in models:
        _, name, _ = parse_model_spec(spec)
        if name not in causal:
            raise config_error("models", spec, f"not a registered causal LM; choose from {causal}")
    for name, values in (("widths", widths), ("lrs", lrs), ("seeds", seeds), ("models", models)):
        if not values:
            raise config_error(name, list(values), "must not be empty")
    if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise config_error("widths", list(widths), "must be integers >= 1")
    if any(not lr > 0 for lr in lrs):
        raise config_error("lrs", list(lrs), "must be > 0")
    if steps < 1:
        raise config_error("steps", steps, "must be >= 1")
    if batch_size < 1:
        raise config_error("batch_size", batch_size, "must be >= 1")
    if not 0.0 < stop_at <= 1.0:
        raise config_error("stop_at", stop_at, "must be in (0, 1]")
    if eval_examples < 1:
        raise config_error("eval_examples", eval_examples, "must be >= 1")


def _run_dir(out_dir: str | Path, spec: str, width: int, lr: float, seed: int) -> Path:
    """One run's folder, ``out_dir/runs/<spec>-w<width>-lr<lr>-seed<seed>`` (the spec's ``: = + ,`` made
    safe for a path)."""
    safe = spec.replace(":", "_").replace("=", "-").replace("+", "_").replace(",", "_")
    return Path(out_dir) / "runs" / f"{safe}-w{width}-lr{lr:g}-seed{seed}"


def _run_settings(key: tuple[str, int, float, int], options: dict[str, Any]) -> dict[str, Any]:
    """Everything that decides one run's result: its (spec, width, lr, seed), the model config it resolves
    to (so a change of :func:`_sizing` is a change of settings) and the training options, as JSON values."""
    spec, width, lr, seed = key
    _, name, overrides = parse_model_spec(spec)
    sizing = _sizing(name, overrides, width, options["n_layers"], options["vocab_size"])
    settings = {"model": spec, "width": width, "lr": lr, "seed": seed, "model_config": sizing, **options}
    settings.update(code=code_digest(), torch=torch.__version__)  # a model fixed since then is trained again
    return json.loads(json.dumps(settings))  # as a result.json would hold them (tuples as lists, ...)


def _saved_result(run_dir: Path, settings: dict[str, Any]) -> tuple[str, Any]:
    """What ``run_dir`` holds for a run with ``settings``: ("missing", None) without a readable result file
    (never run, interrupted, or torn), ("same", row) for a finished run with these settings, ("other",
    "field: saved -> now") for a finished run with other settings."""
    try:
        saved = json.loads((run_dir / RESULT_FILE).read_text())
        saved_settings, row = saved["settings"], saved["row"]
    except (OSError, ValueError, KeyError, TypeError):
        return "missing", None
    if saved_settings == settings:
        return "same", row
    if all(saved_settings.get(k) == v for k, v in settings.items() if k not in PROVENANCE):
        return "missing", None  # the same experiment on other code or torch: trained again, not refused
    changed = sorted(k for k in settings.keys() | saved_settings.keys() if settings.get(k) != saved_settings.get(k))
    return "other", ", ".join(f"{k}: {saved_settings.get(k)!r} -> {settings.get(k)!r}" for k in changed)


#: Settings that say which code ran a result rather than which experiment it is.
PROVENANCE = ("code", "torch")


def _say(line: str) -> None:
    """Print a line without breaking a tqdm bar that may be on screen."""
    from tqdm import tqdm

    tqdm.write(line)
    sys.stdout.flush()


def _train_grid(
    out_dir: str | Path,
    plan: Sequence[tuple[str, int, float, int]],
    options: dict[str, Any],
    tag: str,
    verbose: bool,
    resume: bool = False,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], int]:
    """Train each (spec, width, lr, seed) of ``plan`` with :func:`train_mqar` (keyword ``options``) into
    its :func:`_run_dir`, printing one line per run; returns (the result rows in plan order, how many were
    reused).

    With ``resume`` every finished run writes ``result.json`` in its folder ({"settings": its
    :func:`_run_settings`, "row", "record": :func:`run_record`}, replaced atomically so an interrupted write
    leaves no half file), and a folder whose result.json holds the same settings is reused instead of
    retrained. A folder without one (never run, or stopped mid-run) is trained again from scratch (the
    training loop replaces its files). ``progress`` shows a tqdm bar over the runs."""
    from tqdm import tqdm

    rows: list[dict[str, Any]] = []
    reused = 0
    bar = tqdm(plan, desc=tag, unit="run", disable=not progress, dynamic_ncols=True)
    for key in bar:
        spec, width, lr, seed = key
        run_dir = _run_dir(out_dir, spec, width, lr, seed)
        label = f"{spec} width={width} lr={lr:g} seed={seed}"
        settings = _run_settings(key, options) if resume else {}
        if resume:
            status, row = _saved_result(run_dir, settings)
            if status == "same":
                rows.append(row)
                reused += 1
                _say(f"[{tag}] {label}: reused {run_dir / RESULT_FILE} (acc={row['accuracy']:.4f})")
                continue
        bar.set_postfix_str(label)
        row = train_mqar(spec, width, lr, seed, **options, out_dir=run_dir, verbose=verbose)
        if resume:
            text = json.dumps({"settings": settings, "row": row, "record": run_record()}, indent=2) + "\n"
            atomic_write(run_dir / RESULT_FILE, lambda tmp, text=text: Path(tmp).write_text(text))
        rows.append(row)
        _say(
            f"[{tag}] {label}: acc={row['accuracy']:.4f} loss={row['final_train_loss']:.3f} "
            f"steps={row['steps_run']} {row['seconds']:.0f}s"
        )
    bar.close()
    return rows, reused


def _summarize(
    rows: list[dict[str, Any]], models: Sequence[str], widths: Sequence[int], lrs: Sequence[float]
) -> list[dict[str, Any]]:
    """Per model and width (in that order; pairs without rows are left out): the lr with the best mean
    accuracy over seeds (as Zoology picks it), that mean, the sample standard deviation over seeds (0 for
    one seed), each seed's accuracy and steps run at that lr (in the rows' seed order), the mean for each
    lr, the parameter count and the state sizes (:func:`train_mqar`'s: at ``seq_len``, the peak over it, and
    whether the peak grows with the length)."""
    summary = []
    for spec in models:
        for width in widths:
            runs = [r for r in rows if (r["model"], r["width"]) == (spec, width)]
            if not runs:
                continue
            by_lr = {lr: statistics.fmean(r["accuracy"] for r in runs if r["lr"] == lr) for lr in lrs}
            best_lr = max(by_lr, key=by_lr.get)
            best = [r for r in runs if r["lr"] == best_lr]
            accuracies = [r["accuracy"] for r in best]
            summary.append(
                {
                    "model": spec,
                    "width": width,
                    "best_lr": best_lr,
                    "accuracy": by_lr[best_lr],
                    "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                    "seeds": [r["seed"] for r in best],
                    "seed_accuracies": accuracies,
                    "accuracy_by_lr": by_lr,
                    "steps_run": [r["steps_run"] for r in best],
                    "params": runs[0]["params"],
                    "state_floats_per_layer": runs[0]["state_floats_per_layer"],
                    "peak_state_floats_per_layer": runs[0]["peak_state_floats_per_layer"],
                    "state_grows_with_length": runs[0]["state_grows_with_length"],
                }
            )
    return summary


def _report(benchmark: str, settings: dict[str, Any], summary: list[dict], rows: list[dict]) -> dict[str, Any]:
    """The JSON report of a recall benchmark (write_report adds the run record)."""
    return {
        "benchmark": benchmark,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "settings": settings,
        "summary": summary,
        "rows": rows,
    }


def _options(
    seq_len: int,
    n_pairs: int,
    vocab_size: int,
    steps: int,
    batch_size: int,
    n_layers: int,
    stop_at: float,
    eval_examples: int,
) -> dict[str, Any]:
    """train_mqar's keyword options shared by every run of one benchmark call."""
    sizes = {"seq_len": seq_len, "n_pairs": n_pairs, "vocab_size": vocab_size, "steps": steps}
    return {**sizes, "batch_size": batch_size, "n_layers": n_layers, "stop_at": stop_at, "eval_examples": eval_examples}


# ------------------------------------------------------------------------------------- the bench
def run_recall_bench(
    out_dir: str = "runs/bench/recall",
    models: Sequence[str] = ("hamt", "linear_attn", "transformer"),
    widths: Sequence[int] = (64,),
    seq_len: int = 64,
    n_pairs: int = 4,
    vocab_size: int = 256,
    lrs: Sequence[float] = (1e-3, 3e-3),
    steps: int = 1000,
    seeds: Sequence[int] = (0,),
    batch_size: int = 64,
    n_layers: int = 2,
    eval_examples: int = 1000,
    stop_at: float = 1.0,
    verbose: bool = True,
    threads: int | None = None,
) -> dict[str, Any]:
    """Train every model spec x width x lr x seed on MQAR, write ``recall.json`` / ``recall.md`` under
    ``out_dir``, print the table, and return the report (``rows``: every run; ``summary``: best lr per
    model and width, mean accuracy over seeds)."""
    _check_options(models, widths, lrs, seeds, steps, batch_size, stop_at, eval_examples)
    set_threads(threads)
    eval_batch, eval_batches = eval_sizes(eval_examples)
    options = _options(seq_len, n_pairs, vocab_size, steps, batch_size, n_layers, stop_at, eval_examples)
    plan = [(spec, width, lr, seed) for spec in models for width in widths for lr in lrs for seed in seeds]
    rows, _ = _train_grid(out_dir, plan, options, "recall", verbose)
    settings = {
        "seq_len": seq_len,
        "n_pairs": n_pairs,
        "vocab_size": vocab_size,
        "n_layers": n_layers,
        "steps": steps,
        "batch_size": batch_size,
        "lrs": list(lrs),
        "seeds": list(seeds),
        "eval_examples": eval_batch * eval_batches,
        "stop_at": stop_at,
    }
    report = _report("recall (MQAR)", settings, _summarize(rows, models, widths, lrs), rows)
    return write_report(out_dir, "recall", report, _markdown(report), plot=lambda path: _plot(report, path), echo=True)


def _markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        "# MQAR recall",
        "",
        f"V={s['vocab_size']}, L={s['seq_len']}, K={s['n_pairs']} pairs, {s['n_layers']} layers, "
        f"{s['steps']} steps max (batch {s['batch_size']}, early stop at acc >= {s['stop_at']}), "
        f"lrs {s['lrs']}, seeds {s['seeds']}, {s['eval_examples']} eval sequences; accuracy of the best lr "
        "(mean over seeds). State: floats per layer and sequence (attention: KV cache at L).",
        "",
    ]
    header = ["model", "width", "accuracy", "best lr", "steps run (best lr)", "accuracy per lr"]
    header += ["state floats/layer", "params"]
    table = [
        [
            r["model"],
            r["width"],
            f"{r['accuracy']:.4f}",
            f"{r['best_lr']:g}",
            ", ".join(map(str, r["steps_run"])),
            ", ".join(f"{lr:g}: {acc:.3f}" for lr, acc in r["accuracy_by_lr"].items()),
            r["state_floats_per_layer"],
            f"{r['params']:,}",
        ]
        for r in report["summary"]
    ]
    return "\n".join([*lines, markdown_table(header, table)]) + "\n"


def _plot(report: dict[str, Any], path: Path) -> None:
    """Learning curves: query accuracy vs training step for every run (model, width, lr, seed)."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in report["rows"]:
        if r["history"]:
            steps, accs = zip(*r["history"])
            label = f"{r['model']} w={r['width']} lr={r['lr']:g}" + (f" seed={r['seed']}" if r["seed"] else "")
            ax.plot(steps, accs, marker="o", markersize=3, label=label)
    s = report["settings"]
    title = f"MQAR V={s['vocab_size']} L={s['seq_len']} K={s['n_pairs']}"
    _save_accuracy_plot(plt, fig, ax, path, title, "training step", "query accuracy")


def _save_accuracy_plot(plt: Any, fig: Any, ax: Any, path: Path, title: str, xlabel: str, ylabel: str) -> None:
    """Label a query-accuracy panel (y from 0 to 1), add its legend and grid, save it to ``path``."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------- the sweep
def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For each (state, accuracy) point, whether it lies on the Pareto frontier of ``points``: no other
    point has state <= its state and accuracy >= its accuracy with at least one of the two strict.
    Identical points do not dominate each other (both are on it or neither)."""
    return [
        not any(s2 <= s and a2 >= a and (s2 < s or a2 > a) for j, (s2, a2) in enumerate(points) if j != i)
        for i, (s, a) in enumerate(points)
    ]


def _refused_widths(
    specs: Sequence[str], widths: Sequence[int], n_layers: int, vocab_size: int
) -> dict[tuple[str, int], str]:
    """(spec, width) -> why the model's config refuses that width under :func:`_sizing` (its
    ``ValueError``), found by building the configs only (no weights). A spec refused at every width is a
    bad spec (an unknown field, a value out of range), not a width limit: that raises instead."""
    import hierseq

    refused: dict[tuple[str, int], str] = {}
    for spec in specs:
        _, name, overrides = parse_model_spec(spec)
        reasons = {}
        for width in widths:
            try:
                hierseq.build_config(name, **_sizing(name, overrides, width, n_layers, vocab_size))
            except ValueError as error:
                reasons[(spec, width)] = str(error)
        if len(reasons) == len(widths):
            raise config_error("models", spec, f"refused at every width {list(widths)}: {next(iter(reasons.values()))}")
        refused.update(reasons)
    return refused


def _check_run_dirs(out_dir: str | Path, plan: Sequence[tuple[str, int, float, int]], options: dict[str, Any]) -> None:
    """Before any training: refuse two planned runs sharing one folder (two specs that map to the same
    folder name, or two lrs equal to the 6 digits of the name) and a folder holding a finished run with
    other settings (a sweep never overwrites a finished result: rerun with its settings, or choose another
    ``out_dir``)."""
    seen: dict[Path, tuple[str, int, float, int]] = {}
    other = []
    for key in plan:
        run_dir = _run_dir(out_dir, *key)
        if run_dir in seen:  # distinct runs whose names collide: two specs, or lrs equal to 6 digits
            name, value = ("models", key[0]) if seen[run_dir][0] != key[0] else ("lrs", key[2])
            raise config_error(name, value, f"runs {seen[run_dir]} and {key} would share the folder {str(run_dir)!r}")
        seen[run_dir] = key
        status, changed = _saved_result(run_dir, _run_settings(key, options))
        if status == "other":
            other.append((run_dir, changed))
    if other:
        run_dir, changed = other[0]
        raise config_error(
            "out_dir",
            str(out_dir),
            f"{len(other)} run folder(s) hold finished runs with other settings, e.g. {str(run_dir)!r} ({changed}); "
            "rerun with those settings to reuse them, or choose another out_dir (or delete those folders)",
        )


# What 2 CPU cores allow for 9 models x 3 widths x 3 seeds in about an hour: long enough for attention and
# the fastest recurrent learners to separate from chance at L=64, K=4, too short for most to converge, so
# the sweep ranks how fast each model learns recall per state float, not its final capacity.
SWEEP_STEPS = 300


def run_recall_sweep(
    out_dir: str = "runs/bench/recall_sweep",
    models: Sequence[str] | None = None,
    widths: Sequence[int] = (16, 32, 64),
    seq_len: int = 64,
    n_pairs: int = 4,
    vocab_size: int = 256,
    lrs: Sequence[float] = (3e-3,),
    steps: int = SWEEP_STEPS,
    seeds: Sequence[int] = (0, 1, 2),
    batch_size: int = 64,
    n_layers: int = 2,
    eval_examples: int = 500,
    stop_at: float = 0.99,
    threads: int | None = None,
    verbose: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """MQAR accuracy against state size (Zoology's plot): every model spec (``None``: every registered
    causal LM) x width x lr x seed trained with :func:`train_mqar`, each run in
    ``out_dir/runs/<spec>-w<width>-lr<lr>-seed<seed>``.

    Resumable: every finished run writes ``result.json`` in its folder, and a rerun with the same settings
    reuses it (printing "reused") instead of training again; a folder holding a finished run with other
    settings stops the sweep before any training (:func:`_check_run_dirs`). A width a model's config
    refuses (:func:`_refused_widths`) is not trained and is listed in the report as refused, with the
    reason.

    Writes ``recall_sweep.json`` (``summary``: per model and width the best lr by mean accuracy over seeds,
    its mean and sample std, each seed's accuracy, the state per layer, params, ``on_frontier``; ``rows``:
    every run; ``refused``), ``recall_sweep.md`` (the table) and ``recall_sweep.png`` (accuracy against
    state floats per layer, log x, error bars over seeds, the Pareto frontier dashed), prints the table
    and returns the report. ``progress`` shows a bar over the runs; ``verbose`` the training logs."""
    import hierseq

    specs = list(hierseq.list_models(kind="causal_lm") if models is None else models)
    _check_options(specs, widths, lrs, seeds, steps, batch_size, stop_at, eval_examples)
    for name, values in (("models", specs), ("widths", widths), ("lrs", lrs), ("seeds", seeds)):
        if len(set(values)) < len(values):  # a repeated run would be trained once and counted twice
            raise config_error(name, list(values), "must not repeat a value")
    set_threads(threads)
    options = _options(seq_len, n_pairs, vocab_size, steps, batch_size, n_layers, stop_at, eval_examples)
    options.update(weight_decay=WEIGHT_DECAY, warmup_frac=WARMUP_FRAC)  # recorded, so a change is noticed
    refused = _refused_widths(specs, widths, n_layers, vocab_size)
    for (spec, width), reason in refused.items():
        _say(f"[recall-sweep] {spec} width={width}: refused by its config ({reason})")
    # Seeds outermost: a sweep stopped part-way already has every model at every width for the first seeds.
    plan = [(s, w, lr, seed) for seed in seeds for s in specs for w in widths if (s, w) not in refused for lr in lrs]
    _check_run_dirs(out_dir, plan, options)
    rows, reused = _train_grid(out_dir, plan, options, "recall-sweep", verbose, resume=True, progress=progress)
    summary = _summarize(rows, specs, widths, lrs)
    for point in summary:
        point["on_frontier"] = False  # a model without a state size is not placed on the plot
    placed = [p for p in summary if p["peak_state_floats_per_layer"] is not None]
    for point, on in zip(placed, pareto_frontier([(p["peak_state_floats_per_layer"], p["accuracy"]) for p in placed])):
        point["on_frontier"] = on
    eval_batch, eval_batches = eval_sizes(eval_examples)
    settings = {
        "models": specs,
        "widths": list(widths),
        **{k: v for k, v in options.items() if k != "eval_examples"},
        "lrs": list(lrs),
        "seeds": list(seeds),
        "eval_examples": eval_batch * eval_batches,
        "runs": len(plan),
        "reused_runs": reused,
    }
    report = _report("recall sweep (MQAR accuracy against state size)", settings, summary, rows)
    report["refused"] = [{"model": spec, "width": width, "reason": reason} for (spec, width), reason in refused.items()]
    markdown = _sweep_markdown(report)
    return write_report(
        out_dir, "recall_sweep", report, markdown, plot=lambda path: _sweep_plot(report, path), echo=True
    )


def _names(models: list[str]) -> str:
    return ", ".join(models) if models else "none"


def _sweep_markdown(report: dict[str, Any]) -> str:
    """The sweep's page: settings, what the state column means (growth derived from each model's own
    ``state_floats``), refusals, then one row per model and width sorted by model then width."""
    s, summary = report["settings"], report["summary"]
    growing = sorted({p["model"] for p in summary if p["state_grows_with_length"]})
    constant = sorted({p["model"] for p in summary if p["state_grows_with_length"] is False})
    dips = [p for p in summary if p["peak_state_floats_per_layer"] != p["state_floats_per_layer"]]
    lines = [
        "# MQAR accuracy against state size",
        "",
        f"V={s['vocab_size']}, L={s['seq_len']}, K={s['n_pairs']} pairs, {s['n_layers']} layers, widths "
        f"{s['widths']}, {s['steps']} steps max (batch {s['batch_size']}, early stop at acc >= {s['stop_at']}), "
        f"lrs {s['lrs']}, seeds {s['seeds']}, {s['eval_examples']} eval sequences; per model and width the lr "
        "with the best mean accuracy over seeds (as in Zoology), its mean ± sample std over seeds and each "
        f"seed's accuracy. {s['reused_runs']} of {s['runs']} runs were reused from the result.json of an "
        "earlier session with the same settings.",
        "",
        "State: floats of decoding state per layer and sequence, the most held while reading the L tokens "
        "(the largest `state_floats(t) / n_layers` over t <= L); attention's is its KV cache at L. "
        f"It grows with L (is larger over 2L tokens than over L) for: {_names(growing)}; "
        f"it is constant for: {_names(constant)}.",
    ]
    if dips:
        at_l = ", ".join(f"{p['model']} w{p['width']}: {p['state_floats_per_layer']:,}" for p in dips)
        lines.append(
            f"The state after exactly L tokens is smaller than that peak where it shrinks as it reads ({at_l})."
        )
    lines += ["", "On frontier: no other point has state <= and accuracy >= (one strict).", ""]
    for r in report["refused"]:
        lines.append(f"Refused: {r['model']} at width {r['width']}: {r['reason']}")
    if report["refused"]:
        lines.append("")
    header = ["model", "width", "state floats/layer", "grows with L", "accuracy (mean ± std)", "accuracy per seed"]
    header += ["best lr", "on frontier", "params"]
    table = [
        [
            p["model"],
            p["width"],
            "" if p["peak_state_floats_per_layer"] is None else f"{p['peak_state_floats_per_layer']:,}",
            "yes" if p["state_grows_with_length"] else "",
            f"{p['accuracy']:.3f} ± {p['accuracy_std']:.3f}"
            if len(p["seed_accuracies"]) > 1
            else f"{p['accuracy']:.3f}",
            ", ".join(f"{a:.3f}" for a in p["seed_accuracies"]),
            f"{p['best_lr']:g}",
            "yes" if p.get("on_frontier") else "",
            f"{p['params']:,}",
        ]
        for p in sorted(summary, key=lambda p: (p["model"], p["width"]))
    ]
    return "\n".join([*lines, markdown_table(header, table)]) + "\n"


def _sweep_plot(report: dict[str, Any], path: Path) -> None:
    """Accuracy against state floats per layer (log x): one line with markers per model over its widths,
    error bars one sample std over seeds, the Pareto frontier as a dashed step line."""
    plt = pyplot()
    if plt is None:
        return
    placed = [p for p in report["summary"] if p["peak_state_floats_per_layer"] is not None]
    fig, ax = plt.subplots(figsize=(8, 5))
    for model in dict.fromkeys(p["model"] for p in placed):
        points = sorted((p for p in placed if p["model"] == model), key=lambda p: p["width"])
        ax.errorbar(
            [p["peak_state_floats_per_layer"] for p in points],
            [p["accuracy"] for p in points],
            yerr=[p["accuracy_std"] for p in points] if len(points[0]["seed_accuracies"]) > 1 else None,
            marker="o",
            markersize=4,
            capsize=3,
            label=model,
        )
    frontier = sorted((p["peak_state_floats_per_layer"], p["accuracy"]) for p in placed if p.get("on_frontier"))
    if frontier:
        # "post": a frontier accuracy is reachable at every larger state, up to the next frontier point;
        # the last one holds out to the largest state plotted.
        widest = max(p["peak_state_floats_per_layer"] for p in placed)
        xs, ys = [x for x, _ in frontier] + [widest], [y for _, y in frontier] + [frontier[-1][1]]
        ax.step(xs, ys, where="post", linestyle="--", color="black", linewidth=1, label="Pareto frontier")
    s = report["settings"]
    ax.set_xscale("log")
    title = f"MQAR accuracy vs state: L={s['seq_len']}, K={s['n_pairs']}, V={s['vocab_size']}, {s['steps']} steps"
    xlabel = "decoding state per layer (floats, the most held over L tokens)"
    _save_accuracy_plot(plt, fig, ax, path, title, xlabel, "query accuracy (best lr, mean over seeds)")
