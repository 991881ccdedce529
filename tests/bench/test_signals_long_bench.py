"""Plumbing of ``hierseq bench signals --long`` at tiny size: every model and budget runs, the report has
both columns, the cost rows and the verdicts, and the files are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hierseq.bench.signals_long import (
    BUDGETS,
    LONG_MODEL_SPECS,
    run_long_signals_bench,
    stream_ms_per_push,
)
from hierseq.registry import build_model


def test_quick_run_writes_both_budgets_costs_and_verdicts(tmp_path: Path) -> None:
    models = ["hiss_c10", "hiss_c50", "mamba", "gated_deltanet"]
    report = run_long_signals_bench(
        tmp_path, quick=True, seeds=(0,), tasks=["tactile_drift"], models=models, progress=False
    )
    for budget in BUDGETS:
        labels = [r["model"] for r in report["rows"][budget]]
        assert labels == [*models, "mean", "linear", "analytic"]
    runs = [r for r in report["runs"] if r["kind"] == "model"]
    assert sorted((r["model"], r["budget"]) for r in runs) == sorted((m, b) for m in models for b in BUDGETS)
    # Every model is scored on the same targets: its chunk size is its own, the labelled steps are shared.
    assert {r["overrides"]["chunk_size"] for r in runs if r["model"] == "hiss_c10"} == {10}
    assert {r["overrides"]["chunk_size"] for r in runs if r["model"] == "mamba"} == {50}
    verdict = report["verdicts"]["tactile_drift"]
    assert "equal steps" in verdict and "equal time" in verdict and "its training cost" in verdict
    assert [r["model"] for r in report["cost"]["rows"]] == models
    assert all(len(r["stream_ms_per_push"]) >= 2 for r in report["cost"]["rows"])
    assert all(report["train_cost"][m]["train_ms_per_1k"] > 0 for m in models)
    on_disk = json.loads((tmp_path / "signals_long.json").read_text())
    assert on_disk["meta"]["command"].startswith("hierseq bench signals --long")
    assert "equal time" in (tmp_path / "signals_long.md").read_text()


def test_every_spec_builds_at_its_chunk_size() -> None:
    for label, (name, fixed, chunk) in LONG_MODEL_SPECS.items():
        model = build_model(name, **fixed, d_model=16, d_in=4, d_out=2, chunk_size=chunk)
        out = model(torch.randn(1, 2 * chunk, 4))
        assert out.prediction.shape == (1, 2, 2), label


def test_streaming_probe_times_every_window() -> None:
    model = build_model("hiss", d_model=8, d_in=3, d_out=2, chunk_size=10)
    times = stream_ms_per_push(model, 3, 600)
    assert len(times) == 3 and all(t > 0 for t in times)


def test_unknown_task_or_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tasks='imu_integration'"):
        run_long_signals_bench(tmp_path, quick=True, tasks=["imu_integration"], progress=False)
    with pytest.raises(ValueError, match="models='nope'"):
        run_long_signals_bench(tmp_path, quick=True, models=["nope"], progress=False)
