"""The signals benchmark: reference estimators, parameter matching, summaries, and a quick run through
the one training loop (tiny sizes; the numbers are not asserted beyond sanity)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import hierseq
from hierseq.bench.signals import (
    LinearChunkBaseline,
    chunk_history_features,
    matched_overrides,
    prepare_task,
    run_signals_bench,
    summarise,
    verdicts,
)
from hierseq.training import TrainConfig
from hierseq.training.metrics import read_metrics
from hierseq.training.tasks.regression import RegressionData, RegressionTask, prediction_mse


def test_chunk_history_features_are_causal() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 40, 3)
    f = chunk_history_features(x, 10)
    assert f.shape == (2, 4, 10 * 3 + 2 * 3 + 2)
    torch.testing.assert_close(f[:, 1, :30], x[:, 10:20].reshape(2, 30).double())
    changed = x.clone()
    changed[:, 20:] += 1.0
    g = chunk_history_features(changed, 10)
    torch.testing.assert_close(g[:, :2], f[:, :2])
    assert not torch.allclose(g[:, 2:], f[:, 2:])


def test_linear_baseline_learns_a_running_sum() -> None:
    """A target that is a linear function of the running input sum is fitted almost exactly."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 50, 2, generator=gen)
    y = (x.cumsum(dim=1)[:, 9::10] @ torch.tensor([[1.0], [-2.0]])) / 10
    mask = torch.ones(64, 5, dtype=torch.bool)
    train, val = RegressionData(x[:48], y[:48], mask[:48]), RegressionData(x[48:], y[48:], mask[48:])
    baseline = LinearChunkBaseline(10).fit(train, val)
    assert baseline.ridge == min(LinearChunkBaseline.RIDGES)
    assert prediction_mse(baseline.predict(val.x), val) < 1e-3 * float(val.y.var())
    with pytest.raises(RuntimeError, match="fit"):
        LinearChunkBaseline(10).predict(x)


def test_matched_parameter_counts_are_close() -> None:
    counts = {}
    for label in ("hiss", "hiss_h2", "mamba", "lstm", "transformer"):
        name = "hiss" if label.startswith("hiss") else "flat_regressor"
        over = matched_overrides(label, 6, 4, 10, 20000)
        counts[label] = sum(p.numel() for p in hierseq.build_model(name, **over).parameters())
    assert max(counts.values()) / min(counts.values()) < 1.2, counts


def test_references_see_exactly_the_data_the_models_train_on() -> None:
    setting = {"n_train": 8, "n_val": 4, "n_test": 4, "length": 30}
    data = prepare_task("hidden_dynamics", 2, setting)
    cfg = TrainConfig(
        model="hiss",
        task_options={"signal": "hidden_dynamics", "n_train": 8, "n_val": 4, "n_test": 4, "data_seed": 1002},
        seq_len=30,
        batch_size=4,
    )
    task = RegressionTask(cfg)
    task.setup(0, 1, torch.device("cpu"))
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(task.splits, split).x, getattr(data, split).x)
        assert torch.equal(getattr(task.splits, split).y, getattr(data, split).y)


def test_summary_compares_the_best_hiss_variant_with_the_best_flat_model() -> None:
    def run(model: str, seed: int, mse: float, kind: str = "model") -> dict:
        return {
            "task": "t",
            "model": model,
            "kind": kind,
            "seed": seed,
            "params": 1,
            "test_mse": mse,
            "train_seconds": 1,
        }

    runs = [run("hiss", s, 0.5 + s) for s in (0, 1)] + [run("hiss_h2", s, 0.3 + s) for s in (0, 1)]
    runs += [run("lstm", s, 0.4 + s) for s in (0, 1)] + [run("mamba", s, 0.6 + s) for s in (0, 1)]
    runs += [run("mean", s, 1.0, "reference") for s in (0, 1)]
    rows = {r["model"]: r for r in summarise(runs)}
    assert [r["model"] for r in summarise(runs)] == ["hiss", "hiss_h2", "mamba", "lstm", "mean"]
    assert rows["hiss_h2"]["test_mse_mean"] == pytest.approx(0.8) and rows["hiss"]["test_mse_std"] > 0
    assert rows["mean"]["best_flat"] == "lstm" and rows["mean"]["best_hiss"] == "hiss_h2"
    assert rows["hiss"]["vs_best_flat"] == pytest.approx(1.0 / 0.9 - 1)
    assert rows["lstm"]["hiss_vs_best_flat"] == pytest.approx(0.8 / 0.9 - 1)  # -11%: not the paper's -23%
    assert "**not reproduced**" in verdicts(list(rows.values()))["t"]
    runs = [r for r in runs if r["model"] != "hiss"] + [run("hiss", s, 0.3) for s in (0, 1)]
    assert "**reproduced**" in verdicts(summarise(runs))["t"]  # hiss 0.3 vs lstm 0.9: -67%


def test_signals_bench_writes_json_and_markdown(tmp_path) -> None:
    report = run_signals_bench(
        tmp_path,
        quick=True,
        seeds=(0, 1),
        tasks=["imu_integration"],
        models=["hiss", "lstm"],
        params=800,
        epochs=1,
        progress=False,
    )
    data = json.loads((tmp_path / "signals.json").read_text())
    # 2 models x 2 seeds trained, plus the mean / linear / analytic references per seed
    assert len(data["runs"]) == 4 + 6 and len(data["rows"]) == 2 + 3
    assert {r["model"] for r in report["rows"]} == {"hiss", "lstm", "mean", "linear", "analytic"}
    assert all(r["seeds"] == 2 and r["test_mse_std"] >= 0 for r in report["rows"])
    rows = {r["model"]: r for r in report["rows"]}
    assert rows["analytic"]["test_mse_mean"] < 0.01 < rows["mean"]["test_mse_mean"]  # dead reckoning
    assert rows["hiss"]["hiss_vs_best_flat"] == pytest.approx(
        rows["hiss"]["test_mse_mean"] / rows["lstm"]["test_mse_mean"] - 1
    )
    text = (tmp_path / "signals.md").read_text()
    assert "| imu_integration | hiss |" in text and "best flat model (lstm)" in text
    assert "*analytic* (reference)" in text and "Quick mode" in text
    assert "hierseq bench signals --quick --seeds 0,1 --tasks imu_integration --models hiss,lstm" in text
    assert "paper's >= 23% lower MSE is **" in text
    assert data["meta"]["machine"]["threads"] >= 1 and data["meta"]["seconds"] > 0
    assert (tmp_path / "signals.png").is_file() or importlib.util.find_spec("matplotlib") is None
    # Every model trained through the one loop: its run folder, one validation pass per epoch (4 steps).
    for run in (r for r in data["runs"] if r["kind"] == "model"):
        events = read_metrics(tmp_path / "runs" / f"imu_integration-{run['model']}-seed{run['seed']}" / "metrics.jsonl")
        assert [e["step"] for e in events if e["event"] == "eval"] == [4] and run["steps"] == 4
        assert run["history"] == [{"epoch": 1, "train_mse": events[0]["loss"], "val_mse": run["best_val_mse"],
                                   "seconds": events[0]["elapsed_s"]}]  # fmt: skip
        assert run["test_mse"] == events[-1]["test_mse"] and run["best_epoch"] == 1
    with pytest.raises(ValueError, match="models="):
        run_signals_bench(tmp_path, quick=True, models=["s4"])
