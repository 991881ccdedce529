"""The regression task: preprocessing is causal and fitted on train only, batches are seeded epochs, and
training through the one loop reduces the MSE and keeps the best validation weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import hierseq
from hierseq.data.signals import make_signal_splits
from hierseq.training import TrainConfig, train
from hierseq.training.metrics import read_metrics
from hierseq.training.tasks.regression import (
    EpochSource,
    RegressionData,
    RegressionPreprocessor,
    Standardizer,
    add_first_differences,
    evaluate_regression,
    prediction_mse,
    prepare_regression,
)

ROOT = Path(__file__).resolve().parents[2]


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


def test_prepared_data_are_standardised_on_the_training_split_only() -> None:
    cfg = TrainConfig(model="hiss", task_options={"n_train": 16, "n_val": 4, "n_test": 4}, seq_len=30, batch_size=4)
    splits = prepare_regression(cfg.task_opts, 30)
    raw_train, raw_val, _ = make_signal_splits("imu_integration", 16, 4, 4, seed=1000, length=30)
    torch.testing.assert_close(splits.raw[1].x, raw_val.x)
    expected = RegressionPreprocessor().fit(raw_train.x, raw_train.y, raw_train.mask)
    torch.testing.assert_close(splits.val.x, expected.transform(raw_val.x, raw_val.y, raw_val.mask).x)
    assert splits.train.x.shape == (16, 30, 6) and splits.train.y.shape == (16, 3, 4)
    flat = splits.train.x.reshape(-1, 6)
    torch.testing.assert_close(flat.mean(0), torch.zeros(6), atol=1e-5, rtol=0)
    assert not torch.allclose(splits.val.x.reshape(-1, 6).mean(0), torch.zeros(6), atol=1e-3)


def test_epoch_source_visits_every_row_once_per_epoch_and_resumes_exactly() -> None:
    data = RegressionData(torch.arange(10.0)[:, None, None], torch.zeros(10, 1, 1), torch.ones(10, 1, dtype=torch.bool))
    source = EpochSource(data, 4, seed=0, rank=0, world_size=1)
    epoch = [source.next_batch()[0].flatten() for _ in range(2)]
    assert sorted(torch.cat(epoch).tolist()) == sorted(set(torch.cat(epoch).tolist()))  # 8 distinct rows
    state = source.state_dict()
    after = [source.next_batch()[0].flatten() for _ in range(3)]
    assert source.epoch == 3  # 10 rows of batch 4: the last 2 are dropped, a new permutation every 2 batches
    resumed = EpochSource(data, 4, seed=0, rank=0, world_size=1)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed.next_batch()[0].flatten()) for a in after)
    # Under DDP the two ranks' rows are the two halves of the same global batch.
    ranks = [EpochSource(data, 4, seed=0, rank=r, world_size=2) for r in (0, 1)]
    whole = EpochSource(data, 4, seed=0, rank=0, world_size=1).next_batch()[0]
    assert torch.equal(torch.cat([r.next_batch()[0] for r in ranks]), whole)


def test_training_hiss_beats_the_mean_predictor_and_keeps_the_best_epoch(tmp_path) -> None:
    options = {"signal": "hidden_dynamics", "n_train": 32, "n_val": 8, "n_test": 1, "data_seed": 0}
    cfg = TrainConfig(
        model="hiss",
        model_config={"d_model": 16, "d_state": 4},
        task_options=options,
        seq_len=60,
        batch_size=8,
        max_steps=24,  # 6 epochs of 4 steps
        lr=1e-2,
        warmup_steps=0,
        weight_decay=0.0,
        beta2=0.999,
        eval_every=4,
        log_every=4,
        keep_best=True,
        out_dir=str(tmp_path),
        progress=False,
    )
    val = prepare_regression(cfg.task_opts, 60).val
    assert val.x.shape == (8, 60, 6)
    torch.manual_seed(0)
    before = evaluate_regression(hierseq.build_model("hiss", **cfg.model_overrides()), val)
    result = train(cfg, log=None)
    evals = [e for e in read_metrics(tmp_path / "metrics.jsonl") if e["event"] == "eval"]
    assert result["step"] == 24 and len(evals) == 6
    after = evaluate_regression(hierseq.load(tmp_path / "final"), val)
    assert after == pytest.approx(result["val_loss"]) == min(e["val_loss"] for e in evals)  # the best is kept
    assert after < 0.8 * before and after < 0.9  # 1.0 = predicting the training mean


def test_prediction_mse_is_masked() -> None:
    y = torch.tensor([[[1.0], [2.0], [3.0]]])
    data = RegressionData(torch.zeros(1, 30, 1), y, torch.tensor([[True, True, False]]))
    assert prediction_mse(torch.zeros_like(y), data) == pytest.approx((1 + 4) / 2)
    assert prediction_mse(y.numpy(), data) == 0.0


@pytest.mark.parametrize("name", ["hiss_imu.yaml", "hiss_dynamics.yaml"])
def test_shipped_configs_run(name: str, tmp_path) -> None:
    cfg = TrainConfig.from_yaml(ROOT / "configs" / name)
    assert cfg.task == "regression" and cfg.keep_best and cfg.model_overrides()["d_in"] == 6
    tiny = {"n_train": 4, "n_val": 2, "n_test": 2}
    cfg = cfg.replace(
        task_options={**cfg.task_options, **tiny}, seq_len=30, batch_size=2, max_steps=2, out_dir=str(tmp_path)
    )
    result = train(cfg.replace(eval_every=1, progress=False), log=None)
    assert result["test"]["mse"] > 0 and (tmp_path / "metrics.jsonl").is_file()
    assert hierseq.load(tmp_path / "final").config.model_type == "hiss"


def test_mamba_yaml_is_a_valid_train_config() -> None:
    cfg = TrainConfig.from_yaml(ROOT / "configs" / "mamba.yaml")
    assert cfg.model == "mamba" and hierseq.build_config("mamba", **cfg.model_config).d_state == 16
