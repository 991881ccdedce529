"""The MQAR recall benchmark: files, table and option checks (tiny sizes; accuracy is not asserted here,
the learning test lives in tests/models/test_hamt.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import hierseq
from hierseq.bench.recall import run_recall_bench, train_mqar
from hierseq.training.metrics import read_metrics


def test_recall_bench_writes_table_and_sweeps_every_lr(tmp_path: Path) -> None:
    report = run_recall_bench(
        out_dir=str(tmp_path),
        models=["hamt:hcm_dim=32", "linear_attn"],
        widths=[32],
        seq_len=16,
        n_pairs=2,
        vocab_size=32,
        lrs=[1e-3, 3e-3],
        steps=3,
        batch_size=4,
        eval_examples=8,
        verbose=False,
    )
    saved = json.loads((tmp_path / "recall.json").read_text())
    assert (tmp_path / "recall.png").stat().st_size > 0
    assert saved["settings"]["batch_size"] == 4
    assert len(saved["rows"]) == 2 * 2
    assert [r["model"] for r in report["summary"]] == ["hamt:hcm_dim=32", "linear_attn"]
    for row in report["summary"]:
        assert set(row["accuracy_by_lr"]) == {1e-3, 3e-3}
        assert row["steps_run"] == [3]
        assert 0.0 <= row["accuracy"] <= 1.0
    table = (tmp_path / "recall.md").read_text()
    assert "| hamt:hcm_dim=32 | 32 |" in table and "steps run" in table
    # Every run went through the one training loop: its folder holds the loop's files.
    run = tmp_path / "runs" / "hamt_hcm_dim-32-w32-lr0.001-seed0"
    assert {"metrics.jsonl", "loss.png", "final", "checkpoint", "train_config.yaml"} <= {p.name for p in run.iterdir()}
    row = next(r for r in saved["rows"] if r["model"] == "hamt:hcm_dim=32" and r["lr"] == 1e-3)
    events = read_metrics(run / "metrics.jsonl")
    assert row["history"] == [[e["step"], e["val_accuracy"]] for e in events if e["event"] == "eval"]
    assert row["final_train_loss"] == events[2]["lm_loss"]  # 3 steps: the last tenth is the last step
    assert row["state_floats_per_layer"] == hierseq.load(run / "final").state_floats(16) // 2


def test_train_mqar_stops_early_and_uses_the_shared_evaluation_set() -> None:
    kwargs = dict(seq_len=16, n_pairs=2, vocab_size=32, steps=12, batch_size=8, eval_every=2, eval_examples=64)
    free = train_mqar("linear_attn", 32, 1e-2, 0, **kwargs)
    assert free["steps_run"] == 12 and len(free["history"]) == 6
    step, accuracy = next((s, a) for s, a in free["history"] if a > 0)
    stopped = train_mqar("linear_attn", 32, 1e-2, 0, stop_at=accuracy, **kwargs)
    assert stopped["steps_run"] == step and stopped["accuracy"] == accuracy
    assert stopped["history"] == [h for h in free["history"] if h[0] <= step]


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"models": ["nosuchmodel"]}, "nosuchmodel"),
        ({"batch_size": 0}, "batch_size"),
        ({"stop_at": 1.5}, "stop_at"),
        ({"lrs": []}, "lrs"),
        ({"threads": 0}, "threads"),
    ],
)
def test_recall_bench_rejects_bad_options(tmp_path: Path, kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        run_recall_bench(out_dir=str(tmp_path), steps=1, verbose=False, **kwargs)
