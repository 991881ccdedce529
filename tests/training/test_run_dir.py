"""The run directory (issue 20): resume applies what changed, nothing is written before a run is valid, a
run dir is continued / replaced / refused on purpose, failed writes leave no half-written folders, and the
run records its corpus as an absolute path."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import pytest
import yaml
from safetensors import SafetensorError
from trainer_helpers import tiny_config

from hierseq.config import RunStopped
from hierseq.training import TrainConfig, train
from hierseq.training import checkpoint as ckpt
from hierseq.training.checkpoint import load_trainer_state
from hierseq.training.metrics import read_metrics
from hierseq.training.run_dir import canonical_data, recorded_run, same_data
from hierseq.training.tasks.lm import LMTask
from hierseq.training.trainer import lr_factor


def _events(out_dir: Path, kind: str) -> list[dict]:
    return [e for e in read_metrics(out_dir / "metrics.jsonl") if e["event"] == kind]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: (size, mtime_ns)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------ 1. resume applies changes
def test_resume_applies_a_changed_lr_and_optimiser_fields_logs_and_records_them(tmp_path):
    logs: list[str] = []
    train(tiny_config(tmp_path, max_steps=4, warmup_steps=2, lr=1e-3), log=None)
    cfg = tiny_config(tmp_path, max_steps=6, warmup_steps=2, lr=1e-4, beta2=0.9, weight_decay=0.0, resume=True)
    train(cfg, log=logs.append)

    # The new schedule, from the resumed step on: lr_new * factor(step) (the event of step s logs the lr
    # of the next step, factor(s)), not the checkpoint's base lr.
    for event in _events(tmp_path, "train"):
        base = 1e-3 if event["step"] <= 4 else 1e-4
        total = 4 if event["step"] <= 4 else 6
        assert event["lr"] == pytest.approx(base * lr_factor(event["step"], 2, total, cfg.min_lr_ratio))
    groups = load_trainer_state(tmp_path / "checkpoint")["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [1e-4, 1e-4]
    assert all(g["betas"] == (0.9, 0.9) for g in groups) and [g["weight_decay"] for g in groups] == [0.0, 0.0]

    (line,) = [m for m in logs if m.startswith("resume: changed")]
    assert "lr 0.001 -> 0.0001" in line and "beta2 0.95 -> 0.9" in line and "applied from step 5" in line
    text = (tmp_path / "train_config.yaml").read_text()
    assert text.startswith("# resumed at step 4 with ") and "lr 0.001 -> 0.0001" in text.splitlines()[0]
    assert yaml.safe_load(text)["lr"] == 1e-4  # the file is still a TrainConfig, with the value in use
    assert TrainConfig.from_dict(yaml.safe_load(text)).lr == 1e-4
    # The history travels with the checkpoint: a later resume keeps the comment.
    train(tiny_config(tmp_path, max_steps=7, warmup_steps=2, lr=1e-4, beta2=0.9, weight_decay=0.0, resume=True))
    lines = (tmp_path / "train_config.yaml").read_text().splitlines()
    assert lines[0].startswith("# resumed at step 4") and lines[1].startswith("# resumed at step 6 with max_steps")


def test_resume_with_unchanged_settings_logs_no_change(tmp_path):
    train(tiny_config(tmp_path, max_steps=4, schedule_steps=6), log=None)
    logs: list[str] = []
    train(tiny_config(tmp_path, max_steps=6, schedule_steps=6, resume=True), log=logs.append)
    changed = [m for m in logs if m.startswith("resume: changed")]
    lr = 1e-3 * lr_factor(4, 2, 6, 0.1)  # the schedule is the same: schedule_steps fixes its length
    assert changed == [f"resume: changed max_steps 4 -> 6; applied from step 5 on (lr there: {lr:.4g})"]


# ------------------------------------------------------------------------------------ 2. the NaN stop
def test_nan_stop_is_a_run_stopped_error_and_a_new_run_leaves_nothing(tmp_path, tiny_rnn):
    out = tmp_path / "deep" / "run"
    cfg = tiny_config(out, model=tiny_rnn, model_config={"nan_at_call": 2}, max_steps=5)
    with pytest.raises(RunStopped, match=r"non-finite loss at step 2 .*this run saved no checkpoint yet"):
        train(cfg, log=None)
    assert not (tmp_path / "deep").exists()  # the folders it created are gone again


# ------------------------------------------------------------------------------------ 3. output-path errors
def test_out_dir_that_is_a_file_or_read_only_is_refused_before_anything(tmp_path, monkeypatch):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match=r"^out_dir='.*file': exists and is not a directory"):
        train(tiny_config(target), log=None)
    with pytest.raises(ValueError, match=r"'.*file' is a file, so the folder cannot be created"):
        train(tiny_config(target / "run"), log=None)

    monkeypatch.setattr("hierseq.training.run_dir._read_only_fs", lambda path: True)
    with pytest.raises(ValueError, match=r"^out_dir='.*ro/run': cannot be written: .* is on a read-only file system"):
        train(tiny_config(tmp_path / "ro" / "run"), log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_disk_full_during_a_checkpoint_keeps_the_previous_one_and_no_tmp(tmp_path, monkeypatch):
    real = ckpt.save_file
    calls = {"n": 0}

    def full_disk(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(OSError, match=r"^out_dir='.*': writing the checkpoint failed \(Error while serializing"):
        train(tiny_config(tmp_path, max_steps=4, save_every=2), log=None)
    assert not (tmp_path / "checkpoint.tmp").exists()
    assert load_trainer_state(tmp_path / "checkpoint")["step"] == 2  # the last good one


def test_disk_full_during_the_final_save_leaves_no_tmp(tmp_path, monkeypatch):
    real = ckpt.save_model

    def writer(model, folder):
        if Path(folder).name == "final.tmp":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(model, folder)

    monkeypatch.setattr(ckpt, "save_model", writer)
    with pytest.raises(OSError, match=r"writing the final model failed \(No space left on device\)"):
        train(tiny_config(tmp_path, max_steps=2), log=None)
    assert not (tmp_path / "final.tmp").exists() and not (tmp_path / "final").exists()
    assert load_trainer_state(tmp_path / "checkpoint")["step"] == 2


# ------------------------------------------------------------------------------------ 5. reruns into a run dir
def test_refused_or_invalid_rerun_leaves_the_run_dir_untouched(tmp_path):
    train(tiny_config(tmp_path, max_steps=2), log=None)
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match=r"^out_dir='.*': already holds a run \(train_config.yaml, metrics.jsonl"):
        train(tiny_config(tmp_path, max_steps=2), log=None, overwrite=False)
    # --overwrite, but the new run is invalid: found out before the old run is touched.
    with pytest.raises(ValueError, match=r"model_config.vocab_size=10: the corpus 'austen' holds byte values"):
        train(tiny_config(tmp_path, max_steps=2, model_config={"vocab_size": 10, "d_model": 32}), log=None)
    with pytest.raises(ValueError, match=r"resume: seq_len=16 differs from the checkpoint's 32"):
        train(tiny_config(tmp_path, max_steps=3, seq_len=16, resume=True), log=None)
    assert _tree(tmp_path) == before


def test_overwrite_replaces_the_whole_run_and_keeps_other_files(tmp_path):
    train(tiny_config(tmp_path, max_steps=4, save_every=2), log=None)
    (tmp_path / "notes.txt").write_text("mine")
    logs: list[str] = []
    train(tiny_config(tmp_path, max_steps=2), log=logs.append, overwrite=True)
    assert [e["step"] for e in _events(tmp_path, "train")] == [1, 2]
    assert load_trainer_state(tmp_path / "checkpoint")["step"] == 2
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert any(m.startswith("overwrite: removed the previous run's train_config.yaml") for m in logs)


def test_resume_without_a_checkpoint_into_a_used_dir_is_refused(tmp_path, tiny_rnn):
    with pytest.raises(RunStopped):  # fails before its first save: leaves nothing
        train(tiny_config(tmp_path / "run", model=tiny_rnn, model_config={"nan_at_call": 2}), log=None)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"holds a run \(metrics.jsonl\) but no checkpoint to resume from"):
        train(tiny_config(tmp_path / "run", resume=True), log=None, overwrite=False)


def test_nan_after_a_resume_names_the_checkpoint_that_exists(tmp_path, monkeypatch):
    train(tiny_config(tmp_path, max_steps=3), log=None)
    real = LMTask.forward
    calls = {"n": 0}

    def forward(self, model, micro, index):
        calls["n"] += 1
        out = real(self, model, micro, index)
        if calls["n"] == 2:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(LMTask, "forward", forward)
    with pytest.raises(RunStopped, match=r"at step 5 .*last good checkpoint at '.*checkpoint' \(step 3; --resume"):
        train(tiny_config(tmp_path, max_steps=6, lr=5e-4, resume=True), log=None)
    assert load_trainer_state(tmp_path / "checkpoint")["step"] == 3
    # train_config.yaml still describes that checkpoint (the failed session's lr is not recorded).
    assert yaml.safe_load((tmp_path / "train_config.yaml").read_text())["lr"] == 1e-3


# ------------------------------------------------------------------------------------ 9. finished runs, data paths
def test_resuming_a_finished_run_adds_no_step_rows(tmp_path):
    train(tiny_config(tmp_path, max_steps=4, eval_every=2), log=None)
    before = read_metrics(tmp_path / "metrics.jsonl")
    assert [(e["event"], e["step"]) for e in before][-2:] == [("train", 3), ("eval", 4)]  # log and eval in one row
    for max_steps in (2, 4):  # fewer steps than done, or as many: nothing to train, no row added
        result = train(tiny_config(tmp_path, max_steps=max_steps, eval_every=2, resume=True), log=None)
        assert result["step"] == 4 and read_metrics(tmp_path / "metrics.jsonl") == before


def test_data_is_recorded_and_compared_as_a_resolved_path(tmp_path, monkeypatch):
    text = tmp_path / "a" / "x.txt"
    text.parent.mkdir()
    text.write_text("some text to learn from. " * 200)
    monkeypatch.chdir(tmp_path / "a")
    cfg = tiny_config(tmp_path / "run", data="./x.txt", seq_len=16, max_steps=2)
    assert cfg.data == str(text.resolve())
    train(cfg, log=None)
    assert yaml.safe_load((tmp_path / "run" / "train_config.yaml").read_text())["data"] == str(text.resolve())
    train(tiny_config(tmp_path / "run", data="x.txt", seq_len=16, max_steps=3, resume=True), log=None)  # same file
    # The same relative string from another directory is another file.
    other = tmp_path / "b" / "x.txt"
    other.parent.mkdir()
    other.write_text("other text. " * 400)
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(ValueError, match=r"resume: data='.*/b/x.txt' differs from the checkpoint's '.*/a/x.txt'"):
        train(tiny_config(tmp_path / "run", data="x.txt", seq_len=16, max_steps=4, resume=True), log=None)
    run = recorded_run(tmp_path / "run" / "final")
    assert run is not None and run.data == str(text.resolve()) and run.seq_len == 16


def test_canonical_data_expands_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert canonical_data("~/x.txt") == str((tmp_path / "x.txt").resolve())
    assert same_data("~/x.txt", str(tmp_path / "." / "x.txt")) and canonical_data(None) is None


# ------------------------------------------------------------------------------------ 10. defaults
def test_warmup_longer_than_the_run_warns(tmp_path):
    logs: list[str] = []
    train(tiny_config(tmp_path, max_steps=2, warmup_steps=100), log=logs.append)
    (warning,) = [m for m in logs if m.startswith("warning:")]
    assert "warmup_steps=100 >= max_steps=2" in warning and "peaks at 0.02 * lr" in warning


def test_integral_floats_are_accepted_for_int_fields():
    cfg = tiny_config("runs/x", max_steps=1e3, warmup_steps="1e1", task="mqar", task_options={"n_pairs": 2.0})
    assert (cfg.max_steps, cfg.warmup_steps, cfg.task_opts["n_pairs"]) == (1000, 10, 2)
    assert isinstance(cfg.max_steps, int)
    with pytest.raises(ValueError, match=r"^max_steps=2.5: must be a positive integer"):
        tiny_config("runs/x", max_steps=2.5)


def test_vocab_smaller_than_the_corpus_bytes_fails_before_the_run_dir_exists(tmp_path):
    text = tmp_path / "x.txt"
    text.write_text("abc " * 400)
    cfg = tiny_config(tmp_path / "run", data=str(text), seq_len=16, model_config={"vocab_size": 64, "d_model": 32})
    with pytest.raises(ValueError, match=r"model_config.vocab_size=64: .* byte values up to 99, .* vocab_size >= 100"):
        train(cfg, log=None)
    assert not (tmp_path / "run").exists()
    ok = tiny_config(tmp_path / "run", data=str(text), seq_len=16, max_steps=1, model_config={"vocab_size": 100})
    assert train(ok, log=None)["step"] == 1  # exactly large enough


def test_lm_task_logs_which_files_it_reads(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name in "abc":
        (folder / f"{name}.txt").write_text(f"text of {name}. " * 100)
    logs: list[str] = []
    train(tiny_config(tmp_path / "run", data=str(folder), seq_len=16, max_steps=1), log=logs.append)
    (line,) = [m for m in logs if m.startswith("data: folder")]
    assert "3 text file(s) ['a.txt', 'b.txt', 'c.txt']" in line and "split by position" in line
    assert LMTask.reads_text


# ------------------------------------------------------------------------------------ 8. Ctrl-C saves
def test_first_ctrl_c_stops_after_the_step_and_saves(tmp_path, monkeypatch):
    real = LMTask.forward
    calls = {"n": 0}

    def forward(self, model, micro, index):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C, during step 3
        return real(self, model, micro, index)

    monkeypatch.setattr(LMTask, "forward", forward)
    previous = signal.getsignal(signal.SIGINT)
    logs: list[str] = []
    result = train(tiny_config(tmp_path, max_steps=50), log=logs.append)
    assert result["stopped_reason"] == "interrupted" and result["step"] == 3
    assert load_trainer_state(tmp_path / "checkpoint")["step"] == 3 and (tmp_path / "final").is_dir()
    assert any(m.startswith("interrupt: stopping after step 3") for m in logs)
    assert signal.getsignal(signal.SIGINT) is previous  # the handler is the caller's again
    monkeypatch.setattr(LMTask, "forward", real)
    assert train(tiny_config(tmp_path, max_steps=4, resume=True), log=None)["step"] == 4


def test_checkpoint_state_is_json_with_the_resume_history(tmp_path):
    train(tiny_config(tmp_path, max_steps=2), log=None)
    train(tiny_config(tmp_path, max_steps=3, lr=5e-4, resume=True), log=None)
    payload = json.loads((tmp_path / "checkpoint" / ckpt.STATE_JSON).read_text())
    assert payload["state"]["resume_history"] == [{"step": 2, "changed": {"max_steps": [2, 3], "lr": [0.001, 0.0005]}}]
