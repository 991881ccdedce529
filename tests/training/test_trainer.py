"""The training loop: outputs and files, evaluation, optimiser groups, schedule, time budget, NaN stop,
and TBPTT state carrying with a test-only recurrent model."""

import json
import math

import pytest
import torch
from trainer_helpers import TinyRNN, tiny_config

import hierseq
from hierseq.data import eval_windows, load_corpus
from hierseq.training import evaluate, train
from hierseq.training.checkpoint import find_checkpoint, load_trainer_state
from hierseq.training.trainer import build_optimizer, lr_factor


def _events(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_outputs_files_and_metrics(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=6, log_every=2, eval_every=3, lr=3e-3)
    result = train(cfg)
    assert result["step"] == 6 and result["stopped_reason"] == "max_steps"
    assert result["tokens"] == 6 * 4 * 32 and result["tokens_per_s"] > 0
    model = hierseq.load(tmp_path / "final")
    assert result["n_params"] == sum(p.numel() for p in model.parameters())
    # The reported val loss is the final model's loss on the val split, recomputed independently.
    val = evaluate(model, load_corpus().val, 32, 4, 2)
    assert result["val_loss"] == pytest.approx(val["loss"], abs=1e-6)
    assert result["val_bpb"] == pytest.approx(val["loss"] / math.log(2), abs=1e-6)
    assert 4.0 < result["val_loss"] < math.log(256) + 0.1  # a few steps: below uniform-ish, far from trained

    events = _events(tmp_path)
    assert [(e["step"], e["event"]) for e in events] == [(2, "train"), (3, "eval"), (4, "train"), (6, "eval")]
    for e in events:
        assert {"step", "tokens", "lr", "loss", "lm_loss", "aux_loss", "tokens_per_s", "elapsed_s"} <= set(e)
        assert e["loss"] == e["lm_loss"] and e["aux_loss"] == 0.0  # transformer has no aux loss
    assert "val_loss" in events[1] and "val_bpb" in events[1] and "val_loss" not in events[0]
    assert events[-1]["val_loss"] == result["val_loss"]
    assert events[0]["loss"] > events[-1]["loss"]  # it learns (unigram statistics at least)

    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert hierseq.load(tmp_path / "checkpoint").config == model.config
    assert load_trainer_state(find_checkpoint(tmp_path))["step"] == 6
    assert (tmp_path / "train_config.yaml").read_text() == cfg.to_yaml()


def test_evaluate_matches_manual_loss_and_restores_mode():
    torch.manual_seed(0)
    model = hierseq.build_model("transformer", **hierseq.get_entry("transformer").config_cls.small_overrides())
    tokens = load_corpus().val[:1000]  # 999 predicted tokens = 31 windows of 32 + leftovers
    model.train()
    out = evaluate(model, tokens, seq_len=32, batch_size=8, max_batches=None)
    assert model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in eval_windows(tokens, 8, 32):
            logits = model(x).logits
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
    assert out["tokens"] == count == 31 * 32
    assert out["loss"] == pytest.approx(total / count, rel=1e-5)
    assert out["bpb"] == pytest.approx(out["loss"] / math.log(2))


def test_optimizer_groups_skip_norms_biases_and_tied_embedding():
    model = hierseq.build_model("transformer", **hierseq.get_entry("transformer").config_cls.small_overrides())
    assert model.lm_head.weight is model.embed.weight  # tied
    cfg = tiny_config("unused")
    opt = build_optimizer(model, cfg)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == cfg.weight_decay and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "embed.weight" in no_decay_names
    assert all(names[id(p)].endswith("weight") and p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"] if p is not model.embed.weight)
    # Every parameter exactly once (the tied head is not optimised twice).
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_lr_schedule():
    assert [lr_factor(s, 4, 12, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 4, 12, 0.1) == 1.0
    assert lr_factor(8, 4, 12, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(12, 4, 12, 0.1) == pytest.approx(0.1)
    assert lr_factor(100, 4, 12, 0.1) == pytest.approx(0.1)  # constant after the schedule


def test_max_time_stops_cleanly(tmp_path):
    result = train(tiny_config(tmp_path, max_steps=100_000, max_time_s=0.2))
    assert result["stopped_reason"] == "max_time"
    assert 1 <= result["step"] < 100_000
    assert math.isfinite(result["val_loss"])
    assert (tmp_path / "final" / "model.safetensors").is_file()
    assert load_trainer_state(tmp_path / "checkpoint")["step"] == result["step"]


def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(tmp_path, tiny_rnn):
    cfg = tiny_config(tmp_path, model=tiny_rnn, model_config={"nan_at_call": 5}, max_steps=10, save_every=2)
    with pytest.raises(RuntimeError, match=r"non-finite loss at step 5 .*last good checkpoint at .*checkpoint.*step 4"):
        train(cfg)
    assert load_trainer_state(find_checkpoint(tmp_path))["step"] == 4
    assert not (tmp_path / "final").exists()
    assert not (tmp_path / "checkpoint.tmp").exists()


def test_tbptt_carries_detached_state_and_resets_at_stream_starts(tmp_path, tiny_rnn):
    # 400 bytes -> train split 360 -> 2 streams of 180 -> (180 - 1) // 16 = 11 batches per pass.
    data = tmp_path / "text.txt"
    data.write_bytes(bytes(range(200)) * 2)
    cfg = tiny_config(
        tmp_path / "run", model=tiny_rnn, model_config={}, data=str(data), seq_len=16, batch_size=2, max_steps=14
    )
    cfg = cfg.replace(loader="stream", tbptt=True)
    train(cfg)
    calls = TinyRNN.calls
    assert len(calls) == 14
    expected = [None] + [16 * i for i in range(1, 11)] + [None, 16, 32]
    assert [c["tokens_seen"] for c in calls] == expected
    # The carried state was detached (TBPTT), and batches continue the streams.
    assert all(c["h_has_graph"] is False for c in calls if c["tokens_seen"] is not None)
    assert calls[0]["first_token"] == [0, 180] and calls[1]["first_token"] == [16, 196]
    assert calls[11]["first_token"] == calls[0]["first_token"]


def test_tbptt_with_grad_accum_keeps_one_state_per_micro_batch(tmp_path, tiny_rnn):
    data = tmp_path / "text.txt"
    data.write_bytes(bytes(range(200)) * 4)
    cfg = tiny_config(tmp_path / "run", model=tiny_rnn, model_config={}, data=str(data), seq_len=16, max_steps=3)
    train(cfg.replace(loader="stream", tbptt=True, grad_accum=2))  # batch 4 = 2 micro-batches of 2 streams
    assert [c["tokens_seen"] for c in TinyRNN.calls] == [None, None, 16, 16, 32, 32]
    # micro-batch 0 holds streams 0-1, micro-batch 1 streams 2-3 (720 / 4 = 180 bytes each)
    assert TinyRNN.calls[0]["first_token"] == [0, 180] and TinyRNN.calls[1]["first_token"] == [360 % 200, 540 % 200]
