"""Regression training path: preprocessing is causal and fitted on train only; training reduces the MSE."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import hierseq
from hierseq.bench.signals import matched_overrides, run_signals_bench, summarise, verdicts
from hierseq.data.signals import make_signal_splits
from hierseq.training.regression import (
    LinearChunkBaseline,
    RegressionData,
    RegressionPreprocessor,
    RegressionTrainConfig,
    Standardizer,
    add_first_differences,
    chunk_history_features,
    evaluate_regression,
    prediction_mse,
    train_regression,
)


def test_first_differences_are_causal_and_exact() -> None:
    x = torch.tensor([[[1.0], [4.0], [2.0]]])
    out = add_first_differences(x)
    torch.testing.assert_close(out, torch.tensor([[[1.0, 0.0], [4.0, 3.0], [2.0, -2.0]]]))


def test_standardizer_uses_only_masked_entries() -> None:
    y = torch.tensor([[[1.0], [3.0], [100.0]]])
    mask = torch.tensor([[True, True, False]])
    s = Standardizer.fit(y, mask)
    torch.testing.assert_close(s.mean, torch.tensor([2.0]))
    torch.testing.assert_close(s.std, torch.tensor([1.0]))
    torch.testing.assert_close(s.inverse(s(y)), y)


def test_training_hiss_beats_the_mean_predictor() -> None:
    train_set, val_set, _ = make_signal_splits("hidden_dynamics", 32, 8, 1, seed=0, length=60)
    prep = RegressionPreprocessor().fit(train_set.x, train_set.y, train_set.mask)
    train = prep.transform(train_set.x, train_set.y, train_set.mask)
    val = prep.transform(val_set.x, val_set.y, val_set.mask)
    assert train.x.shape == (32, 60, 6)
    torch.manual_seed(0)
    model = hierseq.build_model("hiss", d_in=6, d_out=2, d_model=16, chunk_size=10, d_state=4)
    before = evaluate_regression(model, val)
    result = train_regression(model, train, val, RegressionTrainConfig(epochs=6, batch_size=8, lr=1e-2))
    after = evaluate_regression(model, val)
    assert result["steps"] == 24 and len(result["history"]) == 6
    assert after == pytest.approx(result["best_val_mse"])  # the best checkpoint is the one kept
    assert after < 0.8 * before and after < 0.9  # 1.0 = predicting the training mean


def test_prediction_mse_is_masked() -> None:
    y = torch.tensor([[[1.0], [2.0], [3.0]]])
    data = RegressionData(torch.zeros(1, 30, 1), y, torch.tensor([[True, True, False]]))
    assert prediction_mse(torch.zeros_like(y), data) == pytest.approx((1 + 4) / 2)
    assert prediction_mse(y.numpy(), data) == 0.0


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
    with pytest.raises(ValueError, match="models="):
        run_signals_bench(tmp_path, quick=True, models=["s4"])


@pytest.mark.parametrize("name", ["hiss_imu.yaml", "hiss_dynamics.yaml"])
def test_shipped_configs_run(name: str, tmp_path) -> None:
    import yaml

    from hierseq.training.regression import run_regression_config

    config = yaml.safe_load((Path(__file__).parents[2] / "configs" / name).read_text())
    config["data"].update(n_train=4, n_val=2, n_test=2, length=30)
    config["train"]["epochs"] = 1
    config["out_dir"] = str(tmp_path)
    result = run_regression_config(config)
    assert result["test_mse"] > 0 and (tmp_path / "result.json").is_file()
    assert hierseq.load(tmp_path / "model").config.model_type == "hiss"


def test_mamba_yaml_is_a_valid_train_config() -> None:
    from hierseq.training import TrainConfig

    cfg = TrainConfig.from_yaml(Path(__file__).parents[2] / "configs" / "mamba.yaml")
    assert cfg.model == "mamba" and hierseq.build_config("mamba", **cfg.model_config).d_state == 16
