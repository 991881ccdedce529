"""``hierseq bench lm`` plumbing at a tiny size (the benchmark itself is not a test): on subwords every model
gets the one tokenizer and its vocab_size, the report's bits per byte are the saved models' own, and tokens
per byte are reported; on bytes the configs and the table are what they were. With several seeds the table
gives mean ± std and the equal wall-clock column; a second call reuses the finished runs, a run of other
settings is trained again, and a run stopped by Ctrl-C is continued from its checkpoint."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest

import hierseq
from hierseq.bench import lm
from hierseq.bench.lm import SIZES, LMBenchSize, add_equal_time, interpolate, mean_curve, run_lm_bench, training_curve
from hierseq.cli import main
from hierseq.data.corpora import load_corpus
from hierseq.data.tokenizer import build_tokenizer, tokenize_split, tokenizer_of
from hierseq.training.tasks.lm import evaluate_split

TINY = LMBenchSize(
    d_model=64, n_layers=1, seq_len=32, batch_size=4, steps=2, max_time_s=60.0, seeds=(0,), eval_batches=1
)
MODELS = "transformer,linear_attn"


@pytest.fixture
def text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setitem(lm.SIZES, "quick", TINY)
    path = tmp_path / "austen.txt"
    path.write_bytes(bytes(load_corpus(None).train[:40_000].numpy()))
    return path


def _bench(text: Path, out: Path, *extra: str) -> dict:
    args = ["bench", "lm", "--quick", "--data", str(text), "--models", MODELS, "--out", str(out), *extra]
    assert main(args) == 0
    return json.loads((out / "lm.json").read_text())


def test_bench_lm_on_subwords(text: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report = _bench(text, tmp_path / "bpe", "--tokenizer", "bpe:300")
    corpus = load_corpus(str(text))
    tokenizer = build_tokenizer("bpe:300", corpus.train)
    splits = {name: tokenize_split(corpus.split(name), tokenizer) for name in ("train", "val", "test")}
    assert report["tokenizer"] == "bpe:300" and report["vocab_size"] == 300
    assert report["tokens_per_byte"] == {name: s.tokens_per_byte for name, s in splits.items()}
    assert 0.3 < report["tokens_per_byte"]["test"] < 0.9
    assert [r["model"] for r in report["runs"]] == MODELS.split(",")
    for run in report["runs"]:
        assert run["config"]["vocab_size"] == 300
        model = hierseq.load(Path(run["run_dir"]) / "final")
        assert tokenizer_of(model).to_json() == tokenizer.to_json()  # one tokenizer, for every model
        test = evaluate_split(model, splits["test"], TINY.seq_len, TINY.batch_size, TINY.eval_batches)
        assert run["test_bpb"] == test["bpb"]
    table = (tmp_path / "bpe" / "lm.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| model"))
    assert "val bits/byte | test bits/byte | test tokens/byte | val bits/byte at " in header
    assert header.endswith("| train s | train tokens/s |")
    assert "tokenizer bpe:300 (300 tokens; tokens per byte train 0." in table
    for name in MODELS.split(","):
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {report['tokens_per_byte']['test']:.3f} |" in row
    capsys.readouterr()


def test_bench_lm_on_bytes_is_as_it_was(text: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report = _bench(text, tmp_path / "bytes")
    assert report["tokenizer"] == "bytes" and report["vocab_size"] == 256
    assert set(report["tokens_per_byte"].values()) == {1.0}
    assert all("vocab_size" not in run["config"] for run in report["runs"])
    table = (tmp_path / "bytes" / "lm.md").read_text()
    assert "; byte-level; " in table and "tokens/byte" not in table
    capsys.readouterr()


# ----------------------------------------------------------------------------------- tiers, curves, reuse
# Two seeds, and an evaluation after every step: the slower model's first evaluation then comes well before
# the faster model's last step, so T lies inside every curve even with a tiny run's timing noise.
TWO_SEEDS = LMBenchSize(
    d_model=32, n_layers=2, seq_len=32, batch_size=4, steps=4, max_time_s=60.0, seeds=(0, 1), eval_batches=1, evals=4
)
TWO_MODELS = ["transformer", "linear_attn"]


@pytest.fixture
def two_seeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A small corpus file, with ``size="tiny"`` as TWO_SEEDS."""
    monkeypatch.setitem(lm.SIZES, "tiny", TWO_SEEDS)
    path = tmp_path / "austen.txt"
    path.write_bytes(bytes(load_corpus(None).train[:40_000].numpy()))
    return path


def _tiny(data: Path, out: Path, **kwargs) -> dict:
    return run_lm_bench(out_dir=str(out), size="tiny", models=TWO_MODELS, data=str(data), progress=False, **kwargs)


def test_standard_tier_is_three_seeds_at_the_quick_shape() -> None:
    standard, quick = SIZES["standard"], SIZES["quick"]
    assert (standard.d_model, standard.n_layers, standard.seq_len, standard.batch_size) == (128, 4, 256, 16)
    assert standard.seeds == (0, 1, 2) and standard.evals == 10 and standard.steps > quick.steps
    assert standard.steps % standard.evals == 0  # the last evaluation is the end of the run
    # the other tiers are what they were
    assert (quick.steps, quick.max_time_s, quick.seeds, quick.evals) == (150, 150.0, (0,), 5)
    assert (SIZES["demo"].steps, SIZES["full"].steps, SIZES["full"].d_model) == (120, 2000, 256)


def test_interpolate_on_a_hand_made_curve() -> None:
    xs, ys = [1.0, 2.0, 4.0], [5.0, 3.0, 2.0]
    assert interpolate(xs, ys, 1.0) == 5.0 and interpolate(xs, ys, 4.0) == 2.0  # the ends are points
    assert interpolate(xs, ys, 1.5) == pytest.approx(4.0)
    assert interpolate(xs, ys, 3.0) == pytest.approx(2.5)  # inside the second segment
    assert interpolate(xs, ys, 0.5) is None and interpolate(xs, ys, 4.5) is None  # never extrapolated
    assert interpolate([2.0], [7.0], 2.0) == 7.0
    with pytest.raises(ValueError, match="interpolate"):
        interpolate([1.0, 2.0], [1.0], 1.5)


def test_training_curve_counts_training_seconds_only() -> None:
    """Each interval's seconds are its tokens over its tokens_per_s; elapsed_s (with evaluations) is not used."""
    events = [
        {"event": "train", "step": 1, "tokens": 100, "tokens_per_s": 50.0, "elapsed_s": 9.0},  # 2 s
        {"event": "eval", "step": 2, "tokens": 200, "tokens_per_s": 25.0, "elapsed_s": 19.0, "val_bpb": 4.0},  # 4 s
        {"event": "train", "step": 3, "tokens": 300, "tokens_per_s": 100.0, "elapsed_s": 20.0},  # 1 s
        {"event": "eval", "step": 4, "tokens": 400, "tokens_per_s": 50.0, "elapsed_s": 30.0, "val_bpb": 3.0},  # 2 s
        {"event": "eval", "step": 4, "tokens": 400, "tokens_per_s": None, "elapsed_s": 31.0, "val_bpb": 3.0},
        {"event": "test", "step": 4, "test_bpb": 3.1},
    ]
    curve = training_curve(events)
    assert [(p["step"], p["tokens"], p["val_bpb"]) for p in curve] == [(2, 200, 4.0), (4, 400, 3.0), (4, 400, 3.0)]
    assert [p["train_s"] for p in curve] == pytest.approx([6.0, 9.0, 9.0])
    assert [p["elapsed_s"] for p in curve] == [19.0, 30.0, 31.0]


def test_equal_time_is_the_shortest_run_and_mean_curve_covers_the_common_range() -> None:
    fast = {"curve": [{"train_s": 1.0, "val_bpb": 4.0}, {"train_s": 2.0, "val_bpb": 3.0}]}
    slow = {"curve": [{"train_s": 1.5, "val_bpb": 5.0}, {"train_s": 3.0, "val_bpb": 2.0}]}
    late = {"curve": [{"train_s": 2.5, "val_bpb": 5.0}, {"train_s": 5.0, "val_bpb": 2.0}]}
    assert add_equal_time([fast, slow, late]) == 2.0
    assert fast["val_bpb_equal_time"] == 3.0 and slow["val_bpb_equal_time"] == pytest.approx(4.0)
    assert late["val_bpb_equal_time"] is None  # T comes before its first evaluation
    xs, mean, std = mean_curve([([1.0, 2.0], [4.0, 3.0]), ([1.5, 3.0], [5.0, 2.0])])
    assert xs == [1.5, 2.0] and mean == pytest.approx([4.25, 3.5]) and std[1] == pytest.approx(math.sqrt(0.5))


def test_two_seed_bench_reports_spread_and_equal_time(two_seeds: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench"
    report = _tiny(two_seeds, out)
    assert {name: [r["seed"] for r in report["runs"] if r["model"] == name] for name in TWO_MODELS} == {
        name: [0, 1] for name in TWO_MODELS
    }
    equal_time = report["equal_time_s"]
    assert equal_time == min(r["train_s"] for r in report["runs"]) > 0
    for run in report["runs"]:
        assert not run["reused"] and run["stopped_reason"] == "max_steps"
        assert [p["step"] for p in run["curve"]] == [1, 2, 3, 4]
        assert run["curve"][-1]["val_bpb"] == run["val_bpb"]  # the last point is the run's result
        assert equal_time <= run["train_s"] == run["curve"][-1]["train_s"]
        assert run["tokens_per_s"] == pytest.approx(run["tokens"] / run["train_s"])
        assert math.isfinite(run["val_bpb_equal_time"])
        # the value at T lies between the run's evaluations around T
        before = [p["val_bpb"] for p in run["curve"] if p["train_s"] <= equal_time][-1]
        after = [p["val_bpb"] for p in run["curve"] if p["train_s"] >= equal_time][0]
        assert min(before, after) <= run["val_bpb_equal_time"] <= max(before, after)
    saved = json.loads((out / "lm.json").read_text())
    assert saved["equal_time_s"] == equal_time and saved["spec"]["evals"] == 4
    table = (out / "lm.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| model"))
    assert header == (
        f"| model | params | seeds | train tokens | val bits/byte | test bits/byte | val bits/byte at "
        f"{lm._seconds(equal_time)} s | train s | train tokens/s |"
    )
    for summary in report["summary"]:
        row = next(line for line in table.splitlines() if line.startswith(f"| {summary['model']} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == "2" and cells[3] == "512"
        for cell, key in zip(cells[4:7], ("val_bpb", "test_bpb", "val_bpb_equal_time")):
            mean, std = (float(v) for v in cell.split(" ± "))
            values = summary[key]
            assert mean == pytest.approx(sum(values) / 2, abs=6e-4)
            assert std == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2), abs=6e-4)
    assert f"T = {lm._seconds(equal_time)} s" in table and "load" in table
    pytest.importorskip("matplotlib")
    assert (out / "lm_curves.png").stat().st_size > 0
    capsys.readouterr()


def test_second_call_reuses_finished_runs_and_retrains_other_settings(
    two_seeds: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from hierseq.training import trainer

    out = tmp_path / "bench"
    first = _tiny(two_seeds, out)
    files = {p: p.stat().st_mtime_ns for p in out.glob("*-seed*/**/*") if p.is_file()}
    real_train = trainer.train

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(trainer, "train", no_training)
    again = _tiny(two_seeds, out)
    assert again["reused_runs"] == 4 and all(r["reused"] for r in again["runs"])
    assert {p: p.stat().st_mtime_ns for p in files} == files  # nothing in the runs' folders was rewritten
    for old, new in zip(first["runs"], again["runs"]):
        assert {k: v for k, v in new.items() if k != "reused"} == {k: v for k, v in old.items() if k != "reused"}
    assert again["equal_time_s"] == first["equal_time_s"]
    assert "4 of 4 runs were reused" in (out / "lm.md").read_text()

    # Other settings in the same folder: every run is trained again (with the new settings), none reused.
    trained = []

    def counting(cfg, *args, **kwargs):
        trained.append((cfg.max_steps, cfg.resume))
        return real_train(cfg, *args, **kwargs)

    monkeypatch.setattr(trainer, "train", counting)
    monkeypatch.setitem(lm.SIZES, "tiny", LMBenchSize(**{**TWO_SEEDS.__dict__, "steps": 6, "evals": 3}))
    longer = _tiny(two_seeds, out)
    assert trained == [(6, False)] * 4 and longer["reused_runs"] == 0
    assert all(r["steps"] == 6 and [p["step"] for p in r["curve"]] == [2, 4, 6] for r in longer["runs"])
    assert "holds a run of other settings, code or data; training it again" in capsys.readouterr().out
    # reuse=False trains everything again, even with the same settings
    trained.clear()
    _tiny(two_seeds, out, reuse=False)
    assert trained == [(6, False)] * 4


def test_interrupted_bench_continues_from_its_checkpoint(
    two_seeds: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Ctrl-C during the first run: the trainer saves it and the bench stops; the same call again continues
    that run from its checkpoint and ends with the numbers of a bench that was never interrupted."""
    from hierseq.training import trainer

    reference = _tiny(two_seeds, tmp_path / "reference")
    step = trainer._Trainer._train_step
    fired = []

    def ctrl_c_once(self):
        out = step(self)
        if not fired:
            fired.append(self.cfg.out_dir)
            signal.raise_signal(signal.SIGINT)  # the trainer's handler: stop after this step and save
        return out

    monkeypatch.setattr(trainer._Trainer, "_train_step", ctrl_c_once)
    out = tmp_path / "bench"
    with pytest.raises(KeyboardInterrupt):
        _tiny(two_seeds, out)
    first = out / "transformer-seed0"
    assert fired == [str(first)] and json.loads((first / lm.RUN_MARKER).read_text())["status"] == "interrupted"
    assert not (out / "transformer-seed1").exists()  # the bench stopped there
    resumed = []
    real_train = trainer.train
    monkeypatch.setattr(trainer, "train", lambda cfg, *a, **k: resumed.append(cfg.resume) or real_train(cfg, *a, **k))
    report = _tiny(two_seeds, out)
    assert resumed == [True, False, False, False]
    assert "continuing the interrupted run" in capsys.readouterr().out
    for run, ref in zip(report["runs"], reference["runs"]):
        assert (run["model"], run["seed"], run["steps"]) == (ref["model"], ref["seed"], ref["steps"])
        assert run["val_bpb"] == ref["val_bpb"] and run["test_bpb"] == ref["test_bpb"]  # bit-exact resume
    assert json.loads((first / lm.RUN_MARKER).read_text())["status"] == "finished"
