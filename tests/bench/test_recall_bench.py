"""The MQAR recall benchmark and the accuracy / state sweep: files, tables, resume and option checks
(tiny sizes; accuracy is not asserted here, the learning test lives in tests/models/test_hamt.py)."""

from __future__ import annotations

import inspect
import json
import statistics
from pathlib import Path

import pytest
import torch

import hierseq
from hierseq.bench import recall
from hierseq.bench.recall import (
    _refused_widths,
    _sizing,
    pareto_frontier,
    peak_state_floats,
    run_recall_bench,
    run_recall_sweep,
    state_floats,
    train_mqar,
)
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


# ------------------------------------------------------------------------ the accuracy / state sweep
TINY_SWEEP = dict(
    models=["linear_attn", "transformer"],
    widths=(16, 32),
    seq_len=16,
    n_pairs=2,
    vocab_size=32,
    steps=3,
    seeds=(0, 1),
    batch_size=8,
    eval_examples=16,
    progress=False,
)


def test_pareto_frontier_on_hand_made_points() -> None:
    points = [(100, 0.5), (200, 0.5), (200, 0.9), (50, 0.2), (400, 0.9), (50, 0.2), (800, 0.95)]
    # (200, 0.5): (100, 0.5) has less state, same accuracy. (400, 0.9): (200, 0.9) the same. The two
    # (50, 0.2) do not dominate each other, and nothing has less state than them.
    assert pareto_frontier(points) == [True, False, True, True, False, True, True]
    assert pareto_frontier([]) == [] and pareto_frontier([(1, 0.0)]) == [True]


def test_recall_sweep_writes_report_and_reuses_finished_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    report = run_recall_sweep(out_dir=str(tmp_path), **TINY_SWEEP)
    for suffix in ("json", "md", "png"):
        assert (tmp_path / f"recall_sweep.{suffix}").stat().st_size > 0
    assert len(report["rows"]) == 2 * 2 * 2 and report["refused"] == []
    assert [(p["model"], p["width"]) for p in report["summary"]] == [
        ("linear_attn", 16),
        ("linear_attn", 32),
        ("transformer", 16),
        ("transformer", 32),
    ]
    for point in report["summary"]:
        accs = point["seed_accuracies"]
        assert point["seeds"] == [0, 1] and len(accs) == 2
        assert point["accuracy"] == pytest.approx(statistics.fmean(accs))
        assert point["accuracy_std"] == pytest.approx(statistics.stdev(accs))
        assert point["peak_state_floats_per_layer"] > 0 and point["params"] > 0
        # Growth comes from the model's own state_floats: attention's KV cache grows, linear attention's not.
        assert point["state_grows_with_length"] == (point["model"] == "transformer")
    transformer = next(p for p in report["summary"] if (p["model"], p["width"]) == ("transformer", 32))
    assert transformer["peak_state_floats_per_layer"] == 2 * 16 * 32  # keys + values of 16 tokens
    points = [(p["peak_state_floats_per_layer"], p["accuracy"]) for p in report["summary"]]
    assert [p["on_frontier"] for p in report["summary"]] == pareto_frontier(points)
    table = (tmp_path / "recall_sweep.md").read_text()
    assert "| model | width | state floats/layer | grows with L |" in table
    assert "| linear_attn | 16 |" in table and "| transformer | 32 | 1,024 | yes |" in table
    assert "grows with L (is larger over 2L tokens than over L) for: transformer;" in table
    run = tmp_path / "runs" / "transformer-w16-lr0.003-seed1"
    saved = json.loads((run / "result.json").read_text())
    assert saved["settings"]["steps"] == 3 and saved["settings"]["model_config"]["d_model"] == 16
    capsys.readouterr()

    # A rerun with the same settings trains nothing: every run comes back from its result.json.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(recall, "train_mqar", no_training)
    again = run_recall_sweep(out_dir=str(tmp_path), **TINY_SWEEP)
    assert capsys.readouterr().out.count(": reused ") == 8
    assert again["settings"]["reused_runs"] == 8
    assert json.loads(json.dumps(again["summary"])) == json.loads(json.dumps(report["summary"]))

    # A run without its result.json (interrupted) is the only one trained again.
    trained = []
    monkeypatch.setattr(recall, "train_mqar", lambda *a, **k: trained.append(a) or train_mqar(*a, **k))
    (run / "result.json").unlink()
    run_recall_sweep(out_dir=str(tmp_path), **TINY_SWEEP)
    assert trained == [("transformer", 16, 3e-3, 1)] and (run / "result.json").is_file()

    # Other settings into the same folders: refused before any training, the finished results kept.
    with pytest.raises(ValueError, match=r"out_dir=.*other settings.*steps: 3 -> 4"):
        run_recall_sweep(out_dir=str(tmp_path), **{**TINY_SWEEP, "steps": 4})
    assert trained == [("transformer", 16, 3e-3, 1)]


def test_recall_sweep_lists_a_refused_width(tmp_path: Path) -> None:
    # headdim 64 set by the spec: d_inner = 2 x 16 = 32 has no 64-wide head, so width 16 is refused.
    spec = "mamba2:headdim=64+d_state=8"
    report = run_recall_sweep(
        out_dir=str(tmp_path), **{**TINY_SWEEP, "models": [spec], "widths": (16, 32), "steps": 1, "seeds": (0,)}
    )
    assert [(r["model"], r["width"]) for r in report["refused"]] == [(spec, 16)]
    assert "headdim" in report["refused"][0]["reason"]
    assert [(p["model"], p["width"]) for p in report["summary"]] == [(spec, 32)]
    assert f"Refused: {spec} at width 16:" in (tmp_path / "recall_sweep.md").read_text()
    with pytest.raises(ValueError, match="refused at every width"):
        run_recall_sweep(out_dir=str(tmp_path / "other"), **{**TINY_SWEEP, "models": [spec], "widths": (16,)})


SWEEP_WIDTHS = inspect.signature(run_recall_sweep).parameters["widths"].default


@pytest.mark.parametrize("name", hierseq.list_models(kind="causal_lm"))
def test_every_causal_lm_trains_at_every_default_sweep_width(name: str) -> None:
    # The sweep's models=None is every causal LM: one that a default width breaks fails here, not
    # an hour into a sweep. One forward + backward at the sweep's default length with _sizing's config.
    assert _refused_widths([name], SWEEP_WIDTHS, 2, 256) == {}
    for width in SWEEP_WIDTHS:
        torch.manual_seed(0)
        model = hierseq.build_model(name, **_sizing(name, {}, width, 2, 256))
        assert model.config.d_model == width
        ids = torch.randint(0, 256, (2, 64))
        out = model(ids, labels=ids)
        out.loss.backward()
        assert torch.isfinite(out.loss), (name, width)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None), (name, width)
        assert peak_state_floats(model, 64) > 0


def test_sizing_picks_a_mamba2_head_width_that_divides_d_inner() -> None:
    assert _sizing("mamba2", {}, 16, 2, 256)["headdim"] == 32  # d_inner 32: one head of 32
    assert _sizing("mamba2", {}, 64, 2, 256)["headdim"] == 64  # the config's default where it fits
    assert _sizing("mamba2", {"expand": 3}, 16, 2, 256)["headdim"] == 48
    assert _sizing("mamba2", {"headdim": 16}, 16, 2, 256)["headdim"] == 16  # the spec's own value wins
    assert "headdim" not in _sizing("mamba", {}, 16, 2, 256)


def test_peak_state_counts_what_the_summary_tree_holds_while_reading() -> None:
    # The summary tree's state drops when leaves merge: at L = 64 (two full leaves of 32) it is one
    # summary, but at t = 63 it held the open leaf's 31 tokens too. The sweep plots the peak.
    model = hierseq.build_model("tree", **_sizing("tree", {}, 16, 2, 256))
    per_t = [model.state_floats(t) // 2 for t in range(1, 65)]
    assert peak_state_floats(model, 64) == max(per_t) > state_floats(model, 64) == per_t[-1]
    assert peak_state_floats(model, 128) > peak_state_floats(model, 64)  # it grows, slowly, with L
    transformer = hierseq.build_model("transformer", **_sizing("transformer", {}, 16, 2, 256))
    assert peak_state_floats(transformer, 64) == state_floats(transformer, 64) == 2 * 64 * 16


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"widths": []}, r"widths=\[\]: must not be empty"),
        ({"widths": [0]}, "widths"),
        ({"seeds": [0, 0]}, r"seeds=\[0, 0\]: must not repeat"),
        ({"models": ["nosuchmodel"]}, "nosuchmodel"),
        ({"models": ["transformer:nosuch=1"]}, "nosuch"),
        ({"lrs": [0.0]}, "lrs"),
        ({"steps": 0}, "steps"),
    ],
)
def test_recall_sweep_rejects_bad_options_before_training(tmp_path: Path, monkeypatch, kwargs, needle) -> None:
    monkeypatch.setattr(recall, "train_mqar", lambda *a, **k: pytest.fail("trained despite a bad option"))
    with pytest.raises(ValueError, match=needle):
        run_recall_sweep(out_dir=str(tmp_path), **{**TINY_SWEEP, **kwargs})
