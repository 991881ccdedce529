"""Mamba speed: our training step against the PyPI ``mambapy`` implementation, and generation cost per token.

1. :func:`run_mamba_peer_bench` - forward + backward of a d_model x n_layers Mamba backbone on float
   features [batch, length, d_model] (no embedding / head, since ``mambapy.mamba.Mamba`` has none), ours
   (built through the registry; its blocks and final norm, ``peers.LMBackbone``) and mambapy's, same
   shape, same process, alternated
   so that machine load hits both alike; median seconds, ratio, and peak extra memory (CPU: process
   RSS) of one step each. Needs ``pip install --no-deps mambapy``; without it only ours is timed.
2. :func:`run_generation_cost_bench` - milliseconds per generated token after a prefill of 1k / 4k / 16k
   tokens, for ``mamba`` (O(1) state: flat) and, for contrast, the ``transformer`` control (KV cache:
   grows with the context).

Both write JSON + Markdown under ``out_dir``. Command-line use:
``python -m hierseq.bench.mamba_peer [--quick] [--threads 1] [--out runs/mamba]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..registry import build_model
from .generation_cost import measure_generation
from .memory import peak_memory
from .peers import LMBackbone, fwd_bwd_step, mambapy_pair
from .sweep import time_alternated


def _machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def run_mamba_peer_bench(
    out_dir: str | Path = "runs/mamba",
    d_model: int = 256,
    n_layers: int = 4,
    length: int = 2048,
    batch: int = 4,
    repeats: int = 3,
    seed: int = 0,
    command: str = "python -m hierseq.bench.mamba_peer",
) -> dict[str, Any]:
    """Time forward + backward of ours vs mambapy at one shape; write mamba_peer.json / .md."""
    torch.manual_seed(seed)
    peer_note = ""
    try:
        ours, theirs = mambapy_pair(d_model, n_layers)
        contenders: dict[str, torch.nn.Module] = {"hierseq": ours.train(), "mambapy": theirs.train()}
    except ImportError:
        contenders = {"hierseq": LMBackbone(build_model("mamba", d_model=d_model, n_layers=n_layers)).train()}
        peer_note = "mambapy not installed (pip install --no-deps mambapy): only ours was timed."
    x = torch.randn(batch, length, d_model, generator=torch.Generator().manual_seed(seed))
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in contenders.items()}
    steps = {k: fwd_bwd_step(m, x) for k, m in contenders.items()}
    times = time_alternated(steps, repeats, torch.device("cpu"))
    memory = {}
    for k, step in steps.items():
        with peak_memory(torch.device("cpu")) as mem:
            step()
        memory[k] = mem["peak_bytes"]
    result: dict[str, Any] = {
        "shape": {"d_model": d_model, "n_layers": n_layers, "length": length, "batch": batch},
        "repeats": repeats,
        "params": params,
        "fwd_bwd_seconds": {k: statistics.median(v) for k, v in times.items()},
        "fwd_bwd_all_seconds": times,
        "peak_extra_memory_mb": {k: v / 2**20 for k, v in memory.items()},
        "machine": _machine(),
        "command": command,
        "note": peer_note,
    }
    if "mambapy" in times:
        result["speedup_vs_mambapy"] = result["fwd_bwd_seconds"]["mambapy"] / result["fwd_bwd_seconds"]["hierseq"]
    lines = [
        "# Mamba training step: hierseq vs mambapy",
        "",
        f"Command: `{command}`; forward + backward of the backbone on [{batch}, {length}, {d_model}] fp32, "
        f"{n_layers} layers; median of {repeats}, alternated; machine {result['machine']}.",
        "",
        "| implementation | params | fwd+bwd s | peak extra MB |",
        "|---|---:|---:|---:|",
    ]
    for k in contenders:
        lines.append(
            f"| {k} | {params[k]} | {result['fwd_bwd_seconds'][k]:.3f} | {result['peak_extra_memory_mb'][k]:.0f} |"
        )
    if "speedup_vs_mambapy" in result:
        lines += ["", f"hierseq is {result['speedup_vs_mambapy']:.2f}x the speed of mambapy at this shape."]
    if peer_note:
        lines += ["", peer_note]
    _write(out_dir, "mamba_peer", result, lines)
    return result


def run_generation_cost_bench(
    out_dir: str | Path = "runs/mamba",
    contexts: Sequence[int] = (1024, 4096, 16384),
    models: Sequence[str] = ("mamba", "transformer"),
    d_model: int = 256,
    n_layers: int = 4,
    new_tokens: int = 64,
    seed: int = 0,
    command: str = "python -m hierseq.bench.mamba_peer",
) -> dict[str, Any]:
    """ms per generated token (batch 1, greedy, cached) after a prefill of each context length."""
    rows = []
    for name in models:
        torch.manual_seed(seed)
        over = {"d_model": d_model, "n_layers": n_layers}
        if name == "transformer":
            over["n_heads"] = max(1, d_model // 64)
        model = build_model(name, **over)
        for context in contexts:
            cost = measure_generation(model, context, new_tokens, seed)
            rows.append(
                {"model": name, "context": context, "status": cost["status"], "ms_per_token": cost.get("ms_per_token")}
            )
    result = {"rows": rows, "new_tokens": new_tokens, "machine": _machine(), "command": command}
    lines = [
        "# Generation cost per token vs context length",
        "",
        f"Command: `{command}`; batch 1, d_model {d_model}, {n_layers} layers, median over {new_tokens} cached "
        f"steps after the prefill; machine {result['machine']}.",
        "",
        "| model | " + " | ".join(f"ctx {c}" for c in contexts) + " |",
        "|---|" + "---:|" * len(contexts),
    ]
    for name in models:
        cells = [
            f"{r['ms_per_token']:.2f} ms" if r["status"] == "ok" else r["status"] for r in rows if r["model"] == name
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    _write(out_dir, "generation_cost", result, lines)
    return result


def _write(out_dir: str | Path, stem: str, result: dict[str, Any], lines: list[str]) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/mamba")
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 default: on a shared CPU, spinning threads distort)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = f"python -m hierseq.bench.mamba_peer --threads {args.threads}" + (" --quick" if args.quick else "")
    if args.quick:
        peer = run_mamba_peer_bench(args.out, 64, 2, 256, 2, args.repeats, command=command)
    else:
        peer = run_mamba_peer_bench(args.out, repeats=args.repeats, command=command)
    print(json.dumps({k: peer[k] for k in ("fwd_bwd_seconds", "peak_extra_memory_mb")}, indent=1))
    if not args.skip_generation:
        contexts = (256, 1024) if args.quick else (1024, 4096, 16384)
        gen = run_generation_cost_bench(args.out, contexts=contexts, command=command)
        print(json.dumps(gen["rows"], indent=1))


if __name__ == "__main__":
    main()
