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

from .report import markdown_table, plot_scaling, pyplot, write_report

QUICK = {
    "d_model": 64,
    "n_heads": 4,
    "seq_len": 128,
    "batch_size": 16,
    "steps": 400,
    "lr": 3e-3,
    "eval_batches": 8,
    "lengths": [1024, 2048, 4096, 8192, 16384],
    "repeats": 1,
}
FULL = {**QUICK, "d_model": 128, "steps": 2000, "eval_batches": 20, "repeats": 3}


def model_configs(d_model: int, n_heads: int) -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (registry name, config overrides). Two hierarchy layers of one encoder + one decoder
    layer each for HAMA; two encoder + two decoder layers for the flat MAE: the same 4 transformer
    layers of the same width. HAMA layer 0 hides 4 of every 16 tokens; the flat MAE hides 25%."""
    hama = {
        "d_model": d_model,
        "n_heads": n_heads,
        "n_layers": 2,
        "transformer_layers": 1,
        "nodes_per_layer": (8, 4),
        "partition_lengths": (16, 64),
        "n_masks": (4, 8),
    }
    flat = {"d_model": d_model, "n_heads": n_heads, "n_layers": 2, "decoder_layers": 2, "mask_ratio": 4 / 16}
    return {"hama": ("hama", hama), "flat_mae": ("flat_mae", flat)}


def _random_mask_eval(model: torch.nn.Module, batches: list[torch.Tensor]) -> dict[str, float]:
    """Metrics of a HAMA model evaluated with random (position-fixed) instead of learned masks."""
    from ..training.tasks.masked import evaluate_masked

    with model.masking("random"):
        return evaluate_masked(model, batches)


def quality(
    settings: dict[str, Any], seeds: list[int], log, tasks: tuple[str, ...] = ("bytes", "signal"), out_dir="runs"
) -> dict[str, Any]:
    """Train and evaluate both models on every task and seed; runs go to ``out_dir/<model>-<task>-seed<s>``."""
    import hierseq

    from ..training import TrainConfig, train
    from ..training.metrics import read_metrics
    from ..training.tasks import task_class

    out: dict[str, Any] = {}
    for label, (registry_name, overrides) in model_configs(settings["d_model"], settings["n_heads"]).items():
        for task in tasks:
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
                log(f"{label:<9} {task:<6} seed {seed}: {_summary(task, final)} ({result['elapsed_s']:.0f} s)")
            out.setdefault(label, {})[task] = {"runs": runs, "mean": _mean_final(runs)}
    return out


def unigram_baseline_acc() -> float:
    """Accuracy on the validation novel of always guessing the most frequent training byte (a space):
    the floor any masked-byte model must beat to have learned something from context."""
    from ..data.corpora import load_corpus

    corpus = load_corpus(None)
    top = int(torch.bincount(corpus.train.long(), minlength=256).argmax())
    return float((corpus.val.long() == top).float().mean())


def _summary(task: str, final: dict[str, float]) -> str:
    if task == "bytes":
        return f"masked acc {final['masked_acc']:.3f}, masked CE {final['masked_ce']:.3f}"
    return f"masked MSE {final['masked_mse']:.3f} (mean baseline {final['mean_baseline_mse']:.3f})"


def _mean_final(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = runs[0]["final"].keys()
    return {k: statistics.fmean(r["final"][k] for r in runs) for k in keys}


def speed(settings: dict[str, Any], log, time_budget_s: float = 120.0) -> dict[str, list[dict[str, Any]]]:
    import hierseq

    from .memory import peak_memory

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict[str, list[dict[str, Any]]] = {}
    for label, (registry_name, overrides) in model_configs(settings["d_model"], settings["n_heads"]).items():
        torch.manual_seed(0)
        model = hierseq.build_model(registry_name, **overrides).to(device).eval()
        rows: list[dict[str, Any]] = []
        spent, stopped = 0.0, None
        with torch.no_grad():
            model(torch.randint(0, 256, (1, 256), device=device))  # warm-up
            for length in settings["lengths"]:
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
                log(f"{label:<9} L={length:<6} forward {row['forward_s']:.3f} s, peak {row['peak_mem_mb']:.0f} MiB")
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
    log=print,
) -> dict[str, Any]:
    """Train and evaluate HAMA and the flat MAE (``quick``: d_model 64, 400 steps; else d_model 128,
    2000 steps), time their forward passes from 1k to 16k tokens, write recon.json / .md / .png under
    ``out_dir`` (each training run's folder under ``out_dir/runs/``), print the Markdown table and
    return the report."""
    settings = dict(QUICK if quick else FULL)
    if steps is not None:
        settings["steps"] = steps
    if lengths is not None:
        settings["lengths"] = sorted(lengths)
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds=[]: give at least one seed")
    if threads is not None:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
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
    import hierseq

    for label, (registry_name, overrides) in model_configs(settings["d_model"], settings["n_heads"]).items():
        report["models"][label] = {
            "registry": registry_name,
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
            "params_bytes_task": hierseq.count_parameters(hierseq.build_model(registry_name, **overrides)),
        }
    report["unigram_baseline_acc"] = unigram_baseline_acc()
    bad = [t for t in tasks if t not in ("bytes", "signal")]
    if bad or not tasks:
        raise ValueError(f"tasks={list(tasks)}: choose from ['bytes', 'signal']")
    report["quality"] = quality(settings, seeds, log, tuple(tasks), Path(out_dir) / "runs")
    report["speed"] = {} if skip_speed else speed(settings, log)
    report["wall_time_s"] = time.perf_counter() - t0
    return write_report(out_dir, "recon", report, markdown(report), plot=lambda path: _plot(report, path), echo=True)


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        "# Reconstruction benchmark: HAMA vs flat masked autoencoder",
        "",
        f"d_model {s['d_model']}, {s['n_heads']} heads, 4 transformer layers each; {s['steps']} steps, batch "
        f"{s['batch_size']} x {s['seq_len']} tokens, lr {s['lr']}; seeds {report['seeds']}; "
        f"{report['device']}, {report['threads']} threads, torch {report['torch']}.",
        "",
        "| model | params | bytes: masked acc | masked CE (nats) | acc / CE on random masks | signal: masked MSE "
        "| MSE / mean baseline | ratio on random masks | train s (bytes) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(d: dict[str, float], key: str) -> str:
        return f"{d[key]:.3f}" if key in d else ""

    for label, tasks in report["quality"].items():
        b = tasks["bytes"]["mean"] if "bytes" in tasks else {}
        g = tasks["signal"]["mean"] if "signal" in tasks else {}
        train_s = f"{tasks['bytes']['runs'][0]['train_time_s']:.0f}" if "bytes" in tasks else ""
        lines.append(
            f"| {label} | {report['models'][label]['params_bytes_task']:,} | {fmt(b, 'masked_acc')} "
            f"| {fmt(b, 'masked_ce')} | {fmt(b, 'random_mask_masked_acc')} / {fmt(b, 'random_mask_masked_ce')} "
            f"| {fmt(g, 'masked_mse')} | {fmt(g, 'mse_ratio')} | {fmt(g, 'random_mask_mse_ratio')} | {train_s} |"
        )
    if "unigram_baseline_acc" in report:
        lines += [
            "",
            f"Guessing the most frequent byte everywhere scores accuracy {report['unigram_baseline_acc']:.3f}. "
            "HAMA's own masks are chosen by its learned scorer (it may hide easy bytes); 'acc on random "
            "masks' evaluates it on random masks of the same count, the like-for-like number.",
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
    for label, tasks in report["quality"].items():
        if "bytes" in tasks:
            curve = tasks["bytes"]["runs"][0]["train_loss"]
            axes[0].plot(range(1, len(curve) + 1), curve, marker="o", label=label)
    axes[0].set_title("bytes: training loss (masked CE, seed 0), per fifth of training")
    if axes[0].get_legend_handles_labels()[0]:  # no curve when the bytes task was skipped
        axes[0].legend()
    speed = report["speed"]
    plot_scaling(axes[1], speed, "length", "forward_s", "forward time (s), batch 1", "sequence length")
    plot_scaling(axes[2], speed, "length", "peak_mem_mb", "peak extra memory (MiB)", "sequence length")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
