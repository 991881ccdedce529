"""The MQAR recall benchmark: files, table and option checks (tiny sizes; accuracy is not asserted here,
the learning test lives in tests/models/test_hamt.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hierseq.bench.recall import run_recall_bench


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
