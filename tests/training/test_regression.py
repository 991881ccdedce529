"""Regression training path: preprocessing is causal and fitted on train only; training reduces the MSE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import hierseq
from hierseq.bench.signals import matched_overrides, run_signals_bench
from hierseq.data.signals import make_signal_splits
from hierseq.training.regression import (
    RegressionPreprocessor,
    RegressionTrainConfig,
    Standardizer,
    add_first_differences,
    evaluate_regression,
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


def test_matched_parameter_counts_are_close() -> None:
    counts = {}
    for label in ("hiss", "mamba", "lstm", "transformer"):
        name = "hiss" if label == "hiss" else "flat_regressor"
        over = matched_overrides(label, 6, 4, 10, 20000)
        counts[label] = sum(p.numel() for p in hierseq.build_model(name, **over).parameters())
    assert max(counts.values()) / min(counts.values()) < 1.2, counts


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
    assert len(data["runs"]) == 4 and len(data["rows"]) == 2
    assert {r["model"] for r in report["rows"]} == {"hiss", "lstm"}
    assert all(r["seeds"] == 2 and r["test_mse_std"] >= 0 for r in report["rows"])
    text = (tmp_path / "signals.md").read_text()
    assert "| imu_integration | hiss |" in text and "best flat model (lstm)" in text
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
