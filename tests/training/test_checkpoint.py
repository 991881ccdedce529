"""Checkpoints: pickle-free state encoding, bit-exact resume, and saves interrupted midway."""

import json

import pytest
import torch
from safetensors.torch import load_file
from trainer_helpers import tiny_config

import hierseq
from hierseq.training import checkpoint as ckpt
from hierseq.training import train
from hierseq.training.checkpoint import decode_state, encode_state, find_checkpoint, load_trainer_state
from hierseq.training.tasks.lm import LMTask


def _train_losses(out_dir) -> dict[int, float]:
    events = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in events if e["loss"] is not None}


def _weights(directory):
    return load_file(str(directory / "model.safetensors"))


def test_encode_decode_round_trip():
    state = {
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}}, "betas": (0.9, 0.95)},
        "rng": [torch.get_rng_state()],
        "step": 7,
        "name": "x",
        "none": None,
    }
    tensors = {}
    encoded = encode_state(state, tensors)
    json.dumps(encoded)  # JSON-able
    decoded = decode_state(json.loads(json.dumps(encoded)), tensors)
    assert decoded["optimizer"]["betas"] == (0.9, 0.95)
    assert list(decoded["optimizer"]["state"]) == [0]
    assert torch.equal(decoded["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert torch.equal(decoded["rng"][0], state["rng"][0]) and decoded["step"] == 7 and decoded["none"] is None
    with pytest.raises(TypeError, match="without pickle"):
        encode_state({"f": object()}, {})


def test_resume_gives_identical_losses(tmp_path):
    # Dropout and grad accumulation on, so RNG and loader state must both be restored exactly.
    model_cfg = {**hierseq.get_entry("transformer").config_cls.small_overrides(), "dropout": 0.1}
    common = dict(model_config=model_cfg, grad_accum=2, max_steps=8, eval_every=4)
    train(tiny_config(tmp_path / "full", **common))
    # Same schedule (schedule_steps=8) but stop at 4, then resume to 8.
    first = train(tiny_config(tmp_path / "split", **{**common, "max_steps": 4, "schedule_steps": 8}))
    assert first["step"] == 4 and load_trainer_state(tmp_path / "split" / "checkpoint")["step"] == 4
    second = train(tiny_config(tmp_path / "split", **{**common, "schedule_steps": 8, "resume": True}))
    assert second["step"] == 8
    full, split = _train_losses(tmp_path / "full"), _train_losses(tmp_path / "split")
    assert list(full) == list(range(1, 9))
    assert split == full  # exact equality, every step
    assert all(
        torch.equal(a, b)
        for a, b in zip(_weights(tmp_path / "full/final").values(), _weights(tmp_path / "split/final").values())
    )


@pytest.mark.parametrize("name", hierseq.list_models("causal_lm"))
def test_tbptt_resume_restores_the_carried_state_exactly(tmp_path, name, capsys):
    # A TBPTT run split at step 3 equals the uninterrupted run only if the state carried into step 4
    # comes back from the checkpoint: with it restarting empty, step 4's loss differs.
    common = dict(
        model=name,
        model_config=hierseq.get_entry(name).config_cls.small_overrides(),
        loader="stream",
        tbptt=True,
        grad_accum=2,
        max_steps=6,
        schedule_steps=6,
    )
    train(tiny_config(tmp_path / "full", **common))
    train(tiny_config(tmp_path / "split", **{**common, "max_steps": 3}))
    saved = load_trainer_state(tmp_path / "split" / "checkpoint")["task"]["tbptt_caches"]
    assert len(saved) == 2 and all(s is not None and s["length"] == 3 * 32 for s in saved)
    capsys.readouterr()
    train(tiny_config(tmp_path / "split", **{**common, "resume": True}))
    assert "carried recurrent state is restored" in capsys.readouterr().out
    assert _train_losses(tmp_path / "split") == _train_losses(tmp_path / "full")
    full, split = _weights(tmp_path / "full/final"), _weights(tmp_path / "split/final")
    assert all(torch.equal(full[k], split[k]) for k in full)


def test_tbptt_resume_without_a_saved_state_says_it_restarts_empty(tmp_path, capsys, tiny_rnn, monkeypatch):
    # A checkpoint written without the carried state (as under DDP): the resumed run says it restarts empty.
    monkeypatch.setattr(LMTask, "_carried_states", lambda self: None)
    data = tmp_path / "text.txt"
    data.write_bytes(bytes(range(200)) * 2)
    common = dict(model=tiny_rnn, model_config={}, data=str(data), seq_len=16, batch_size=2, loader="stream")
    common.update(tbptt=True, schedule_steps=4)
    train(tiny_config(tmp_path / "run", **{**common, "max_steps": 2}))
    assert load_trainer_state(tmp_path / "run" / "checkpoint")["task"]["tbptt_caches"] is None
    capsys.readouterr()
    train(tiny_config(tmp_path / "run", **{**common, "max_steps": 4, "resume": True}))
    assert "carried recurrent state restarts empty (the checkpoint holds none)" in capsys.readouterr().out


def test_resume_refuses_a_different_experiment(tmp_path):
    train(tiny_config(tmp_path, max_steps=2))
    with pytest.raises(ValueError, match=r"resume: seq_len=16 differs from the checkpoint's 32"):
        train(tiny_config(tmp_path, max_steps=4, seq_len=16, resume=True))


class _Crash(Exception):
    pass


def test_save_killed_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    real = ckpt._write_trainer_state
    calls = {"n": 0}

    def crash_on_second_save(directory, state):
        calls["n"] += 1
        if calls["n"] == 2:
            # Half-written: the model files of the new checkpoint exist, the trainer state is torn.
            (directory / ckpt.STATE_TENSORS).write_bytes(b"\x00" * 10)
            raise _Crash("killed during save")
        real(directory, state)

    monkeypatch.setattr(ckpt, "_write_trainer_state", crash_on_second_save)
    with pytest.raises(_Crash):
        train(tiny_config(tmp_path, max_steps=4, save_every=2))
    assert (tmp_path / "checkpoint.tmp").is_dir()  # the torn new one
    found = find_checkpoint(tmp_path)
    assert found == tmp_path / "checkpoint"
    assert load_trainer_state(found)["step"] == 2
    hierseq.load(found)  # the model in it loads too
    # Resuming from it finishes the run exactly like an uninterrupted one.
    monkeypatch.setattr(ckpt, "_write_trainer_state", real)
    train(tiny_config(tmp_path, max_steps=4, save_every=2, resume=True))
    train(tiny_config(tmp_path / "ref", max_steps=4, save_every=2))
    assert _train_losses(tmp_path) == _train_losses(tmp_path / "ref")
    assert not (tmp_path / "checkpoint.tmp").exists() and not (tmp_path / "checkpoint.old").exists()


def test_save_killed_between_renames_falls_back_to_old(tmp_path, monkeypatch):
    real = ckpt._rename

    def crash_before_promoting(src, dst):
        if src.name == "checkpoint.tmp" and (tmp_path / "checkpoint.old").exists():
            raise _Crash("killed after moving the previous checkpoint aside")
        real(src, dst)

    monkeypatch.setattr(ckpt, "_rename", crash_before_promoting)
    with pytest.raises(_Crash):
        train(tiny_config(tmp_path, max_steps=4, save_every=2))
    assert not (tmp_path / "checkpoint").exists()
    found = find_checkpoint(tmp_path)
    assert found == tmp_path / "checkpoint.old" and load_trainer_state(found)["step"] == 2
    monkeypatch.setattr(ckpt, "_rename", real)
    result = train(tiny_config(tmp_path, max_steps=4, save_every=2, resume=True))
    assert result["step"] == 4 and load_trainer_state(find_checkpoint(tmp_path))["step"] == 4
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint" and not (tmp_path / "checkpoint.old").exists()


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {helpers!r})
from trainer_helpers import tiny_config
from hierseq.training import checkpoint as ckpt, train

real = ckpt._write_trainer_state
calls = {{"n": 0}}

def killed_midway(directory, state):
    calls["n"] += 1
    real(directory, state)
    if calls["n"] == 2:
        # Tear the just-written state, then die without any cleanup (no finally, no atexit).
        (Path(directory) / ckpt.STATE_JSON).write_text('{{"format_version": 1, "sta')
        os.kill(os.getpid(), signal.SIGKILL)

ckpt._write_trainer_state = killed_midway
train(tiny_config({out!r}, max_steps=4, save_every=2))
"""


def test_sigkill_during_save_leaves_previous_checkpoint(tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    script = KILL_SCRIPT.format(helpers=str(Path(__file__).parent), out=str(tmp_path / "run"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    found = find_checkpoint(tmp_path / "run")
    assert found == tmp_path / "run" / "checkpoint"
    assert load_trainer_state(found)["step"] == 2
    hierseq.load(found)
