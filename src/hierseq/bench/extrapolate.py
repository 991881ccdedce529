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

Position buckets mix two things: what context is worth, and how hard the text at those positions is (the
same windows for every model). A control separates them: the same tokens read with a sliding context of
128 - 256 tokens (pieces of 256 overlapping by half, :func:`loss_by_position_sliding`). Full-context minus
sliding-context bits per byte is what the context beyond the training length is worth to each model:
below 0 it helps, above 0 the model breaks on lengths it never saw.

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
from ..training.tasks.base import model_device
from .report import check_model_specs, markdown_table, pyplot, set_threads, write_report

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

    One forward pass per batch of whole windows (:func:`loss_by_token`)."""
    return torch.cat([loss_by_token(model, batch) for batch in windows.split(batch_size)]).mean(0)


@torch.no_grad()
def loss_by_position_sliding(
    model: torch.nn.Module, windows: torch.Tensor, context: int, batch_size: int = 64
) -> torch.Tensor:
    """The same per-position loss with at most ``context`` tokens of context: a control for what the text
    at each position costs, whatever the model does with a longer context. windows: [N, T + 1] -> [T].

    Pieces of ``context`` tokens overlap by half (stride ``context // 2``); the first piece scores its
    positions 0 .. context - 1, every later one only its second half, so every position is scored once with
    between context / 2 and context tokens before it (the first piece: its own prefix). ``T`` must be
    ``context`` plus a multiple of the stride. One forward pass per batch of ``batch_size`` pieces."""
    n, t = windows.shape[0], windows.shape[1] - 1
    stride = context // 2
    if context < 2 or context % 2 or (t - context) % stride:
        raise ValueError(f"context={context}: must be even and leave a multiple of {stride} after it in {t} tokens")
    pieces = windows.unfold(1, context + 1, stride)  # [N, P, context + 1], P = (t - context) / stride + 1
    flat = pieces.reshape(-1, context + 1)
    losses = torch.cat([loss_by_token(model, part) for part in flat.split(batch_size)]).view(n, -1, context)
    per_token = torch.cat([losses[:, 0], losses[:, 1:, stride:].reshape(n, -1)], dim=1)  # [N, T]
    return per_token.mean(0)


@torch.no_grad()
def loss_by_token(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token loss in nats (float64, on the CPU) at every position, in eval mode (the model's mode is
    restored). batch: [b, T + 1] token ids -> [b, T]."""
    was_training = model.training
    model.eval()
    try:
        batch = batch.to(model_device(model))
        logits = model(batch[:, :-1]).logits
        loss = F.cross_entropy(logits.transpose(1, 2).float(), batch[:, 1:], reduction="none")
    finally:
        model.train(was_training)
    return loss.double().cpu()


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
    if eval_len < 2 * train_len or eval_len % (train_len // 2):
        raise config_error(
            "eval_len",
            eval_len,
            f"must be a multiple of {train_len // 2} and at least twice the training length {train_len}",
        )
    for name, value in (("windows", n_windows), ("batch_size", batch_size)):
        if value < 1:
            raise config_error(name, value, "must be >= 1")
    set_threads(threads)
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
        per_position_sliding = loss_by_position_sliding(model, windows, train_len)
        sliding = bucket_bpb(per_position_sliding, buckets)
        reference = float(per_position[train_len // 2 : train_len].mean()) / math.log(2)
        beyond, beyond_sliding = (
            float(x[train_len:].mean()) / math.log(2) for x in (per_position, per_position_sliding)
        )
        rows.append(
            {
                "model": run["model"],
                "n_params": run["n_params"],
                "stopped_reason": run["stopped_reason"],
                "val_bpb_at_train_len": run["val_bpb"],
                "bucket_bpb": bpb,
                # the same tokens read with 128 - 256 tokens of context (the trained range): the text's own cost
                "sliding_bucket_bpb": sliding,
                "full_minus_sliding": [f - w for f, w in zip(bpb, sliding)],
                "beyond_train_bpb": beyond,
                "beyond_train_sliding_bpb": beyond_sliding,
                "curve_minus_sliding": _log_curve(per_position - per_position_sliding),
                "last_trained_bucket_bpb": reference,
                "ratio_to_last_trained": [b / reference for b in bpb],
                # bins [2^j, 2^(j+1)) of positions, for the curve (:func:`_log_curve`)
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
    train_len, eval_len = report["train_len"], report["eval_len"]
    beyond = _bucket_name(train_len, eval_len)
    header_gap = [
        "model",
        *[_bucket_name(lo, hi) for lo, hi in buckets[1:]],
        f"{beyond} full",
        f"{beyond} sliding",
        "gap",
    ]
    rows_gap = [
        [
            r["model"],
            *[f"{g:+.3f}" for g in r["full_minus_sliding"][1:]],
            f"{r['beyond_train_bpb']:.3f}",
            f"{r['beyond_train_sliding_bpb']:.3f}",
            f"**{r['beyond_train_bpb'] - r['beyond_train_sliding_bpb']:+.3f}**",
        ]
        for r in sorted(report["rows"], key=lambda r: r["beyond_train_bpb"] - r["beyond_train_sliding_bpb"])
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
            f"The text itself is harder in some buckets than others (the same windows for every model). The control "
            f"reads the same tokens with a sliding context of {train_len // 2}-{train_len} tokens (the trained range; "
            f"pieces of {train_len} overlapping by half). Full-context minus sliding-context bits per byte by bucket, "
            f"and over all positions {beyond}: below 0 the model gains from context beyond its training length, "
            "above 0 the longer context hurts it (sorted by the gap).",
            "",
            markdown_table(header_gap, rows_gap),
            "",
            "Curves by position (full context; full minus sliding): `extrapolate.png`.",
        ]
    )


def _plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (ax, gap) = plt.subplots(1, 2, figsize=(13, 4.8))
    for r in sorted(report["rows"], key=lambda r: r["model"]):
        (line,) = ax.plot(
            *zip(*[(lo, v) for lo, v in r["curve"] if lo >= 16]), marker="o", markersize=3, label=r["model"]
        )
        # from the training length on: before it the two readings are the same
        diff = [(lo, v) for lo, v in r["curve_minus_sliding"] if lo >= report["train_len"]]
        gap.plot(*zip(*diff), marker="o", markersize=3, color=line.get_color(), label=r["model"])
    ax.set_ylabel("validation bits per byte")
    ax.set_title(f"Trained at {report['train_len']}, scored at {report['eval_len']}")
    gap.axhline(0.0, color="k", linewidth=1)
    gap.set_ylabel(f"full minus sliding-{report['train_len']} context (bits per byte)")
    gap.set_title("What context beyond the training length is worth")
    for a in (ax, gap):
        a.axvline(report["train_len"], color="k", linestyle="--", linewidth=1)
        a.set_xscale("log", base=2)
        a.set_xlabel("position in the window (tokens = bytes)")
        a.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
