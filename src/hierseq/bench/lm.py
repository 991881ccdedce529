"""Language-modelling benchmark: every causal LM trained on the same corpus, with the same token budget,
at a matched parameter count (within 10% of the transformer control), for one or more seeds.

Reports validation and test bits per byte (mean ± std over seeds), validation bits per byte at an equal
training wall-clock, training tokens/s and parameter count, as JSON + Markdown, and learning curves
(validation bits/byte against training tokens and against training seconds; with several seeds the mean
over seeds with a ±std band).

Tiers (``size``; d_model is the transformer control's, 4 heads, 4 layers, sequences of 256 tokens):

* ``demo``: 120 steps of 16 sequences, one seed (what ``make demo`` runs).
* ``quick``: 150 steps of 16, one seed; about 10 minutes for the 9 causal LMs on 2 cores.
* ``standard``: 200 steps of 16, seeds 0, 1, 2, 10 evaluations per run; about 40 minutes for the 9 causal
  LMs (27 runs) on 2 cores (estimated from the per-step times of the 9 models at this shape, 3.6 s a step
  for all 9 together, plus about 14 s of evaluation and setup per run).
* ``full``: the long tier, d_model 256, 2000 steps of 32, seeds 0, 1, 2 (many hours on 2 cores).

Equal tokens favours slow models, so the report also compares models at equal training time: T is the
training time of the shortest run (the fastest model's quickest seed), so every run's learning curve
reaches T, and each run's validation bits/byte at T is interpolated linearly between its evaluations.
Training time is the trainer's own per-step time (batch, forward, backward, optimiser step), summed from
``metrics.jsonl``: each event's ``tokens_per_s`` is the tokens of its interval over the training seconds of
that interval, so the interval's seconds are its tokens over ``tokens_per_s``. The events' ``elapsed_s``
is not used: it is session wall time and includes setup, evaluations and plotting, which differ by model
and by how often a tier evaluates. Wall-clock numbers depend on the machine and its load; the report's
record line gives the load averages.

Resuming: each run's folder gets ``bench_run.json`` when its run ends, holding the run's key (its full
TrainConfig, a digest of the training code, the torch version and a digest of the data) and, for a finished
run, its results. A later call with the same settings reuses every finished run whose key, ``final/``,
``metrics.jsonl`` and ``train_config.yaml`` all match, without training or evaluating again; so an
interrupted ``--standard`` continues where it stopped. A run stopped by Ctrl-C (the trainer finishes the
step, evaluates and checkpoints, and the bench then stops) is continued from its checkpoint with the
trainer's ``resume`` on the next call (bit-exact, same key only). Anything else in a run's folder (another
config, other code, a run killed before it saved) is trained again from scratch, and the log says why. The
trainer's ``resume`` alone is not enough for this: it continues a checkpoint whose ``max_steps``, ``lr`` or
schedule differ (it only records the change), and on a finished run it evaluates again and returns no
tokens/s. ``reuse=False`` trains everything again.

Tokens are bytes by default; ``tokenizer="bpe:4096"`` (``--tokenizer``) trains one byte-level BPE on the
training split and gives it to every model (``vocab_size`` from the tokenizer, parameters matched with it).
Bits per byte divide the summed token loss by the UTF-8 bytes of the scored text, so a subword table and a
byte table compare directly; the tokenizer's tokens per byte are reported next to them.

Run: ``hierseq bench lm --quick``, ``--standard``, ``--full``, with ``--models A,B``, ``--seeds 0,1``,
``--data PATH``, ``--tokenizer bpe:4096``, ``--out DIR`` (rerun the same command to continue a stopped one).
"""

from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..data.tokenizer import BYTES, build_tokenizer, check_tokenizer_spec, tokenize_split
from .report import check_model_specs, code_digest, machine_facts, markdown_table, pyplot, write_report


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
    evals: int = 5  # validation evaluations per run (every steps // evals steps, and at the end)


CONTROL_HEADS = 4

SIZES = {
    # demo: what `make demo` runs for every causal LM; the time cap only guards against a pathological model.
    "demo": LMBenchSize(
        d_model=128, n_layers=4, seq_len=256, batch_size=16, steps=120, max_time_s=120.0, seeds=(0,), eval_batches=8
    ),
    "quick": LMBenchSize(
        d_model=128, n_layers=4, seq_len=256, batch_size=16, steps=150, max_time_s=150.0, seeds=(0,), eval_batches=10
    ),
    # standard: ~40 minutes for the 9 causal LMs x 3 seeds on 2 cores (see the module docstring). The cap is
    # ~5x the slowest model's expected run (mamba: ~150 s of training and ~30 s of evaluation), so only a
    # pathological model or a heavily loaded machine reaches it.
    "standard": LMBenchSize(
        d_model=128,
        n_layers=4,
        seq_len=256,
        batch_size=16,
        steps=200,
        max_time_s=900.0,
        seeds=(0, 1, 2),
        eval_batches=10,
        evals=10,
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

#: Written into each run's folder when its run ends: the run's key and, once finished, its results.
RUN_MARKER = "bench_run.json"


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
    reuse: bool = True,
    max_time_s: float | None = None,
) -> dict:
    """Train every causal LM (or ``models``, variant specs allowed) at tier ``size`` for each seed, evaluate,
    and write ``lm.json``, ``lm.md`` and ``lm_curves.png`` under ``out_dir`` (runs in its subfolders).

    ``reuse``: reuse the finished runs of an earlier call with the same settings and continue a run stopped
    by Ctrl-C (see the module docstring); False trains every run from scratch. A run the trainer reports as
    interrupted stops the bench with ``KeyboardInterrupt`` after saving it. ``max_time_s`` replaces the
    tier's per-run time cap (for a caller that wants the tier's steps whatever the machine's load).
    Returns the report."""
    import hierseq
    from hierseq.data.corpora import check_data, load_corpus

    if size not in SIZES:
        raise ValueError(f"size={size!r}: must be one of {sorted(SIZES)}")
    if data is not None:
        check_data(data)
    tokenizer = check_tokenizer_spec(tokenizer)
    spec = SIZES[size]
    if max_time_s is not None:
        if max_time_s <= 0:
            raise ValueError(f"max_time_s={max_time_s!r}: must be > 0")
        spec = replace(spec, max_time_s=float(max_time_s))
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
    # What a run's numbers depend on besides its TrainConfig: the training code, torch, the corpus's bytes.
    provenance = {"code": code_digest(), "torch": torch.__version__, "data": _data_digest(corpus)}
    runs: list[dict] = []
    for label, name, variant in specs:
        if name == "transformer" and not variant:
            over = control
        else:
            over = matched_overrides(name, target, spec.n_layers, base={**variant, **vocab})
        for seed in seeds:
            run_dir = out / f"{label.replace(':', '_').replace('=', '-').replace('+', '_')}-seed{seed}"
            run = _run_one(label, name, over, seed, spec, run_dir, data, tokenizer, splits, provenance, progress, reuse)
            runs.append(run)
    labels = [label for label, _, _ in specs]
    equal_time_s = add_equal_time(runs)
    summary = _summarise(runs, labels)
    report = {
        "benchmark": "lm",
        "size": size,
        "spec": spec.__dict__,
        "data": data or "embedded Austen",
        "tokenizer": tokenizer,
        "vocab_size": tok.vocab_size,
        "tokens_per_byte": {name: split.tokens_per_byte for name, split in splits.items()},
        "target_params": target,
        "equal_time_s": equal_time_s,
        "reused_runs": sum(r["reused"] for r in runs),
        "machine": machine_facts(),
        "runs": runs,
        "summary": summary,
    }
    write_report(out, "lm", report, _markdown(report), echo=True)
    _plot_curves(runs, labels, equal_time_s, out / "lm_curves.png")
    return report


# =============================================================================================== one run
def _run_one(
    label: str,
    name: str,
    over: dict[str, Any],
    seed: int,
    spec: LMBenchSize,
    run_dir: Path,
    data: str | None,
    tokenizer: str,
    splits: dict[str, Any],
    provenance: dict[str, str],
    progress: bool,
    reuse: bool,
) -> dict[str, Any]:
    """Train (or reuse, or continue) one run and evaluate it on test; returns its record for the report."""
    import hierseq
    from hierseq.serialization import atomic_write
    from hierseq.training.metrics import read_metrics
    from hierseq.training.tasks.lm import evaluate_split
    from hierseq.training.trainer import TrainConfig, train

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
        eval_every=max(1, spec.steps // spec.evals),
        eval_batches=spec.eval_batches,
        save_every=0,  # one checkpoint at the end (a Ctrl-C saves one too): no save time inside a run
        out_dir=str(run_dir),
        seed=seed,
        progress=progress,
    )
    # JSON round trip: the key compares equal to its copy read back from bench_run.json.
    key = json.loads(json.dumps({"train_config": _comparable(cfg.to_dict()), **provenance}))
    marker = run_dir / RUN_MARKER
    state, why = _previous_run(run_dir, key, cfg) if reuse else (None, "")
    if state is not None and state["status"] == "finished":
        print(f"[bench lm] {label} seed {seed}: reusing the finished run in {str(run_dir)!r}")
        run = {**state["run"], "run_dir": str(run_dir), "reused": True}
        run["curve"] = training_curve(read_metrics(run_dir / "metrics.jsonl"))
        return run
    resume = state is not None and state["status"] == "interrupted"
    if resume:
        print(f"[bench lm] {label} seed {seed}: continuing the interrupted run in {str(run_dir)!r}")
    else:
        if why:
            print(f"[bench lm] {label} seed {seed}: {str(run_dir)!r} {why}; training it again")
        print(f"[bench lm] {label} seed {seed}: {over}")
    # The old marker goes before the trainer touches the folder: a marker only describes a run that ended under it.
    marker.unlink(missing_ok=True)
    result = train(cfg.replace(resume=resume))
    if result["stopped_reason"] == "interrupted":
        text = json.dumps({"status": "interrupted", "key": key}, indent=1)
        atomic_write(marker, lambda tmp: Path(tmp).write_text(text))
        print(f"[bench lm] stopped during {label} seed {seed} (checkpoint saved): run the same command to continue")
        raise KeyboardInterrupt
    model = hierseq.load(run_dir / "final")
    test = evaluate_split(model, splits["test"], spec.seq_len, spec.batch_size, spec.eval_batches)
    curve = training_curve(read_metrics(run_dir / "metrics.jsonl"))
    train_s = curve[-1]["train_s"] if curve else 0.0
    run = {
        "model": label,
        "seed": seed,
        "config": over,
        "n_params": result["n_params"],
        "steps": result["step"],
        "tokens": result["tokens"],
        "stopped_reason": result["stopped_reason"],
        # Over the whole run from its metrics (the trainer's own figure covers only its last session).
        "tokens_per_s": result["tokens"] / train_s if train_s > 0 else 0.0,
        "train_s": train_s,
        "val_bpb": result["val_bpb"],
        "test_bpb": test["bpb"],
        "run_dir": str(run_dir),
    }
    text = json.dumps({"status": "finished", "key": key, "run": run}, indent=1)
    atomic_write(marker, lambda tmp: Path(tmp).write_text(text))
    return {**run, "reused": False, "curve": curve}


def _comparable(train_config: dict[str, Any]) -> dict[str, Any]:
    """A TrainConfig dict without the fields that do not change a run's numbers (how it is watched,
    whether it was resumed, where it is)."""
    return {k: v for k, v in train_config.items() if k not in ("progress", "resume", "out_dir")}


def _previous_run(run_dir: Path, key: dict[str, Any], cfg: Any) -> tuple[dict[str, Any] | None, str]:
    """What ``run_dir`` holds that this run may use: ``(marker, "")`` with the marker's status "finished"
    (reuse it) or "interrupted" (resume its checkpoint), or ``(None, why not)`` ("" for an empty folder)."""
    import yaml

    from hierseq.training.checkpoint import find_checkpoint
    from hierseq.training.run_dir import existing_run_files
    from hierseq.training.trainer import TrainConfig

    if not existing_run_files(run_dir):
        return None, ""
    try:
        state = json.loads((run_dir / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return None, f"holds a run without a readable {RUN_MARKER} (unfinished, or from an older bench)"
    if not isinstance(state, dict) or state.get("key") != key:
        return None, "holds a run of other settings, code or data"
    # train_config.yaml describes the checkpoint and final model now in the folder (the trainer rewrites it
    # with each): a run trained there since the marker was written would show here.
    try:
        saved = TrainConfig.from_dict(yaml.safe_load((run_dir / "train_config.yaml").read_text()))
    except (OSError, ValueError, TypeError, yaml.YAMLError):
        return None, "holds a run whose train_config.yaml cannot be read"
    if _comparable(saved.to_dict()) != _comparable(cfg.to_dict()):
        return None, "holds a run whose train_config.yaml differs from its bench_run.json"
    if state.get("status") == "finished" and (run_dir / "final").is_dir() and (run_dir / "metrics.jsonl").is_file():
        return state, ""
    if state.get("status") == "interrupted" and find_checkpoint(run_dir) is not None:
        return state, ""
    return None, "holds an incomplete run"


def _data_digest(corpus: Any) -> str:
    """A digest of the corpus's three splits (their bytes): a data file edited in place changes it."""
    digest = hashlib.sha256()
    for name in ("train", "val", "test"):
        digest.update(name.encode() + b"\0" + corpus.split(name).numpy().tobytes() + b"\0")
    return digest.hexdigest()[:16]


# =============================================================================================== curves
def training_curve(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A run's learning curve from its ``metrics.jsonl`` events: one point per evaluation, ``{"step",
    "tokens", "train_s", "elapsed_s", "val_bpb"}``.

    ``train_s`` is the training time up to that evaluation in seconds: the trainer's per-step times summed
    (batch, forward, backward, optimiser step; no evaluation, checkpoint or setup time). Each train or eval
    event covers the steps since the previous event, with ``tokens_per_s`` = the interval's tokens over its
    seconds, so the interval took (tokens gained) / tokens_per_s. ``elapsed_s`` is the trainer's session
    wall time at the event, evaluations included, kept for the record."""
    points, train_s, tokens = [], 0.0, 0
    for e in events:
        if e.get("event") not in ("train", "eval"):
            continue
        gained = e["tokens"] - tokens
        if gained > 0:
            if not e.get("tokens_per_s"):
                raise ValueError(f"metrics: the event at step {e.get('step')} has tokens but no tokens_per_s")
            train_s += gained / e["tokens_per_s"]
        tokens = e["tokens"]
        if e["event"] == "eval" and e.get("val_bpb") is not None:
            point = {"step": e["step"], "tokens": tokens, "train_s": train_s, "elapsed_s": e.get("elapsed_s")}
            points.append({**point, "val_bpb": e["val_bpb"]})
    return points


def interpolate(xs: list[float], ys: list[float], x: float) -> float | None:
    """The piecewise-linear curve through the points (xs[i], ys[i]) (xs increasing) at ``x``; None when ``x``
    lies outside [xs[0], xs[-1]] (nothing is extrapolated)."""
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"interpolate: needs as many xs as ys and at least one point, got {len(xs)} and {len(ys)}")
    if x < xs[0] or x > xs[-1]:
        return None
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1 = xs[i - 1], xs[i]
            w = (x - x0) / (x1 - x0) if x1 > x0 else 1.0
            return ys[i - 1] + w * (ys[i] - ys[i - 1])
    return ys[0]  # a single point, at x


def add_equal_time(runs: list[dict[str, Any]]) -> float:
    """Set every run's ``val_bpb_equal_time``: its validation bits/byte after T seconds of training, read
    off its curve (:func:`interpolate` over ``train_s``; None when T comes before its first evaluation).
    T is the shortest run's training time, so T <= every run's training time; returns T in seconds.

    (The shortest run, not the smallest per-model median over seeds: with the median, the fastest model's
    quicker seeds would end before T and have no value there.)"""
    ends = [r["curve"][-1]["train_s"] for r in runs if r["curve"]]
    equal_time_s = min(ends) if ends else 0.0
    for r in runs:
        xs, ys = [p["train_s"] for p in r["curve"]], [p["val_bpb"] for p in r["curve"]]
        r["val_bpb_equal_time"] = interpolate(xs, ys, equal_time_s) if xs else None
    return equal_time_s


def mean_curve(curves: list[tuple[list[float], list[float]]]) -> tuple[list[float], list[float], list[float]]:
    """Mean and sample std over several curves (xs, ys) on the x range they all cover: at every x of any
    curve in that range, each curve interpolated there. Returns (xs, mean, std); std is 0 for one curve."""
    lo, hi = max(xs[0] for xs, _ in curves), min(xs[-1] for xs, _ in curves)
    grid = sorted({x for xs, _ in curves for x in xs if lo <= x <= hi})
    values = [[interpolate(xs, ys, x) for xs, ys in curves] for x in grid]
    mean = [statistics.mean(v) for v in values]
    std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
    return grid, mean, std


# =============================================================================================== report
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
                "val_bpb_equal_time": [r["val_bpb_equal_time"] for r in mine],
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
                "train_s": statistics.median(r["train_s"] for r in mine),
                "tokens": mine[0]["tokens"],
                "tokens_range": [min(r["tokens"] for r in mine), max(r["tokens"] for r in mine)],
                "all_full_budget": all(r["stopped_reason"] == "max_steps" for r in mine),
            }
        )
    return rows


def _seconds(t: float) -> str:
    return f"{t:.0f}" if t >= 100 else f"{t:.3g}"


def _markdown(report: dict) -> str:
    m = report["machine"]
    spec = report["spec"]
    subword = report.get("tokenizer", BYTES) != BYTES
    equal_time = _seconds(report["equal_time_s"])
    rows, before_first_eval = [], False
    for s in sorted(report["summary"], key=lambda s: statistics.mean(s["test_bpb"])):
        lo, hi = s["tokens_range"]
        budget = f"{lo:,}" if lo == hi else f"{lo:,} - {hi:,}"
        budget += "" if s["all_full_budget"] else " (time cap hit)"
        row = [s["model"], f"{s['n_params']:,}", s["seeds"], budget, _mean_std(s["val_bpb"]), _mean_std(s["test_bpb"])]
        if subword:  # the same for every model (one tokenizer), in each row so a table copied alone keeps it
            row.append(f"{report['tokens_per_byte']['test']:.3f}")
        if None in s["val_bpb_equal_time"]:
            before_first_eval = True
            row.append("n/a")
        else:
            row.append(_mean_std(s["val_bpb_equal_time"]))
        rows.append([*row, _seconds(s["train_s"]), f"{s['tokens_per_s']:.0f}"])
    header = ["model", "params", "seeds", "train tokens", "val bits/byte", "test bits/byte"]
    header += ["test tokens/byte"] if subword else []
    header += [f"val bits/byte at {equal_time} s", "train s", "train tokens/s"]
    if subword:
        per_byte = ", ".join(f"{k} {v:.3f}" for k, v in report["tokens_per_byte"].items())
        tokens = (
            f"tokenizer {report['tokenizer']} ({report['vocab_size']:,} tokens; tokens per byte {per_byte}); bits per "
            "byte = summed token loss / UTF-8 bytes of the scored text"
        )
    else:
        tokens = "byte-level"
    seeds = max(s["seeds"] for s in report["summary"])
    spread = "mean ± sample std over the seeds (each seed re-draws the weights and the batch order)"
    every = max(1, spec["steps"] // spec["evals"])
    notes = [
        f"Equal tokens: the val and test columns, after {spec['steps']} steps for every model"
        + (f"; {spread}" if seeds > 1 else "")
        + f"; validation every {every} steps and at the end, validation and test on {spec['eval_batches']} "
        "batches. Equal tokens favours slow models, so the next column compares equal training time: each run's "
        f"validation bits/byte after T = {equal_time} s of training, interpolated linearly between its "
        "evaluations. T is the shortest run's training time, so every curve reaches it; training time is the "
        "trainer's per-step time summed (batch, forward, backward, optimiser step), evaluations, checkpoints and "
        "setup excluded ('train s': the median run's). The runs' schedules are set for the full token budget, so "
        "at T a slower model is still mid-schedule (learning rate not yet annealed), which understates it somewhat.",
        "",
        "Wall-clock numbers (train s, tokens/s, the equal-time column) depend on this machine and on its load while "
        "the bench ran (the record line below gives the thread count and load averages): compare them within one "
        "report, not across machines.",
    ]
    if before_first_eval:
        notes += ["", "n/a: T comes before that model's first evaluation in at least one seed."]
    if report["reused_runs"]:
        notes += [
            "",
            f"{report['reused_runs']} of {len(report['runs'])} runs were reused from an earlier call with the same "
            "settings, code and data (their times are from when they ran).",
        ]
    return "\n".join(
        [
            f"# LM benchmark ({report['size']})",
            "",
            f"Data: {report['data']}; {tokens}; {spec['steps']} steps x {spec['batch_size']} x {spec['seq_len']} "
            f"tokens; models matched to the transformer's {report['target_params']:,} parameters (within 10%). "
            f"{m['date']}, {m['device']}, torch {m['torch']}, {m['threads']} threads.",
            "",
            markdown_table(header, rows),
            "",
            *notes,
            "",
            "Learning curves: `lm_curves.png` (validation bits/byte against training tokens and training seconds"
            + ("; mean over the seeds with a ±std band)." if seeds > 1 else ")."),
        ]
    )


def _plot_curves(runs: list[dict], models: list[str], equal_time_s: float, path: Path) -> None:
    """Two panels, validation bits/byte against training tokens and against training seconds (a dashed line
    at T): one line per model, the mean over its seeds with a ±std band when it has several."""
    plt = pyplot()
    if plt is None:
        return
    fig, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for i, name in enumerate(models):
        curves = [r["curve"] for r in runs if r["model"] == name and r["curve"]]
        if not curves:
            continue
        # The 10-colour cycle, then dashed lines, so up to 20 models stay distinguishable.
        style = {"color": f"C{i % 10}", "linestyle": "-" if i < 10 else "--", "label": name}
        for ax, x in ((by_tokens, "tokens"), (by_time, "train_s")):
            xs, mean, std = mean_curve([([p[x] for p in c], [p["val_bpb"] for p in c]) for c in curves])
            ax.plot(xs, mean, marker="o" if len(curves) == 1 else None, markersize=3, **style)
            if len(curves) > 1:
                low, high = [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)]
                ax.fill_between(xs, low, high, color=style["color"], alpha=0.15, linewidth=0)
    by_time.axvline(equal_time_s, color="k", linestyle=":", linewidth=1, label=f"T = {_seconds(equal_time_s)} s")
    by_tokens.set_title("equal tokens")
    by_time.set_title("equal wall-clock (curves over the time all seeds cover)")
    by_tokens.set_xlabel("training tokens")
    by_time.set_xlabel("training seconds (evaluations excluded)")
    by_tokens.set_ylabel("validation bits per byte")
    for ax in (by_tokens, by_time):
        ax.grid(True, alpha=0.3)
    by_time.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
