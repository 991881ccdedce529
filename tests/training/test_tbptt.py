"""Truncated BPTT for every causal LM through the command line: it trains, or is refused before step 1
in one line; attention carries a bounded, detached key window (Transformer-XL style)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

import hierseq
from hierseq.cli import main
from hierseq.training.checkpoint import load_trainer_state

TINY = ["--set", "loader=stream", "--set", "tbptt=true", "--set", "seq_len=32", "--set", "batch_size=2"]
TINY += [
    "--set",
    "eval_every=0",
    "--set",
    "progress=false",
    "--set",
    "warmup_steps=1",
    "--set",
    "save_every=2",
    "--set",
    "log_every=1",
]


def _model_sets(name: str, **extra: object) -> list[str]:
    fields = {**hierseq.get_entry(name).config_cls.small_overrides(), **extra}
    return [arg for k, v in fields.items() for arg in ("--set", f"model.{k}={v}")]


@pytest.mark.parametrize("name", hierseq.list_models("causal_lm"))
def test_train_with_tbptt_runs_for_every_causal_lm(name, tmp_path):
    out = tmp_path / "run"
    code = main(["train", "--model", name, "--out", str(out), "--set", "max_steps=4", *TINY, *_model_sets(name)])
    assert code == 0
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {e["step"]: e["loss"] for e in events if e.get("loss") is not None}
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    carried = load_trainer_state(out / "checkpoint")["task"]["tbptt_caches"]
    assert carried and all(c is not None and c["length"] == 4 * 32 for c in carried)


def test_attention_carries_a_bounded_rebased_window(tmp_path):
    out = tmp_path / "run"
    sets = _model_sets("transformer", tbptt_memory=40)
    assert main(["train", "--model", "transformer", "--out", str(out), "--set", "max_steps=4", *TINY, *sets]) == 0
    (state,) = load_trainer_state(out / "checkpoint")["task"]["tbptt_caches"]
    assert state["length"] == 4 * 32  # tokens seen by the model
    for layer in state["layers"]:
        fields = layer["fields"]
        assert fields["length"] == 40 and fields["position"] == 40  # keys kept, at positions 0 .. 39
        assert fields["k"].shape[2] == 40


@pytest.mark.parametrize(
    ("name", "setting", "needle"),
    [
        ("tree", "model.sibling_mode=exact", "sibling_mode='exact'"),
        ("maha", "model.attention=full", "attention='full'"),
    ],
)
def test_unbounded_states_are_refused_before_step_one_in_one_line(name, setting, needle, tmp_path):
    args = ["train", "--model", name, "--out", str(tmp_path / "run"), *TINY, "--set", setting, *_model_sets(name)]
    proc = subprocess.run([sys.executable, "-m", "hierseq.cli", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hierseq: error: tbptt"), proc.stderr
    assert needle in err[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoint").exists()
