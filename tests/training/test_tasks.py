"""Every task adapter through the one loop: a run split by checkpoint/resume equals the uninterrupted one
bit for bit (and does not when the batch source's state is not restored), ``eval_every`` is honoured
exactly, and every run writes the same files."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from trainer_helpers import TASK_RUNS, task_config

import hierseq
from hierseq.data.loaders import RandomWindowLoader
from hierseq.training import train
from hierseq.training.checkpoint import load_trainer_state
from hierseq.training.tasks.base import GeneratorSource
from hierseq.training.tasks.regression import EpochSource

TASKS = list(TASK_RUNS)

#: the batch source class of every task (whose state a resume must restore).
SOURCES = {
    "lm": RandomWindowLoader,
    "mqar": GeneratorSource,
    "masked_bytes": RandomWindowLoader,
    "masked_signal": GeneratorSource,
    "regression": EpochSource,
}

#: validation metrics every task reports next to ``loss``.
METRICS = {
    "lm": {"bpb"},
    "mqar": {"accuracy"},
    "masked_bytes": {"masked_ce", "masked_acc", "all_acc", "mask_fraction"},
    "masked_signal": {"masked_mse", "mse_ratio", "mean_baseline_mse", "all_mse", "mask_fraction"},
    "regression": {"mse"},
}


def _events(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(out_dir) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in _events(out_dir) if e.get("loss") is not None}


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.mark.parametrize("task", TASKS)
def test_split_run_equals_the_uninterrupted_one_and_needs_the_source_state(task, tmp_path, monkeypatch):
    # Two micro-batches per step, evaluations in between, and randomness besides the batches (dropout or
    # random masks): the weights, optimiser, schedule, RNG and batch source must all come back exactly.
    common = dict(max_steps=6, schedule_steps=6, grad_accum=2, eval_every=2)
    full = train(task_config(task, tmp_path / "full", **common))
    first = train(task_config(task, tmp_path / "split", **{**common, "max_steps": 3}))
    assert first["step"] == 3 and load_trainer_state(tmp_path / "split" / "checkpoint")["step"] == 3
    shutil.copytree(tmp_path / "split", tmp_path / "unrestored")
    second = train(task_config(task, tmp_path / "split", **{**common, "resume": True}))
    assert second["step"] == 6
    expected = _losses(tmp_path / "full")
    assert list(expected) == [1, 2, 3, 4, 5, 6]
    assert _losses(tmp_path / "split") == expected  # exact, every step
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert second["val"] == full["val"] and second["test"] == full["test"]

    # The same resume with the batch source left where a fresh run starts: step 4 sees other data.
    monkeypatch.setattr(SOURCES[task], "load_state_dict", lambda self, state: None)
    train(task_config(task, tmp_path / "unrestored", **{**common, "resume": True}))
    wrong = _losses(tmp_path / "unrestored")
    assert [wrong[s] for s in (1, 2, 3)] == [expected[s] for s in (1, 2, 3)]
    assert wrong[4] != expected[4]


@pytest.mark.parametrize("task", TASKS)
def test_eval_every_is_honoured_exactly_and_every_run_writes_the_same_files(task, tmp_path):
    # eval_every=3 with log_every=2: evaluations at 3 and 6 (not rounded to a logging step), the final one at 7.
    cfg = task_config(task, tmp_path, max_steps=7, eval_every=3, log_every=2, save_every=4)
    result = train(cfg)
    events = _events(tmp_path)
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [3, 6, 7]
    assert [e["step"] for e in events if e["event"] == "train"] == [2, 4]
    for e in evals:
        assert {"val_loss", *(f"val_{m}" for m in METRICS[task])} <= set(e)
        assert all(math.isfinite(e[f"val_{m}"]) for m in METRICS[task])
    assert result["step"] == 7 and result["stopped_reason"] == "max_steps"
    assert result["val"]["loss"] == result["val_loss"] and METRICS[task] <= set(result["val"])
    assert (tmp_path / "train_config.yaml").read_text() == cfg.to_yaml() and cfg.task == task
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert load_trainer_state(tmp_path / "checkpoint")["step"] == 7
    model = hierseq.load(tmp_path / "final")
    assert model.model_kind == hierseq.get_entry(cfg.model).kind
    assert result["n_params"] == hierseq.count_parameters(model)
    if task == "regression":  # the test split, once, at the end, on the kept (best) weights
        (test_event,) = [e for e in events if e["event"] == "test"]
        assert test_event["model_step"] == result["best_step"] and test_event["test_loss"] == result["test"]["loss"]
        best = min(evals, key=lambda e: e["val_loss"])
        assert result["best_step"] == best["step"] and result["val_loss"] == best["val_loss"]
    else:
        assert result["test"] is None and not [e for e in events if e["event"] == "test"]
