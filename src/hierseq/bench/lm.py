"""Language-modelling benchmark: every causal LM trained on the same corpus, with the same token budget,
at a matched parameter count (within 10% of the transformer control), for one or more seeds.

Reports validation and test bits per byte, training tokens/s and parameter count, as JSON + Markdown,
and a learning-curve plot (validation bits/byte vs tokens).

Tokens are bytes by default; ``tokenizer="bpe:4096"`` (``--tokenizer``) trains one byte-level BPE on the
training split and gives it to every model (``vocab_size`` from the tokenizer, parameters matched with it).
Bits per byte divide the summed token loss by the UTF-8 bytes of the scored text, so a subword table and a
byte table compare directly; the tokenizer's tokens per byte are reported next to them.

Run: ``hierseq bench lm --quick`` (about 10 minutes here), ``--full`` (longer), ``--data PATH``,
``--tokenizer bpe:4096``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.tokenizer import BYTES, build_tokenizer, check_tokenizer_spec, tokenize_split
from .report import check_model_specs, machine_facts, markdown_table, pyplot, write_report


@dataclass(frozen=True)
class LMBenchSize:
    d_model: int  # width of the transformer control; other models are matched on its parameter count
    n_layers: int
    seq_len: int
    batch_size: int
    steps: int
    max_time_s: float  # per-run safety cap; a run that hits it is reported as such
    seeds: tuple[int, ...]
    eval_batches: int


CONTROL_HEADS = 4

SIZES = {
    # demo: what `make demo` runs for every causal LM; the time cap only guards against a pathological model.
    "demo": LMBenchSize(
        d_model=128, n_layers=4, seq_len=256, batch_size=16, steps=120, max_time_s=120.0, seeds=(0,), eval_batches=8
    ),
    "quick": LMBenchSize(
        d_model=128, n_layers=4, seq_len=256, batch_size=16, steps=150, max_time_s=150.0, seeds=(0,), eval_batches=10
    ),
    "full": LMBenchSize(
        d_model=256,
        n_layers=4,
        seq_len=256,
        batch_size=32,
        steps=2000,
        max_time_s=3600.0,
        seeds=(0, 1, 2),
        eval_batches=40,
    ),
}


def model_params(name: str, overrides: dict[str, Any]) -> int:
    import hierseq

    with torch.device("meta"):  # no memory, no init cost: we only count
        return hierseq.count_parameters(hierseq.build_model(name, **overrides))


def matched_overrides(name: str, target_params: int, n_layers: int, base: dict[str, Any] | None = None) -> dict:
    """Config overrides giving ``name`` a parameter count as close as possible to ``target_params`` at
    ``n_layers`` layers, by choosing d_model (multiples of 8; the control's 4 heads where a model has
    heads; for models with a per-head size ``headdim``, also headdim 32). Raises ValueError when no width
    lands within 10%."""
    from hierseq.registry import get_entry

    fields = get_entry(name).config_cls.field_names()
    best: tuple[float, dict] | None = None
    # A model with fixed-size heads (mamba2's headdim) only takes widths in steps of its head size; a
    # smaller head size is tried too, so its width can land near the target.
    head_sizes = [{}, {"headdim": 32}] if "headdim" in fields and "headdim" not in (base or {}) else [{}]
    for d_model, heads in ((d, h) for d in range(32, 1025, 8) for h in head_sizes):
        over = {**(base or {}), **heads, "d_model": d_model, "n_layers": n_layers}
        if "n_heads" in fields:
            over["n_heads"] = CONTROL_HEADS
        try:
            n = model_params(name, over)
        except ValueError:
            continue  # this width breaks a model-specific rule; try the next
        gap = abs(n - target_params) / target_params
        if best is None or gap < best[0]:
            best = (gap, over)
    if best is None or best[0] > 0.10:
        raise ValueError(f"model={name!r}: no width within 10% of {target_params} parameters at {n_layers} layers")
    return best[1]


def run_lm_bench(
    out_dir: str = "runs/bench/lm",
    size: str = "quick",
    models: list[str] | None = None,
    data: str | None = None,
    seeds: list[int] | None = None,
    progress: bool = True,
    tokenizer: str = BYTES,
) -> dict:
    import hierseq
    from hierseq.data.corpora import check_data, load_corpus
    from hierseq.training.tasks.lm import evaluate_split
    from hierseq.training.trainer import TrainConfig, train

    if size not in SIZES:
        raise ValueError(f"size={size!r}: must be one of {sorted(SIZES)}")
    if data is not None:
        check_data(data)
    tokenizer = check_tokenizer_spec(tokenizer)
    spec = SIZES[size]
    specs = check_model_specs(models or hierseq.list_models(kind="causal_lm"), "causal_lm")
    seeds = list(seeds) if seeds else list(spec.seeds)
    corpus = load_corpus(data, min_split_len=spec.seq_len + 1)
    # One tokenizer for every run (each run's trainer builds the same one again: BPE training is
    # deterministic and remembered per process).
    tok = build_tokenizer(tokenizer, corpus.train)
    splits = {name: tokenize_split(corpus.split(name), tok) for name in ("train", "val", "test")}
    vocab = {} if tokenizer == BYTES else {"vocab_size": tok.vocab_size}  # bytes: configs exactly as before
    control = {"d_model": spec.d_model, "n_layers": spec.n_layers, "n_heads": CONTROL_HEADS, **vocab}
    target = model_params("transformer", control)
    out = Path(out_dir)
    runs: list[dict] = []
    for label, name, variant in specs:
        if name == "transformer" and not variant:
            over = control
        else:
            over = matched_overrides(name, target, spec.n_layers, base={**variant, **vocab})
        for seed in seeds:
            run_dir = out / f"{label.replace(':', '_').replace('=', '-').replace('+', '_')}-seed{seed}"
            print(f"[bench lm] {label} seed {seed}: {over}")
            cfg = TrainConfig(
                model=name,
                model_config=dict(over),
                data=data,
                tokenizer=tokenizer,
                seq_len=spec.seq_len,
                batch_size=spec.batch_size,
                max_steps=spec.steps,
                max_time_s=spec.max_time_s,
                lr=2e-3,
                warmup_steps=max(1, spec.steps // 20),
                eval_every=max(1, spec.steps // 5),
                eval_batches=spec.eval_batches,
                save_every=0,
                out_dir=str(run_dir),
                seed=seed,
                progress=progress,
            )
            result = train(cfg)
            model = hierseq.load(run_dir / "final")
            test = evaluate_split(model, splits["test"], spec.seq_len, spec.batch_size, spec.eval_batches)
            runs.append(
                {
                    "model": label,
                    "seed": seed,
                    "config": over,
                    "n_params": result["n_params"],
                    "steps": result["step"],
                    "tokens": result["tokens"],
                    "stopped_reason": result["stopped_reason"],
                    "tokens_per_s": result["tokens_per_s"],
                    "val_bpb": result["val_bpb"],
                    "test_bpb": test["bpb"],
                    "run_dir": str(run_dir),
                }
            )
    summary = _summarise(runs, [label for label, _, _ in specs])
    report = {
        "benchmark": "lm",
        "size": size,
        "spec": spec.__dict__,
        "data": data or "embedded Austen",
        "tokenizer": tokenizer,
        "vocab_size": tok.vocab_size,
        "tokens_per_byte": {name: split.tokens_per_byte for name, split in splits.items()},
        "target_params": target,
        "machine": machine_facts(),
        "runs": runs,
        "summary": summary,
    }
    write_report(out, "lm", report, _markdown(report), echo=True)
    _plot_curves(runs, out / "lm_curves.png")
    return report


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _summarise(runs: list[dict], models: list[str]) -> list[dict]:
    rows = []
    for name in models:
        mine = [r for r in runs if r["model"] == name]
        rows.append(
            {
                "model": name,
                "n_params": mine[0]["n_params"],
                "seeds": len(mine),
                "val_bpb": [r["val_bpb"] for r in mine],
                "test_bpb": [r["test_bpb"] for r in mine],
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
                "tokens": mine[0]["tokens"],
                "all_full_budget": all(r["stopped_reason"] == "max_steps" for r in mine),
            }
        )
    return rows


def _markdown(report: dict) -> str:
    m = report["machine"]
    subword = report.get("tokenizer", BYTES) != BYTES
    rows = []
    for s in sorted(report["summary"], key=lambda s: statistics.mean(s["test_bpb"])):
        budget = f"{s['tokens']:,}" + ("" if s["all_full_budget"] else " (time cap hit)")
        row = [s["model"], f"{s['n_params']:,}", s["seeds"], budget, _mean_std(s["val_bpb"]), _mean_std(s["test_bpb"])]
        if subword:  # the same for every model (one tokenizer), in each row so a table copied alone keeps it
            row.append(f"{report['tokens_per_byte']['test']:.3f}")
        rows.append([*row, f"{s['tokens_per_s']:.0f}"])
    header = ["model", "params", "seeds", "train tokens", "val bits/byte", "test bits/byte"]
    header += ["test tokens/byte"] if subword else []
    if subword:
        per_byte = ", ".join(f"{k} {v:.3f}" for k, v in report["tokens_per_byte"].items())
        tokens = (
            f"tokenizer {report['tokenizer']} ({report['vocab_size']:,} tokens; tokens per byte {per_byte}); bits per "
            "byte = summed token loss / UTF-8 bytes of the scored text"
        )
    else:
        tokens = "byte-level"
    return "\n".join(
        [
            f"# LM benchmark ({report['size']})",
            "",
            f"Data: {report['data']}; {tokens}; {report['spec']['steps']} steps x {report['spec']['batch_size']} x "
            f"{report['spec']['seq_len']} tokens; models matched to the transformer's {report['target_params']:,} "
            f"parameters (within 10%). {m['date']}, {m['device']}, torch {m['torch']}, {m['threads']} threads.",
            "",
            markdown_table([*header, "train tokens/s"], rows),
            "",
            "Learning curves: `lm_curves.png`.",
        ]
    )


def _plot_curves(runs: list[dict], path: Path) -> None:
    from hierseq.training.metrics import read_metrics

    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        events = [e for e in read_metrics(Path(r["run_dir"]) / "metrics.jsonl") if e.get("val_bpb") is not None]
        if events:
            ax.plot(
                [e["tokens"] for e in events],
                [e["val_bpb"] for e in events],
                marker="o",
                label=f"{r['model']} (seed {r['seed']})",
            )
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation bits per byte")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
