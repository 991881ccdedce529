"""Length extrapolation: bits per byte by position, far beyond the training length.

Every causal LM is trained at ``seq_len`` 256 by the LM benchmark (:func:`hierseq.bench.lm.run_lm_bench`,
the ``quick`` tier by default: same corpus, same token budget, parameters matched to the transformer's), and
then scored on validation windows of ``eval_len`` tokens (8192 by default) in one forward pass each. The
per-token loss is averaged over the windows at every position and reported by position bucket:
``[0, 256)`` is the trained range, each later bucket doubles (256-512, ..., 4096-8192).

Positional schemes run as they are: the transformer's RoPE at its trained base, the recurrent models'
state as it evolves, tree / maha / loglinear with their levels. Nothing is rescaled or windowed; a model
that cannot use context beyond 256 shows it as a rising loss. The ratio of each bucket to the last trained
bucket (``[128, 256)``) says whether more context helps (< 1), is ignored (about 1) or hurts (> 1).

Bytes only: positions are tokens, and with bytes a token is a byte, so the curve's x axis is unambiguous.

Run: ``hierseq bench extrapolate`` (trains for about 10 minutes on 2 cores, then scores in about a minute;
the training runs are reused on a rerun with the same settings). Writes ``extrapolate.json``,
``extrapolate.md`` and ``extrapolate.png`` under ``out_dir``; the LM runs under ``out_dir/train``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import config_error
from .report import check_model_specs, markdown_table, pyplot, write_report

# Every model gets the tier's steps: a cap far above any model's training time on a quiet machine, so a
# loaded machine changes the wall time, not the curves.
TIME_CAP_S = 1800.0


def position_buckets(train_len: int, eval_len: int) -> list[tuple[int, int]]:
    """[lo, hi) position ranges: the trained range first, then doubling ranges up to ``eval_len``."""
    buckets, lo, hi = [(0, train_len)], train_len, 2 * train_len
    while lo < eval_len:
        buckets.append((lo, min(hi, eval_len)))
        lo, hi = hi, 2 * hi
    return buckets


@torch.no_grad()
def loss_by_position(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean next-token loss in nats at every position. windows: [N, T + 1] token ids -> [T].

    One forward pass per batch of whole windows, in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(windows.shape[1] - 1, dtype=torch.float64)
    try:
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            logits = model(batch[:, :-1]).logits
            loss = F.cross_entropy(logits.transpose(1, 2).float(), batch[:, 1:], reduction="none")  # [b, T]
            total += loss.sum(0).double().cpu()
    finally:
        model.train(was_training)
    return total / windows.shape[0]


def bucket_bpb(per_position: torch.Tensor, buckets: Sequence[tuple[int, int]]) -> list[float]:
    """Bits per byte (bytes: one token each) of every [lo, hi) bucket. per_position: [T] nats."""
    return [float(per_position[lo:hi].mean()) / math.log(2) for lo, hi in buckets]


def eval_windows_from(tokens: torch.Tensor, eval_len: int, n_windows: int) -> torch.Tensor:
    """``n_windows`` windows of ``eval_len + 1`` tokens, evenly spread over the split. tokens: [N] -> [n, T + 1]."""
    available = (len(tokens) - 1) // eval_len
    if available < 1:
        raise config_error("eval_len", eval_len, f"the validation split has only {len(tokens):,} tokens")
    n = min(n_windows, available)
    starts = (torch.arange(n) * available // n) * eval_len
    return torch.stack([tokens[s : s + eval_len + 1] for s in starts.tolist()])


def run_extrapolate_bench(
    out_dir: str = "runs/bench/extrapolate",
    models: Sequence[str] | None = None,
    size: str = "quick",
    eval_len: int = 8192,
    n_windows: int = 16,
    batch_size: int = 2,
    seed: int = 0,
    data: str | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train every causal LM (or ``models``) with the LM benchmark's ``size`` tier at length 256, score
    ``n_windows`` validation windows of ``eval_len`` tokens, and write the report. Returns it."""
    import hierseq
    from hierseq.data.corpora import check_data, load_corpus

    from .lm import SIZES, run_lm_bench

    if size not in SIZES:
        raise config_error("size", size, f"must be one of {sorted(SIZES)}")
    train_len = SIZES[size].seq_len
    if eval_len < 2 * train_len:
        raise config_error("eval_len", eval_len, f"must be at least twice the training length {train_len}")
    for name, value in (("windows", n_windows), ("batch_size", batch_size)):
        if value < 1:
            raise config_error(name, value, "must be >= 1")
    if threads is not None:
        if threads < 1:
            raise config_error("threads", threads, "must be >= 1")
        torch.set_num_threads(threads)
    if data is not None:
        check_data(data)
    check_model_specs(list(models) if models else hierseq.list_models(kind="causal_lm"), "causal_lm")
    corpus = load_corpus(data, min_split_len=eval_len + 1)
    windows = eval_windows_from(corpus.split("val").long(), eval_len, n_windows)
    lm = run_lm_bench(
        out_dir=str(Path(out_dir) / "train"), size=size, models=list(models) if models else None, data=data,
        seeds=[seed], progress=progress, max_time_s=TIME_CAP_S,
    )  # fmt: skip
    buckets = position_buckets(train_len, eval_len)
    rows = []
    for run in lm["runs"]:
        model = hierseq.load(Path(run["run_dir"]) / "final")
        per_position = loss_by_position(model, windows, batch_size)
        bpb = bucket_bpb(per_position, buckets)
        reference = float(per_position[train_len // 2 : train_len].mean()) / math.log(2)
        rows.append(
            {
                "model": run["model"],
                "n_params": run["n_params"],
                "stopped_reason": run["stopped_reason"],
                "val_bpb_at_train_len": run["val_bpb"],
                "bucket_bpb": bpb,
                "last_trained_bucket_bpb": reference,
                "ratio_to_last_trained": [b / reference for b in bpb],
                # log2 bins of positions, for the curve: [2^j - 1, 2^(j+1) - 1)
                "curve": _log_curve(per_position),
            }
        )
        print(f"[extrapolate] {run['model']}: " + ", ".join(f"{b:.3f}" for b in bpb), flush=True)
    report = {
        "benchmark": "extrapolate",
        "size": size,
        "train_len": train_len,
        "eval_len": eval_len,
        "windows": int(windows.shape[0]),
        "data": data or "embedded Austen",
        "buckets": buckets,
        "lm_spec": lm["spec"],
        "target_params": lm["target_params"],
        "rows": rows,
    }
    return write_report(out_dir, "extrapolate", report, _markdown(report), plot=lambda p: _plot(report, p), echo=True)


def _log_curve(per_position: torch.Tensor) -> list[tuple[int, float]]:
    """(first position, bits per byte) of each bin [2^j, 2^(j+1)) of positions (position 0 alone first), so
    the bins line up with the table's buckets and the last one holds the window's second half."""
    points, lo = [], 0
    while lo < len(per_position):
        hi = min(max(1, 2 * lo), len(per_position))
        points.append((lo, float(per_position[lo:hi].mean()) / math.log(2)))
        lo = hi
    return points


def _bucket_name(lo: int, hi: int) -> str:
    def short(n: int) -> str:
        return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)

    return f"{short(lo)}-{short(hi)}"


def _markdown(report: dict[str, Any]) -> str:
    buckets = report["buckets"]
    header = ["model", "params", *[_bucket_name(lo, hi) for lo, hi in buckets], "last / trained"]
    rows = [
        [
            r["model"] + ("" if r["stopped_reason"] == "max_steps" else f" ({r['stopped_reason']})"),
            f"{r['n_params']:,}",
            *[f"{b:.3f}" for b in r["bucket_bpb"]],
            f"{r['ratio_to_last_trained'][-1]:.2f}",
        ]
        for r in sorted(report["rows"], key=lambda r: r["bucket_bpb"][-1])
    ]
    spec = report["lm_spec"]
    return "\n".join(
        [
            "# Length extrapolation",
            "",
            f"Trained at {report['train_len']} tokens (bytes) on {report['data']}: the LM benchmark's "
            f"{report['size']} tier ({spec['steps']} steps x {spec['batch_size']} x {spec['seq_len']}, parameters "
            f"matched to the transformer's {report['target_params']:,}). Scored on {report['windows']} validation "
            f"windows of {report['eval_len']} tokens, one forward pass each, every positional scheme as trained. "
            "Validation bits per byte by position bucket (sorted by the last bucket); 'last / trained' is the last "
            f"bucket over positions {report['train_len'] // 2}-{report['train_len']}, the end of the trained range "
            "(< 1: longer context helps).",
            "",
            markdown_table(header, rows),
            "",
            "Curve by position: `extrapolate.png`.",
        ]
    )


def _plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for r in sorted(report["rows"], key=lambda r: r["model"]):
        xs, ys = zip(*[(lo, bpb) for lo, bpb in r["curve"] if lo >= 16])  # first bins: too few tokens
        ax.plot(xs, ys, marker="o", markersize=3, label=r["model"])
    ax.axvline(report["train_len"], color="k", linestyle="--", linewidth=1, label="training length")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the window (tokens = bytes)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title(f"Trained at {report['train_len']}, scored at {report['eval_len']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
