"""Speed benchmark: forward and forward+backward time per token and peak memory vs sequence length,
and generation cost per new token vs context length, for registered causal LMs at matched width and
depth, medians over repeats, ratios against the ``transformer`` control measured in the same process.
Optionally (``--peers``) the same shapes timed with PyPI implementations next to ours
(:mod:`hierseq.bench.peers`).

Run: ``hierseq bench speed [--models a,b] [--lengths 512,1024] [--repeats 3] [--gen-contexts 1024,4096]
[--peers]``. Writes ``speed.json``, ``speed.md`` (summary per model first, then per length) and
``speed.png`` (log-log time and memory vs length, generation ms/token vs context) to ``--out``.
"""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

from .generation_cost import DEFAULT_GEN_TOKENS, check_contexts, generation_sweep
from .memory import available_memory_bytes, peak_memory
from .peers import run_peers, select_peers
from .report import check_model_specs, markdown_table, plot_scaling, pyplot, write_report
from .sweep import add_control_ratios, budgeted_sweep, time_call

DEFAULT_LENGTHS = [512, 1024, 2048, 4096, 8192, 16384, 32768]
#: lengths whose fwd+bwd time and memory ratios vs the transformer the summary table shows
SUMMARY_LENGTHS = (4096, 16384)


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


def measure(model, length: int, batch_size: int, repeats: int, device: torch.device) -> dict:
    """Median forward and forward+backward seconds, and peak extra memory of one fwd+bwd."""
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
        fwd.append(time_call(forward, device))
        model.zero_grad(set_to_none=True)
        fwd_bwd.append(time_call(forward_backward, device))
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
    gen_contexts: Sequence[int] | None = None,
    gen_tokens: int = DEFAULT_GEN_TOKENS,
    peers: bool | Sequence[str] = False,
) -> dict:
    """``models`` are registry names or variants ``"tree:sibling_mode=exact"`` (see
    :func:`hierseq.bench.report.parse_model_spec`); the variant's overrides apply on top of the matched
    width and depth.

    ``gen_contexts``: context lengths at which every model's cached generation cost per new token is
    measured (:mod:`hierseq.bench.generation_cost`; ``hierseq bench speed`` passes 1024,4096,16384);
    ``None``/``[]``/``[0]`` skip it. Each model gets ``time_budget_s`` for its lengths and again for its
    generation contexts. ``peers``: ``True`` times every installed peer of :mod:`hierseq.bench.peers`
    at the same lengths (a list names some of them); with ``peers`` asked for and none installed this
    raises ValueError before measuring anything."""
    import hierseq

    specs = check_model_specs(models or hierseq.list_models(kind="causal_lm"), "causal_lm")
    if "transformer" not in [label for label, _, _ in specs]:
        specs = [("transformer", "transformer", {}), *specs]  # ratios need the control in the same process
    lengths = sorted(lengths or DEFAULT_LENGTHS)
    if any(n < 1 for n in lengths):
        raise ValueError(f"lengths={lengths}: every length must be >= 1")
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: must be >= 1")
    gen_contexts = check_contexts(gen_contexts)
    if gen_contexts and gen_tokens < 1:
        raise ValueError(f"gen_tokens={gen_tokens}: must be >= 1")
    chosen_peers = select_peers(peers)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    results: dict[str, list[dict]] = {}
    generation: dict[str, list[dict]] = {}
    configs: dict[str, dict] = {}  # registry name -> overrides of its plain (non-variant) run, for the peers
    for label, name, variant in specs:
        config = {**_model_overrides(name, d_model, n_layers), **variant}
        if label == name:
            configs[name] = config
        model = hierseq.build_model(name, **config).to(device)
        free = available_memory_bytes(device)
        results[label] = budgeted_sweep(
            lengths,
            lambda n, model=model: measure(model, n, batch_size, repeats, device),
            time_budget_s,
            desc=f"speed {label}",
            memory_limit_mb=None if free is None else 0.8 * free / 2**20,
        )
        if gen_contexts:
            generation[label] = generation_sweep(
                model, gen_contexts, gen_tokens, time_budget_s, seed, desc=f"generation {label}"
            )
        del model
    add_control_ratios(results, "length", "forward_backward_s", "forward_backward_ratio_vs_transformer")
    add_control_ratios(results, "length", "peak_mem_mb", "memory_ratio_vs_transformer")
    add_control_ratios(generation, "context", "ms_per_token", "ms_per_token_ratio_vs_transformer")
    report = {
        "benchmark": "speed",
        "device": str(device),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        # CPU times depend on the allocator: glibc's default mmaps (and page-faults afresh) every block
        # over 32 MiB, which costs per byte allocated; GLIBC_TUNABLES=glibc.malloc.mmap_max=0 reuses them.
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES") or None,
        "d_model": d_model,
        "n_layers": n_layers,
        "batch_size": batch_size,
        "repeats": repeats,
        "gen_contexts": gen_contexts,
        "gen_tokens": gen_tokens if gen_contexts else None,
        "results": results,
        "generation": generation,
    }
    report["summary"] = _summary(report)
    if chosen_peers:
        report["peers"] = run_peers(
            chosen_peers, configs, lengths, d_model, batch_size, repeats, device, time_budget_s, seed
        )
    return write_report(out_dir, "speed", report, _markdown(report), plot=lambda path: _plot(report, path), echo=True)


def _summary(report: dict) -> list[dict]:
    """Per model: the longest length that ran, time and memory ratios at :data:`SUMMARY_LENGTHS` and the
    generation cost at each context. A length or context that was not in the run is absent (``None``)."""
    summary = []
    for label, rows in report["results"].items():
        ok = [r["length"] for r in rows if r["status"] == "ok"]
        by_length = {r["length"]: r for r in rows}
        by_context = {r["context"]: r for r in report["generation"].get(label, [])}
        at_length = {}
        for n in SUMMARY_LENGTHS:
            r = by_length.get(n)
            at_length[str(n)] = r and {
                "status": r["status"],
                "forward_backward_ratio": r.get("forward_backward_ratio_vs_transformer"),
                "memory_ratio": r.get("memory_ratio_vs_transformer"),
            }
        gen = {}
        for c in report["gen_contexts"]:
            r = by_context.get(c)
            gen[str(c)] = r and {
                "status": r["status"],
                "ms_per_token": r.get("ms_per_token"),
                "ratio_vs_transformer": r.get("ms_per_token_ratio_vs_transformer"),
            }
        summary.append(
            {"model": label, "longest_ok_length": max(ok, default=None), "vs_transformer": at_length, "generation": gen}
        )
    return summary


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def _ratio_cell(cell: dict | None, key: str) -> str:
    if cell is None:
        return ""
    return _fmt(cell[key], suffix="×") if cell["status"] == "ok" else cell["status"]


def _gen_cell(cell: dict | None) -> str:
    if cell is None:
        return ""
    if cell["status"] != "ok":
        return cell["status"]
    ratio = cell["ratio_vs_transformer"]
    return f"{cell['ms_per_token']:.2f}" + ("" if ratio is None else f" ({ratio:.2f}×)")


def _summary_markdown(report: dict) -> list[str]:
    header = ["model", "longest ok length"]
    for n in SUMMARY_LENGTHS:
        header += [f"fwd+bwd ×T @{n}", f"mem ×T @{n}"]
    header += [f"gen ms/token @{c} (×T)" for c in report["gen_contexts"]]
    rows = []
    for entry in report["summary"]:
        row = [entry["model"], _fmt(entry["longest_ok_length"], "d")]
        for n in SUMMARY_LENGTHS:
            cell = entry["vs_transformer"][str(n)]
            row += [_ratio_cell(cell, "forward_backward_ratio"), _ratio_cell(cell, "memory_ratio")]
        row += [_gen_cell(entry["generation"][str(c)]) for c in report["gen_contexts"]]
        rows.append(row)
    return ["## Summary", "", markdown_table(header, rows), ""]


def _detail_markdown(report: dict) -> list[str]:
    rows = []
    for name, results in report["results"].items():
        for r in results:
            if r["status"] != "ok":
                rows.append([name, r["length"], r["status"], "", "", "", "", ""])
                continue
            rows.append(
                [
                    name,
                    r["length"],
                    f"{1e3 * r['forward_s']:.1f}",
                    f"{1e3 * r['forward_backward_s']:.1f}",
                    f"{r['forward_backward_us_per_token']:.1f}",
                    f"{r['peak_mem_mb']:.0f}",
                    _fmt(r.get("forward_backward_ratio_vs_transformer")),
                    _fmt(r.get("memory_ratio_vs_transformer")),
                ]
            )
    header = ["model", "length", "fwd ms", "fwd+bwd ms", "fwd+bwd µs/token", "peak MiB", "time ratio", "mem ratio"]
    return ["## Time and memory per length", "", markdown_table(header, rows), ""]


def _peers_markdown(peers: dict) -> list[str]:
    rows = []
    for r in peers["rows"]:
        if r["status"] != "ok":
            rows.append([r["peer"], r["ours"], r["compared"], r["length"], r["status"], "", "", ""])
            continue
        rows.append(
            [
                r["peer"],
                r["ours"],
                r["compared"],
                r["length"],
                f"{r['ours_fwd_bwd_ms']:.1f}",
                f"{r['peer_fwd_bwd_ms']:.1f}",
                f"{r['ours_over_peer']:.2f}",
                f"{r['ours_params']} / {r['peer_params']}",
            ]
        )
    header = ["peer", "ours", "compared", "length", "ours fwd+bwd ms", "peer fwd+bwd ms", "ours/peer", "params"]
    lines = [
        "## Peers (same shapes, same process, alternated)",
        "",
        "ours/peer below 1: ours is faster; params ours / peer.",
        "",
    ]
    if rows:
        lines += [markdown_table(header, rows), ""]
    lines += [f"- {n['peer']} (vs {n['ours']}): {n['status']}" for n in peers["notes"]]
    return lines + [""] if peers["notes"] else lines


def _markdown(report: dict) -> str:
    intro = (
        f"Device {report['device']}, torch {report['torch']}, {report['threads']} threads; d_model "
        f"{report['d_model']}, {report['n_layers']} layers, batch {report['batch_size']}; medians of "
        f"{report['repeats']} repeats; ratios (×T) vs the transformer measured in the same process."
    )
    if report.get("glibc_tunables"):
        intro += f" Allocator: GLIBC_TUNABLES={report['glibc_tunables']}."
    if report["gen_contexts"]:
        intro += (
            f" Generation: batch 1, median ms per new token over {report['gen_tokens']} cached steps after "
            "prefilling the context."
        )
    lines = ["# Speed benchmark", "", intro, "", *_summary_markdown(report), *_detail_markdown(report)]
    if "peers" in report:
        lines += _peers_markdown(report["peers"])
    return "\n".join(lines).rstrip() + "\n"


def _plot(report: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    panels = [("forward+backward time (s)", "sequence length"), ("peak extra memory (MiB)", "sequence length")]
    if any(r["status"] == "ok" for rows in report["generation"].values() for r in rows):
        panels.append(("generation ms per new token", "context length"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
    results, generation = report["results"], report["generation"]
    plot_scaling(axes[0], results, "length", "forward_backward_s", *panels[0])
    plot_scaling(axes[1], results, "length", "peak_mem_mb", *panels[1])
    if len(panels) == 3:
        plot_scaling(axes[2], generation, "context", "ms_per_token", *panels[2])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
