"""``hierseq bench extrapolate`` plumbing at a tiny size (the benchmark itself is not a test): the per-position
loss is the model's own, buckets tile the window, and the report, table and plot are written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hierseq
from hierseq.bench import lm
from hierseq.bench.extrapolate import (
    bucket_bpb,
    loss_by_position,
    loss_by_position_sliding,
    position_buckets,
    run_extrapolate_bench,
)
from hierseq.bench.lm import LMBenchSize

TINY = LMBenchSize(
    d_model=32, n_layers=1, seq_len=16, batch_size=4, steps=2, max_time_s=60.0, seeds=(0,), eval_batches=1
)


def test_position_buckets_tile_the_window() -> None:
    assert position_buckets(256, 8192) == [(0, 256), (256, 512), (512, 1024), (1024, 2048), (2048, 4096), (4096, 8192)]
    assert position_buckets(16, 40) == [(0, 16), (16, 32), (32, 40)]


def test_loss_by_position_is_the_models_own_loss() -> None:
    torch.manual_seed(0)
    model = hierseq.build_model("transformer", d_model=32, n_layers=1, n_heads=2)
    windows = torch.randint(0, 256, (3, 41))
    per_position = loss_by_position(model, windows, batch_size=2)
    assert per_position.shape == (40,) and model.training  # mode restored
    model.eval()
    with torch.no_grad():
        logits = model(windows[:, :-1]).logits
    expected = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").mean(0)
    torch.testing.assert_close(per_position.float(), expected, rtol=1e-5, atol=1e-6)
    whole = bucket_bpb(per_position, [(0, 40)])[0]
    assert whole == pytest.approx(float(expected.mean()) / math.log(2), rel=1e-5)


def test_sliding_control_equals_a_plain_loop_over_positions() -> None:
    """Position p is scored with the tokens of its piece before it: [0, p] for p < context, else the last
    context / 2 .. context - 1 tokens, exactly as a loop over positions computing each loss alone."""
    torch.manual_seed(0)
    model = hierseq.build_model("transformer", d_model=32, n_layers=1, n_heads=2).eval()
    context, windows = 8, torch.randint(0, 256, (2, 25))  # T = 24 = 8 + 4 * 4
    fast = loss_by_position_sliding(model, windows, context, batch_size=3)
    stride, expected = context // 2, torch.zeros(2, 24, dtype=torch.float64)
    with torch.no_grad():
        for p in range(24):
            start = 0 if p < context else ((p - context) // stride + 1) * stride
            logits = model(windows[:, start : p + 1]).logits[:, -1]
            expected[:, p] = F.cross_entropy(logits, windows[:, p + 1], reduction="none").double()
            assert (p - start) >= (0 if p < context else stride) and p - start < context
    torch.testing.assert_close(fast, expected.mean(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="context"):
        loss_by_position_sliding(model, windows[:, :23], context)


def test_bench_extrapolate_writes_its_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(lm.SIZES, "quick", TINY)
    report = run_extrapolate_bench(
        out_dir=str(tmp_path), models=["transformer", "gated_deltanet"], eval_len=64, n_windows=3, progress=False
    )
    assert [tuple(b) for b in report["buckets"]] == [(0, 16), (16, 32), (32, 64)]
    assert [r["model"] for r in report["rows"]] == ["transformer", "gated_deltanet"]
    for row in report["rows"]:
        assert len(row["bucket_bpb"]) == 3 and all(math.isfinite(b) and b > 0 for b in row["bucket_bpb"])
        assert row["ratio_to_last_trained"][-1] == pytest.approx(row["bucket_bpb"][-1] / row["last_trained_bucket_bpb"])
        assert row["full_minus_sliding"][0] == pytest.approx(0.0, abs=1e-5)  # the first piece is the window's start
        assert len(row["sliding_bucket_bpb"]) == 3
    data = json.loads((tmp_path / "extrapolate.json").read_text())
    assert data["windows"] == 3 and data["record"]["threads"] >= 1
    table = (tmp_path / "extrapolate.md").read_text()
    assert "| model | params | 0-16 | 16-32 | 32-64 | last / trained |" in table
    pytest.importorskip("matplotlib")
    assert (tmp_path / "extrapolate.png").stat().st_size > 0


def test_bench_extrapolate_refuses_bad_lengths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="eval_len"):
        run_extrapolate_bench(out_dir=str(tmp_path), eval_len=300, progress=False)
    with pytest.raises(ValueError, match="windows"):
        run_extrapolate_bench(out_dir=str(tmp_path), n_windows=0, progress=False)
    assert not any(tmp_path.iterdir())  # refused before anything was written
