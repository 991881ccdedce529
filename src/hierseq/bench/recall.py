"""Associative-recall benchmark: train small causal LMs on MQAR and report query accuracy.

For every model spec x width x learning rate x seed: size the model (``d_model=width``, ``n_layers``,
``vocab_size``, plus the spec's overrides) and train it with the one training loop
(:func:`hierseq.training.train`, task ``mqar``) for ``steps`` AdamW steps on fresh MQAR batches (linear
warm-up, cosine decay to 0, clipping at 1.0, no weight decay on norms, biases and embeddings), measuring
argmax accuracy at the query positions of one fixed evaluation set shared by all runs. The table reports, per
model and width, the best learning rate's accuracy (mean over seeds), as in Zoology, next to the
recurrent state size per layer (floats per sequence; for attention the KV cache at ``seq_len``).

Model specs are registry names with optional overrides: ``hamt``, ``hamt:binding=circular``,
``linear_attn:n_heads=1+key_dim=64`` (values parsed as YAML scalars).

Python: ``run_recall_bench(out_dir, models, widths, seq_len, n_pairs, vocab_size, lrs, steps, seeds)``;
writes ``recall.json`` and ``recall.md`` under ``out_dir`` (and every run's folder under ``out_dir/runs/``)
and prints the table.
"""

from __future__ import annotations

import math
import platform
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import config_error
from ..training import TrainConfig, train
from ..training.metrics import read_metrics
from ..training.tasks.mqar import EVAL_SEED
from .report import markdown_table, parse_model_spec, pyplot, write_report


def _sizing(name: str, overrides: dict[str, Any], width: int, n_layers: int, vocab_size: int) -> dict[str, Any]:
    """The model config overrides of one run: the bench's sizing, then the spec's overrides."""
    import hierseq

    fields = hierseq.get_entry(name).config_cls.field_names()
    sizing: dict[str, Any] = {"d_model": width, "n_layers": n_layers, "vocab_size": vocab_size}
    if "n_heads" in fields:
        sizing["n_heads"] = max(1, width // 32)  # head width 32 unless the spec says otherwise
    return {**sizing, **overrides}


def state_floats(model: torch.nn.Module, seq_len: int) -> int | None:
    """Decoding state per layer and sequence after ``seq_len`` tokens (``model.state_floats`` over the
    layers: constant for recurrent mixers, the KV cache 2 * seq_len * d_model for attention)."""
    if not hasattr(model, "state_floats"):
        return None
    return int(model.state_floats(seq_len)) // model.config.n_layers


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
    weight_decay: float = 0.1,
    warmup_frac: float = 0.1,
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
    ``out_dir`` (None: a temporary folder, deleted afterwards)."""
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
    events = read_metrics(Path(out_dir) / "metrics.jsonl")
    losses = [e["lm_loss"] for e in events if e.get("lm_loss") is not None]  # one per step
    tail = losses[-max(1, len(losses) // 10) :]
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
        "state_floats_per_layer": state_floats(hierseq.load(Path(out_dir) / "final"), seq_len),
    }


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
    import hierseq

    causal = hierseq.list_models(kind="causal_lm")
    for spec in models:
        _, name, _ = parse_model_spec(spec)
        if name not in causal:
            raise config_error("models", spec, f"not a registered causal LM; choose from {causal}")
    for name, values in (("widths", widths), ("lrs", lrs), ("seeds", seeds), ("models", models)):
        if not values:
            raise config_error(name, list(values), "must not be empty")
    if steps < 1:
        raise config_error("steps", steps, "must be >= 1")
    if batch_size < 1:
        raise config_error("batch_size", batch_size, "must be >= 1")
    if not 0.0 < stop_at <= 1.0:
        raise config_error("stop_at", stop_at, "must be in (0, 1]")
    if threads is not None:
        if threads < 1:
            raise config_error("threads", threads, "must be >= 1")
        torch.set_num_threads(threads)
    if eval_examples < 1:
        raise config_error("eval_examples", eval_examples, "must be >= 1")
    eval_batch, eval_batches = eval_sizes(eval_examples)
    rows = []
    for spec in models:
        for width in widths:
            for lr in lrs:
                for seed in seeds:
                    run = f"{spec.replace(':', '_').replace('=', '-').replace('+', '_').replace(',', '_')}"
                    row = train_mqar(
                        spec,
                        width,
                        lr,
                        seed,
                        seq_len,
                        n_pairs,
                        vocab_size,
                        steps,
                        batch_size,
                        n_layers,
                        stop_at=stop_at,
                        eval_examples=eval_examples,
                        out_dir=Path(out_dir) / "runs" / f"{run}-w{width}-lr{lr:g}-seed{seed}",
                        verbose=verbose,
                    )
                    rows.append(row)
                    print(
                        f"[recall] {spec} width={width} lr={lr:g} seed={seed}: acc={row['accuracy']:.4f} "
                        f"loss={row['final_train_loss']:.3f} steps={row['steps_run']} {row['seconds']:.0f}s",
                        flush=True,
                    )
    summary = []
    for spec in models:
        for width in widths:
            by_lr = {}
            for lr in lrs:
                accs = [r["accuracy"] for r in rows if (r["model"], r["width"], r["lr"]) == (spec, width, lr)]
                by_lr[lr] = statistics.fmean(accs)
            best_lr = max(by_lr, key=by_lr.get)
            example = next(r for r in rows if (r["model"], r["width"]) == (spec, width))
            summary.append(
                {
                    "model": spec,
                    "width": width,
                    "best_lr": best_lr,
                    "accuracy": by_lr[best_lr],
                    "accuracy_by_lr": by_lr,
                    "steps_run": [
                        r["steps_run"] for r in rows if (r["model"], r["width"], r["lr"]) == (spec, width, best_lr)
                    ],
                    "params": example["params"],
                    "state_floats_per_layer": example["state_floats_per_layer"],
                }
            )
    report = {
        "benchmark": "recall (MQAR)",
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "settings": {
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
        },
        "summary": summary,
        "rows": rows,
    }
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
    ax.set_title(f"MQAR V={s['vocab_size']} L={s['seq_len']} K={s['n_pairs']}")
    ax.set_xlabel("training step")
    ax.set_ylabel("query accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
