"""The ``hierseq bench`` entry points pass what the user typed, and each mode's own defaults, to the benchmark
functions (the functions are replaced: this tests the wiring, not the benchmarks)."""

from __future__ import annotations

from typing import Any

import pytest

from hierseq.bench import extrapolate, lm, recall
from hierseq.cli import main


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}

    def fake(name: str):
        def run(**kwargs: Any) -> dict:
            seen[name] = kwargs
            return {}

        return run

    monkeypatch.setattr(recall, "run_recall_sweep", fake("sweep"))
    monkeypatch.setattr(recall, "run_recall_bench", fake("recall"))
    monkeypatch.setattr(lm, "run_lm_bench", fake("lm"))
    monkeypatch.setattr(extrapolate, "run_extrapolate_bench", fake("extrapolate"))
    return seen


def test_recall_sweep_keeps_its_own_defaults(calls: dict) -> None:
    assert main(["bench", "recall", "--sweep"]) == 0
    kwargs = calls["sweep"]
    assert kwargs["out_dir"] == "runs/bench/recall_sweep"
    # Neither the plain bench's steps / stop_at nor its model list reach the sweep.
    assert not {"steps", "stop_at", "models", "widths", "lrs", "seeds"} & set(kwargs)
    assert main(["bench", "recall", "--sweep", "--steps", "7", "--widths", "8,16", "--out", "runs/bench/recall"]) == 0
    assert calls["sweep"]["steps"] == 7 and calls["sweep"]["widths"] == [8, 16]
    assert calls["sweep"]["out_dir"] == "runs/bench/recall"  # an explicit --out is kept, whatever it is


def test_plain_recall_defaults_are_unchanged(calls: dict) -> None:
    assert main(["bench", "recall"]) == 0
    assert "sweep" not in calls and calls["recall"]["out_dir"] == "runs/bench/recall"
    assert calls["recall"].get("steps", 1000) == 1000 and calls["recall"].get("stop_at", 1.0) == 1.0


@pytest.mark.parametrize(
    ("flag", "size", "out"),
    [
        (None, "quick", "runs/bench/lm"),
        ("--standard", "standard", "runs/bench/lm_standard"),
        ("--full", "full", "runs/bench/lm_full"),
    ],
)
def test_each_lm_tier_has_its_own_folder(calls: dict, flag: str | None, size: str, out: str) -> None:
    assert main(["bench", "lm", *([flag] if flag else [])]) == 0
    assert calls["lm"]["size"] == size and calls["lm"]["out_dir"] == out


def test_extrapolate_defaults(calls: dict) -> None:
    assert main(["bench", "extrapolate", "--models", "transformer,mamba", "--eval-len", "4096"]) == 0
    kwargs = calls["extrapolate"]
    assert kwargs["models"] == ["transformer", "mamba"] and kwargs["eval_len"] == 4096
    assert kwargs["n_windows"] == 16 and kwargs["out_dir"] == "runs/bench/extrapolate"


def test_bench_lm_refuses_bad_threads(calls: dict, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "lm", "--threads", "0"]) != 0
    assert "hierseq: error: threads" in capsys.readouterr().err and "lm" not in calls
