"""Reconstruction benchmark: HAMA against a flat masked autoencoder at equal width, depth, parameters
and training budget.

Quality: both models train with the one training loop (:func:`hierseq.training.train`, tasks
``masked_bytes`` and ``masked_signal``; every run's folder under ``OUT/runs/``) for the same steps /
batch / length / learning rate on
(1) masked bytes of the embedded Austen corpus (validation novel: masked-byte accuracy and cross-entropy)
and (2) a continuous multichannel signal task (masked-position MSE, and its ratio to predicting each
sequence's mean). The flat MAE hides the same fraction of positions as HAMA's first layer
(n_mask_0 / P_0). HAMA's learned scorer chooses *which* positions it hides, so its accuracy on its own
masks is reported next to its accuracy on random masks of the same count (``random_mask_*``), which
is the like-for-like comparison with the flat MAE.

Speed: forward time (median of repeats, no grad, batch 1) and peak extra memory (process RSS on CPU,
allocator peak on CUDA) of both models from 1k to 16k tokens.

Run: ``hierseq bench recon [--full] [--seeds 0,1] [--out runs/bench/recon] [--threads 1]``.
Writes ``recon.json``, ``recon.md`` and ``recon.png`` to the output folder.
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from .report import markdown_table, plot_scaling, pyplot, set_threads, write_report

QUICK = {
    "d_model": 64,
    "n_heads": 4,
    "seq_len": 128,
    "batch_size": 16,
    "steps": 400,
    "lr": 3e-3,
    "eval_batches": 8,
    "mask_ratio": 0.75,
    "lengths": [1024, 2048, 4096, 8192, 16384],
    "cost_length": 4096,
    "repeats": 1,
}
FULL = {**QUICK, "d_model": 128, "steps": 2000, "eval_batches": 20, "repeats": 3}

#: The main pair (quality on both tasks, speed at every length); every other variant trains on the
#: signal task only and is timed at ``cost_length``.
MAIN = ("hama", "flat_mae")


def hama_overrides(d_model: int, n_heads: int, mask_ratio: float, **extra: Any) -> dict[str, Any]:
    """HAMA of the benchmark: layer 0 = 4 nodes with windows of 16 hiding ``mask_ratio`` of them,
    layer 1 = 2 nodes of 64 (overlapping windows at the training length) that hide nothing more."""
    return {
        "d_model": d_model,
        "n_heads": n_heads,
        "n_layers": 2,
        "transformer_layers": 1,
        "nodes_per_layer": (4, 2),
        "partition_lengths": (16, 64),
        "n_masks": (1, 0),
        "mask_ratio": mask_ratio,
        **extra,
    }


def matched_flat_width(target_params: int, n_heads: int, mask_ratio: float) -> int:
    """The flat MAE width (a multiple of 2 * n_heads) whose parameter count on the signal task is
    closest to ``target_params``: the "equal parameters" of the comparison."""
    step = 2 * n_heads
    best, best_gap = step, None
    for width in range(step, 1025, step):
        gap = abs(_signal_params("flat_mae", flat_overrides(width, n_heads, mask_ratio)) - target_params)
        if best_gap is None or gap < best_gap:
            best, best_gap = width, gap
        elif gap > best_gap:  # the count grows with the width: past the minimum
            break
    return best


def flat_overrides(d_model: int, n_heads: int, mask_ratio: float) -> dict[str, Any]:
    return {"d_model": d_model, "n_heads": n_heads, "n_layers": 2, "decoder_layers": 2, "mask_ratio": mask_ratio}


def _signal_params(registry_name: str, overrides: dict[str, Any]) -> int:
    import hierseq

    model = hierseq.build_model(registry_name, input_type="continuous", d_input=8, **overrides)
    return hierseq.count_parameters(model)


def model_configs(d_model: int, n_heads: int, mask_ratio: float = 0.75) -> dict[str, tuple[str, dict[str, Any]]]:
    """label -> (registry name, config overrides). ``hama``: per-node weights, fusion, learned masks;
    ``flat_mae``: the flat control at the width that equalises parameters; ``hama_random_mask``: random
    masks; the ablation rows remove one mechanism (nodes, fusion, depth) from both masking variants;
    ``*_small`` is the size sweep of the quality-versus-cost plot (half the width, the flat MAE matched
    to its HAMA)."""
    configs: dict[str, tuple[str, dict[str, Any]]] = {}
    for label, width in (("", d_model), ("_small", d_model // 2)):
        hama = hama_overrides(width, n_heads, mask_ratio)
        flat = flat_overrides(
            matched_flat_width(_signal_params("hama", hama), n_heads, mask_ratio), n_heads, mask_ratio
        )
        configs[f"hama{label}"] = ("hama", hama)
        configs[f"flat_mae{label}"] = ("flat_mae", flat)
    configs["hama_random_mask"] = ("hama", hama_overrides(d_model, n_heads, mask_ratio, mask_strategy="random"))
    ablations = {
        "shared_nodes": {"share_nodes": True},
        "no_fusion": {"fusion_tokens": 0, "decoder_context": 0},
        "one_layer": {"n_layers": 1, "nodes_per_layer": (4,), "partition_lengths": (16,), "n_masks": (1,)},
    }
    # Each mechanism removed from both the learned-mask and the random-mask HAMA.
    for base, masking in (("hama", {}), ("hama_random_mask", {"mask_strategy": "random"})):
        for name, extra in ablations.items():
            configs[f"{base}_{name}"] = ("hama", hama_overrides(d_model, n_heads, mask_ratio, **masking, **extra))
    return configs


def _random_mask_eval(model: torch.nn.Module, batches: list[torch.Tensor]) -> dict[str, float]:
    """Metrics of a HAMA model evaluated with random (position-fixed) instead of learned masks."""
    from ..training.tasks.masked import evaluate_masked

    with model.masking("random"):
        return evaluate_masked(model, batches)


def quality(
    settings: dict[str, Any], seeds: list[int], log, tasks: tuple[str, ...] = ("bytes", "signal"), out_dir="runs"
) -> dict[str, Any]:
    """Train and evaluate every variant (the main pair on ``tasks``, the others on the signal task when
    it is requested); runs go to ``out_dir/<label>-<task>-seed<s>``."""
    import hierseq

    from ..training import TrainConfig, train
    from ..training.metrics import read_metrics
    from ..training.tasks import task_class

    out: dict[str, Any] = {}
    configs = model_configs(settings["d_model"], settings["n_heads"], settings["mask_ratio"])
    for label in settings.get("variants", configs):
        registry_name, overrides = configs[label]
        for task in tasks if label in MAIN else [t for t in tasks if t == "signal"]:
            runs = []
            for seed in seeds:
                run_dir = Path(out_dir) / f"{label}-{task}-seed{seed}"
                cfg = TrainConfig(
                    model=registry_name,
                    model_config=dict(overrides),
                    task=f"masked_{task}",
                    seq_len=settings["seq_len"],
                    batch_size=settings["batch_size"],
                    max_steps=settings["steps"],
                    lr=settings["lr"],
                    warmup_steps=max(1, settings["steps"] // 20),
                    weight_decay=0.01,
                    eval_every=0,
                    eval_batches=settings["eval_batches"],
                    eval_batch_size=16,
                    log_every=max(1, settings["steps"] // 5),
                    save_every=0,
                    seed=seed,
                    out_dir=str(run_dir),
                    progress=False,
                )
                result = train(cfg, log=None)
                final = dict(result["val"])
                if registry_name == "hama" and overrides.get("mask_strategy", "learned") == "learned":
                    val = task_class(cfg.task)(cfg)
                    val.setup(0, 1, torch.device("cpu"))  # the run's validation inputs
                    model = hierseq.load(run_dir / "final")
                    final.update({f"random_mask_{k}": v for k, v in _random_mask_eval(model, val.eval_inputs).items()})
                    if task == "signal":
                        final.update(mask_probe(model))
                run = {
                    "seed": seed,
                    "params": result["n_params"],
                    "train_time_s": result["elapsed_s"],
                    "final": final,
                    "train_loss": [
                        e["loss"] for e in read_metrics(run_dir / "metrics.jsonl") if e.get("loss") is not None
                    ],
                }
                runs.append(run)
                log(f"{label:<18} {task:<6} seed {seed}: {_summary(task, final)} ({result['elapsed_s']:.0f} s)")
            out.setdefault(label, {})[task] = {"runs": runs, "mean": _mean_final(runs)}
    return out


@torch.no_grad()
def mask_probe(model: torch.nn.Module, batch: int = 16, length: int = 128) -> dict[str, float]:
    """Where a learned masker hides tokens. HAMA hides a fixed count in every layer-0 window, so the
    probe alternates flat and busy stretches *inside* windows: the first half of every window of P_0
    tokens is flat (a constant per channel plus the task's noise), the second half is the task's
    sinusoid mixture. Returns the fraction of the hidden tokens that fall in busy stretches in eval
    mode (its top-k choice; 0.5 = indifferent)."""
    from ..training.tasks.masked import SinusoidSignals

    gen = torch.Generator().manual_seed(1234)
    busy = SinusoidSignals(model.config.input_dim).sample(batch, length, gen)
    flat = busy[:, :1] + 0.05 * torch.randn(busy.shape, generator=gen)
    window = model.config.layer_plan()[0][1]
    is_busy = (torch.arange(length) % window) >= window // 2  # [L]
    x = torch.where(is_busy[None, :, None], busy, flat)
    model.eval()
    mask = model(x).mask
    return {"probe_busy_share_of_hidden": float(mask[:, is_busy].sum() / mask.sum().clamp(min=1))}


def unigram_baseline_acc() -> float:
    """Accuracy on the validation novel of always guessing the most frequent training byte (a space):
    the floor any masked-byte model must beat to have learned something from context."""
    from ..data.corpora import load_corpus

    corpus = load_corpus(None)
    top = int(torch.bincount(corpus.train.long(), minlength=256).argmax())
    return float((corpus.val.long() == top).float().mean())


def _summary(task: str, final: dict[str, float]) -> str:  # one log line
    if task == "bytes":
        return f"masked acc {final['masked_acc']:.3f}, masked CE {final['masked_ce']:.3f}"
    return f"masked MSE {final['masked_mse']:.3f} (mean baseline {final['mean_baseline_mse']:.3f})"


def _mean_final(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = runs[0]["final"].keys()
    return {k: statistics.fmean(r["final"][k] for r in runs) for k in keys}


def speed(settings: dict[str, Any], log, time_budget_s: float = 120.0) -> dict[str, list[dict[str, Any]]]:
    """Forward time and peak memory at batch 1: the main pair at every length of ``settings["lengths"]``,
    every other variant at ``settings["cost_length"]`` only (the cost axis of the quality plot)."""
    import hierseq

    from .memory import peak_memory

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict[str, list[dict[str, Any]]] = {}
    configs = model_configs(settings["d_model"], settings["n_heads"], settings["mask_ratio"])
    for label in settings.get("variants", configs):
        registry_name, overrides = configs[label]
        torch.manual_seed(0)
        model = hierseq.build_model(registry_name, **overrides).to(device).eval()
        lengths = settings["lengths"] if label in MAIN else [settings["cost_length"]]
        rows: list[dict[str, Any]] = []
        spent, stopped = 0.0, None
        with torch.no_grad():
            model(torch.randint(0, 256, (1, 256), device=device))  # warm-up
            for length in lengths:
                if stopped:
                    rows.append({"length": length, "status": stopped})
                    continue
                x = torch.randint(0, 256, (1, length), device=device)
                t_start = time.perf_counter()
                times = []
                for _ in range(settings["repeats"]):
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    t0 = time.perf_counter()
                    model(x)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    times.append(time.perf_counter() - t0)
                with peak_memory(device) as mem:
                    model(x)
                rows.append(
                    {
                        "length": length,
                        "status": "ok",
                        "forward_s": statistics.median(times),
                        "us_per_token": 1e6 * statistics.median(times) / length,
                        "peak_mem_mb": mem["peak_bytes"] / 2**20,
                    }
                )
                row = rows[-1]
                log(f"{label:<18} L={length:<6} forward {row['forward_s']:.3f} s, peak {row['peak_mem_mb']:.0f} MiB")
                spent += time.perf_counter() - t_start
                if spent > time_budget_s:
                    stopped = "time budget"
        results[label] = rows
    return results


def run_recon_bench(
    out_dir: str = "runs/bench/recon",
    quick: bool = True,
    seeds: list[int] | tuple[int, ...] = (0,),
    steps: int | None = None,
    lengths: list[int] | None = None,
    threads: int | None = None,
    skip_speed: bool = False,
    tasks: tuple[str, ...] | list[str] = ("bytes", "signal"),
    variants: list[str] | None = None,
    log=print,
) -> dict[str, Any]:
    """Train and evaluate HAMA, the flat MAE and HAMA's ablations at 75% masking (``quick``: d_model
    64, 400 steps; else d_model 128, 2000 steps), time their forward passes (main pair from 1k to 16k
    tokens), write recon.json / .md / .png under ``out_dir`` (each training run's folder under
    ``out_dir/runs/``), print the Markdown table and return the report. ``variants``: labels of
    :func:`model_configs` to run (default all)."""
    settings = dict(QUICK if quick else FULL)
    if steps is not None:
        settings["steps"] = steps
    if lengths is not None:
        settings["lengths"] = sorted(lengths)
    # The main pair is timed at the cost length too, so it has a point on the quality-cost plot.
    settings["lengths"] = sorted(set(settings["lengths"]) | {settings["cost_length"]})
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds=[]: give at least one seed")
    bad = [t for t in tasks if t not in ("bytes", "signal")]
    if bad or not tasks:
        raise ValueError(f"tasks={list(tasks)}: choose from ['bytes', 'signal']")
    set_threads(threads)
    t0 = time.perf_counter()
    configs = model_configs(settings["d_model"], settings["n_heads"], settings["mask_ratio"])
    unknown = sorted(set(variants or ()) - set(configs))
    if unknown:
        raise ValueError(f"variants={unknown}: choose from {list(configs)}")
    settings["variants"] = list(variants or configs)
    report: dict[str, Any] = {
        "benchmark": "recon",
        "quick": quick,
        "settings": settings,
        "seeds": seeds,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "models": {},
    }
    for label in settings["variants"]:
        registry_name, overrides = configs[label]
        report["models"][label] = {
            "registry": registry_name,
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
            "params_signal_task": _signal_params(registry_name, overrides),
        }
    report["unigram_baseline_acc"] = unigram_baseline_acc()
    report["quality"] = quality(settings, seeds, log, tuple(tasks), Path(out_dir) / "runs")
    report["speed"] = {} if skip_speed else speed(settings, log)
    report["wall_time_s"] = time.perf_counter() - t0
    return write_report(out_dir, "recon", report, markdown(report), plot=lambda path: _plot(report, path), echo=True)


def _cost_ms_per_1k(report: dict[str, Any], label: str) -> float | None:
    """Forward ms per 1k tokens of ``label`` at the cost length (None when not timed)."""
    for row in report["speed"].get(label, []):
        if row["length"] == report["settings"]["cost_length"] and row["status"] == "ok":
            return row["us_per_token"]  # µs per token = ms per 1k tokens
    return None


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        "# Reconstruction benchmark: HAMA vs flat masked autoencoder",
        "",
        f"d_model {s['d_model']} (HAMA; each flat MAE at the width that matches its parameters), {s['n_heads']} "
        f"heads, {s['mask_ratio']:.0%} of layer-0 tokens masked; {s['steps']} steps, batch {s['batch_size']} x "
        f"{s['seq_len']} tokens, lr {s['lr']}; seeds {report['seeds']}; {report['device']}, "
        f"{report['threads']} threads, torch {report['torch']}.",
        "",
        "| model | params (signal) | signal: masked MSE | MSE / mean baseline | on random masks | busy share of hidden "
        f"| ms / 1k tokens at {s['cost_length']} | bytes: masked acc | masked CE | acc / CE on random masks |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(d: dict[str, float], key: str) -> str:
        return f"{d[key]:.3f}" if key in d else ""

    for label, tasks in report["quality"].items():
        b = tasks["bytes"]["mean"] if "bytes" in tasks else {}
        g = tasks["signal"]["mean"] if "signal" in tasks else {}
        cost = _cost_ms_per_1k(report, label)
        lines.append(
            f"| {label} | {report['models'][label]['params_signal_task']:,} | {fmt(g, 'masked_mse')} "
            f"| {fmt(g, 'mse_ratio')} | {fmt(g, 'random_mask_mse_ratio')} | {fmt(g, 'probe_busy_share_of_hidden')} "
            f"| {'' if cost is None else f'{cost:.1f}'} | {fmt(b, 'masked_acc')} | {fmt(b, 'masked_ce')} "
            f"| {fmt(b, 'random_mask_masked_acc')} / {fmt(b, 'random_mask_masked_ce')} |"
        )
    lines += [
        "",
        f"Guessing the most frequent byte everywhere scores accuracy {report['unigram_baseline_acc']:.3f}. "
        "A learned-mask HAMA is scored on its own masks (chosen by its policy) and, in 'on random masks', on "
        "random masks of the same count: the like-for-like number. 'busy share of hidden': on signals that "
        "are flat in their first half and busy in the second, the fraction of the hidden tokens in the busy "
        "half (0.5 = indifferent).",
    ]
    if report["speed"]:
        speed_rows = [
            [label, r["length"], f"{1e3 * r['forward_s']:.0f}", f"{r['us_per_token']:.1f}", f"{r['peak_mem_mb']:.0f}"]
            if r["status"] == "ok"
            else [label, r["length"], r["status"], "", ""]
            for label, rows in report["speed"].items()
            for r in rows
        ]
        lines += ["", markdown_table(["model", "length", "forward ms", "µs / token", "peak MiB"], speed_rows)]
    return "\n".join(lines) + "\n"


def _plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    for family, marker in (("hama", "o"), ("flat_mae", "s")):
        points = []
        for label, tasks in report["quality"].items():
            if report["models"][label]["registry"] != family or "signal" not in tasks:
                continue
            cost = _cost_ms_per_1k(report, label)
            if cost is not None:
                points.append((cost, tasks["signal"]["mean"]["masked_mse"], label))
        for cost, mse, label in points:
            ax.scatter([cost], [mse], marker=marker, label=label)
    ax.set_xscale("log")
    ax.set_xlabel(f"forward ms per 1k tokens (at {report['settings']['cost_length']} tokens)")
    ax.set_ylabel("signal: masked MSE")
    ax.set_title("quality vs cost (lower left is better)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    speed = {k: v for k, v in report["speed"].items() if k in MAIN}
    plot_scaling(axes[1], speed, "length", "forward_s", "forward time (s), batch 1", "sequence length")
    plot_scaling(axes[2], speed, "length", "peak_mem_mb", "peak extra memory (MiB)", "sequence length")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
