"""Speed benchmark: forward and forward+backward time per token and peak memory vs sequence length,
for registered causal LMs at matched width and depth, medians over repeats, ratios against the
``transformer`` control measured in the same process.

Run: ``hierseq bench speed [--models a,b] [--lengths 512,1024] [--repeats 3]``
Writes ``speed.json``, ``speed.md`` and ``speed.png`` (log-log time and memory vs length) to ``--out``.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .report import check_model_specs

DEFAULT_LENGTHS = [512, 1024, 2048, 4096, 8192, 16384, 32768]


def _model_overrides(name: str, d_model: int, n_layers: int) -> dict:
    """Matched width/depth; heads (where a model has them) at 64 channels each."""
    from hierseq.registry import get_entry

    fields = get_entry(name).config_cls.field_names()
    over = {"d_model": d_model, "n_layers": n_layers}
    if "n_heads" in fields:
        over["n_heads"] = max(1, d_model // 64)
    if "max_seq_len" in fields:
        over["max_seq_len"] = max(DEFAULT_LENGTHS)
    return over


def _time_once(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def measure(model, length: int, batch_size: int, repeats: int, device: torch.device) -> dict:
    """Median forward and forward+backward seconds, and peak extra memory of one fwd+bwd."""
    from .memory import peak_memory

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch_size, length), device=device)

    def forward() -> None:
        with torch.no_grad():
            model(ids)

    def forward_backward() -> None:
        out = model(ids, labels=ids)
        out.loss.backward()

    model.train()
    fwd, fwd_bwd = [], []
    forward()  # warm-up (allocator, rotary tables)
    for _ in range(repeats):
        fwd.append(_time_once(forward, device))
        model.zero_grad(set_to_none=True)
        fwd_bwd.append(_time_once(forward_backward, device))
        model.zero_grad(set_to_none=True)
    with peak_memory(device) as mem:
        forward_backward()
    model.zero_grad(set_to_none=True)
    tokens = batch_size * length
    fwd_med, fb_med = statistics.median(fwd), statistics.median(fwd_bwd)
    return {
        "length": length,
        "status": "ok",
        "forward_s": fwd_med,
        "forward_backward_s": fb_med,
        "forward_us_per_token": 1e6 * fwd_med / tokens,
        "forward_backward_us_per_token": 1e6 * fb_med / tokens,
        "peak_mem_mb": mem["peak_bytes"] / 2**20,
    }


def run_speed_bench(
    out_dir: str = "runs/bench/speed",
    models: list[str] | None = None,
    lengths: list[int] | None = None,
    repeats: int = 3,
    time_budget_s: float = 60.0,
    d_model: int = 256,
    n_layers: int = 4,
    batch_size: int = 1,
    seed: int = 0,
) -> dict:
    """``models`` are registry names or variants ``"tree:sibling_mode=exact"`` (see
    :func:`hierseq.bench.report.parse_model_spec`); the variant's overrides apply on top of the matched
    width and depth."""
    import hierseq

    specs = check_model_specs(models or hierseq.list_models(kind="causal_lm"), "causal_lm")
    if "transformer" not in [label for label, _, _ in specs]:
        specs = [("transformer", "transformer", {}), *specs]  # ratios need the control in the same process
    lengths = sorted(lengths or DEFAULT_LENGTHS)
    if any(n < 1 for n in lengths):
        raise ValueError(f"lengths={lengths}: every length must be >= 1")
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: must be >= 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    results: dict[str, list[dict]] = {}
    for label, name, variant in specs:
        config = {**_model_overrides(name, d_model, n_layers), **variant}
        model = hierseq.build_model(name, **config).to(device)
        rows: list[dict] = []
        spent = 0.0
        stopped = None
        for length in tqdm(lengths, desc=f"speed {label}", leave=False):
            if stopped:
                rows.append({"length": length, "status": stopped})
                continue
            t0 = time.perf_counter()
            try:
                rows.append(measure(model, length, batch_size, repeats, device))
            except (RuntimeError, MemoryError) as e:  # out of memory: record it and stop this model
                if "out of memory" not in str(e).lower() and not isinstance(e, MemoryError):
                    raise
                stopped = "oom"
                rows.append({"length": length, "status": "oom"})
            spent += time.perf_counter() - t0
            if not stopped and spent > time_budget_s:
                stopped = "time budget"
        results[label] = rows
        del model
    _add_ratios(results)
    report = {
        "benchmark": "speed",
        "device": str(device),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "d_model": d_model,
        "n_layers": n_layers,
        "batch_size": batch_size,
        "repeats": repeats,
        "results": results,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "speed.md").write_text(_markdown(report))
    _plot(report, out / "speed.png")
    print((out / "speed.md").read_text())
    return report


def _add_ratios(results: dict[str, list[dict]]) -> None:
    base = {r["length"]: r for r in results.get("transformer", []) if r["status"] == "ok"}
    for rows in results.values():
        for r in rows:
            b = base.get(r["length"])
            if r["status"] == "ok" and b:
                r["forward_backward_ratio_vs_transformer"] = r["forward_backward_s"] / b["forward_backward_s"]
                r["memory_ratio_vs_transformer"] = r["peak_mem_mb"] / b["peak_mem_mb"] if b["peak_mem_mb"] > 0 else None


def _markdown(report: dict) -> str:
    lines = [
        "# Speed benchmark",
        "",
        f"Device {report['device']}, torch {report['torch']}, {report['threads']} threads; d_model "
        f"{report['d_model']}, {report['n_layers']} layers, batch {report['batch_size']}; medians of "
        f"{report['repeats']} repeats; ratios vs the transformer measured in the same process.",
        "",
        "| model | length | fwd ms | fwd+bwd ms | fwd+bwd µs/token | peak MiB | time ratio | mem ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in report["results"].items():
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"| {name} | {r['length']} | {r['status']} | | | | | |")
                continue
            ratio = r.get("forward_backward_ratio_vs_transformer")
            mem_ratio = r.get("memory_ratio_vs_transformer")
            lines.append(
                f"| {name} | {r['length']} | {1e3 * r['forward_s']:.1f} | {1e3 * r['forward_backward_s']:.1f} "
                f"| {r['forward_backward_us_per_token']:.1f} | {r['peak_mem_mb']:.0f} "
                f"| {'' if ratio is None else f'{ratio:.2f}'} | {'' if mem_ratio is None else f'{mem_ratio:.2f}'} |"
            )
    return "\n".join(lines) + "\n"


def _plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping speed.png (pip install hierseq[plots])")
        return
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in report["results"].items():
        ok = [r for r in rows if r["status"] == "ok"]
        if not ok:
            continue
        xs = [r["length"] for r in ok]
        ax_t.plot(xs, [r["forward_backward_s"] for r in ok], marker="o", label=name)
        ax_m.plot(xs, [max(r["peak_mem_mb"], 1e-3) for r in ok], marker="o", label=name)
    for ax, title in ((ax_t, "forward+backward time (s)"), (ax_m, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
