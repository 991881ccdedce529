"""Benchmark plumbing: variant specs, parameter matching, summaries (the benchmarks themselves are not tests)."""

from __future__ import annotations

import pytest
import torch

import hierseq
from hierseq.bench.lm import CONTROL_HEADS, _summarise, matched_overrides, model_params
from hierseq.bench.report import check_model_specs, markdown_table, parse_model_spec


def test_parse_model_spec_variants() -> None:
    assert parse_model_spec("tree") == ("tree", "tree", {})
    label, name, over = parse_model_spec("maha:attention=full+aggregation=nash+window=64")
    assert (label, name) == ("maha:attention=full+aggregation=nash+window=64", "maha")
    assert over == {"attention": "full", "aggregation": "nash", "window": 64}
    assert parse_model_spec("hamt:aux_loss_weight=1e-2")[2] == {"aux_loss_weight": 0.01}
    with pytest.raises(ValueError, match="NAME:KEY=VALUE"):
        parse_model_spec("tree:sibling_mode")


def test_check_model_specs_rejects_unknown_and_wrong_kind() -> None:
    with pytest.raises(ValueError, match="nosuch"):
        check_model_specs(["nosuch"], "causal_lm")
    with pytest.raises(ValueError, match="hama"):
        check_model_specs(["hama"], "causal_lm")


@pytest.mark.parametrize("name", hierseq.list_models(kind="causal_lm"))
def test_every_causal_lm_can_be_matched_within_ten_percent(name: str) -> None:
    target = model_params("transformer", {"d_model": 128, "n_layers": 4, "n_heads": CONTROL_HEADS})
    over = matched_overrides(name, target, n_layers=4)
    assert abs(model_params(name, over) - target) <= 0.10 * target


def test_summary_groups_runs_by_variant_label() -> None:
    runs = [
        {
            "model": label,
            "seed": s,
            "n_params": 10,
            "tokens": 100,
            "stopped_reason": "max_steps",
            "tokens_per_s": 5.0 + s,
            "val_bpb": 2.0 + s,
            "test_bpb": 2.5 + s,
            "val_bpb_equal_time": 2.2 + s,
            "train_s": 10.0 + s,
        }
        for label in ("maha", "maha:aggregation=nash")
        for s in (0, 1)
    ]
    rows = _summarise(runs, ["maha", "maha:aggregation=nash"])
    assert [r["model"] for r in rows] == ["maha", "maha:aggregation=nash"]
    assert rows[1]["val_bpb"] == [2.0, 3.0] and rows[1]["seeds"] == 2 and rows[1]["tokens_per_s"] == 5.5
    assert rows[1]["val_bpb_equal_time"] == [2.2, 3.2] and rows[1]["train_s"] == 10.5


def test_markdown_table() -> None:
    assert markdown_table(["a", "b"], [[1, 2]]) == "| a | b |\n|---|---|\n| 1 | 2 |"


def test_every_report_carries_its_run_record(tmp_path):
    """write_report stamps commit, command, threads and load into the JSON and the Markdown's last line."""
    import json

    from hierseq.bench.report import write_report

    write_report(tmp_path, "x", {"value": 1}, "# table\n")
    data = json.loads((tmp_path / "x.json").read_text())
    record = data["record"]
    assert set(record) >= {"commit", "command", "threads", "load_avg_1_5_15", "cpus", "finished"}
    assert record["threads"] == torch.get_num_threads()
    assert len(record["load_avg_1_5_15"]) == 3
    assert record["commit"] is None or len(record["commit"].split("+")[0]) == 12
    last = (tmp_path / "x.md").read_text().rstrip().splitlines()[-1]
    assert last.startswith("Recorded ") and record["command"] in last
