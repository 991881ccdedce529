"""The MQAR task: its batches and evaluation set, the accuracy metric, and the early stop at ``stop_at``."""

from __future__ import annotations

import pytest
import torch
from trainer_helpers import task_config

import hierseq
from hierseq.data.synthetic import mqar_accuracy, mqar_batch
from hierseq.training import train
from hierseq.training.tasks.mqar import MQARTask


def _task(tmp_path, **overrides) -> MQARTask:
    task = MQARTask(task_config("mqar", tmp_path, **overrides))
    task.setup(0, 1, torch.device("cpu"))
    return task


def test_batches_and_eval_set_come_from_their_seeds(tmp_path):
    task = _task(tmp_path, seed=5, eval_batches=2, task_options={"n_pairs": 2, "eval_seed": 7})
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        ids, labels = task.next_batch()
        want_ids, want_labels = mqar_batch(4, 16, 2, 32, gen)
        assert torch.equal(ids, want_ids) and torch.equal(labels, want_labels)
    gen = torch.Generator().manual_seed(7)  # the same evaluation queries for every run with these sizes
    assert all(torch.equal(a, b) for batch in task.eval_set for a, b in zip(batch, mqar_batch(8, 16, 2, 32, gen)))


def test_accuracy_and_loss_match_a_hand_computation(tmp_path):
    task = _task(tmp_path, eval_batches=3)
    torch.manual_seed(0)
    model = hierseq.build_model("transformer", **task.cfg.model_overrides()).train()
    metrics = task.evaluate(model)
    assert model.training
    correct = total = 0
    loss = 0.0
    with torch.no_grad():
        for ids, labels in task.eval_set:
            logits = model.eval()(ids).logits
            c, t = mqar_accuracy(logits, labels)
            correct, total = correct + c, total + t
            loss += torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
    assert metrics["accuracy"] == correct / total and total == 3 * 8 * 2
    assert metrics["loss"] == pytest.approx(loss / total, rel=1e-5)


def test_stop_at_ends_the_run_at_the_first_evaluation_reaching_it(tmp_path):
    common = dict(max_steps=12, eval_every=2, eval_batch_size=64, lr=1e-2, warmup_steps=1)
    free = train(task_config("mqar", tmp_path / "free", **common))
    assert free["stopped_reason"] == "max_steps" and free["step"] == 12
    evals = [e for e in _events(tmp_path / "free") if e["event"] == "eval"]
    target = next(e for e in evals if e["val_accuracy"] > 0)  # the first evaluation above 0
    assert target["step"] < 12
    options = {"n_pairs": 2, "stop_at": target["val_accuracy"]}
    stopped = train(task_config("mqar", tmp_path / "stop", **common, task_options=options))
    assert stopped["stopped_reason"] == "target" and stopped["step"] == target["step"]
    assert stopped["val_accuracy"] == target["val_accuracy"]
    assert hierseq.load(tmp_path / "stop" / "final")  # a stopped run still saves its model


def _events(out_dir):
    from hierseq.training.metrics import read_metrics

    return read_metrics(out_dir / "metrics.jsonl")
