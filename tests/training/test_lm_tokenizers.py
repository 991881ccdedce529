"""The lm task on subword tokens: bits per byte by their definition, the tokenizer setting ``vocab_size`` and
travelling with checkpoints and the final model, resumes reading the saved tokenizer (never training it
again) and refusing another one, and the byte path left exactly as it was."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from trainer_helpers import tiny_config

import hierseq
from hierseq.data import subword
from hierseq.data.corpora import load_corpus
from hierseq.data.subword import SubwordTokenizer, train_bpe
from hierseq.data.tokenizer import TOKENIZER_FILE, ByteTokenizer, tokenize_split, tokenizer_of
from hierseq.training import TrainConfig, evaluate, train
from hierseq.training.checkpoint import load_trainer_state
from hierseq.training.tasks.lm import evaluate_split

#: A fixed text with words the BPE knows, one it has never seen, and characters of 2 to 4 bytes.
FIXED_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. Zyxwvut! naïve café — “quoted” 日本語 👍🏽 e\u0301 and so on, and so on."
)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 48 KB of Austen as a text file (split by position: 43 KB to train a tokenizer on)."""
    path = tmp_path_factory.mktemp("lm_tokenizers") / "austen.txt"
    path.write_bytes(bytes(load_corpus(None).train[:48_000].numpy()))
    return path


@pytest.fixture(scope="module")
def bpe(corpus_file: Path) -> SubwordTokenizer:
    """The BPE a run on ``corpus_file`` trains: on its training split (the first 90%) alone."""
    return train_bpe(bytes(load_corpus(str(corpus_file)).train.numpy()).decode("utf-8"), 400)


def _model(vocab_size: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return hierseq.build_model("transformer", vocab_size=vocab_size, d_model=32, n_layers=1, n_heads=2).eval()


def _run(out_dir: Path, corpus_file: Path, **overrides) -> TrainConfig:
    base = dict(data=str(corpus_file), tokenizer="bpe:400", model_config={"d_model": 32, "n_layers": 1, "n_heads": 2})
    return tiny_config(out_dir, **{**base, **overrides})


# ------------------------------------------------------------------------------------------ bits per byte
def test_bits_per_byte_through_bpe_is_summed_token_loss_over_utf8_bytes(bpe: SubwordTokenizer) -> None:
    data = torch.frombuffer(bytearray(FIXED_TEXT.encode()), dtype=torch.uint8)
    split = tokenize_split(data, bpe)
    ids = split.ids.long()
    n = len(ids)
    model = _model(bpe.vocab_size)
    # The definition, computed directly: one window over the whole text, every token but the first scored.
    with torch.no_grad():
        logits = model(ids[None, :-1]).logits[0]
    nats = torch.nn.functional.cross_entropy(logits.double(), ids[1:], reduction="sum").item()
    first_token_bytes = len(bpe.decode(ids[:1]).encode("utf-8"))
    scored_bytes = len(FIXED_TEXT.encode("utf-8")) - first_token_bytes
    assert scored_bytes == len(bpe.decode(ids[1:]).encode("utf-8"))  # the scored tokens spell exactly these bytes
    out = evaluate(model, split.ids, n - 1, 1, None, split.byte_counts)
    assert out["tokens"] == n - 1 and out["bytes"] == scored_bytes
    assert out["bpb"] == pytest.approx(nats / math.log(2) / scored_bytes, rel=1e-6)
    assert out["loss"] == pytest.approx(nats / (n - 1), rel=1e-6)
    # Per byte is per token times tokens per byte: a subword loss is not a per-byte one.
    assert out["bpb"] == pytest.approx(out["loss"] / math.log(2) * (n - 1) / scored_bytes, rel=1e-9)
    assert out["bpb"] < out["loss"] / math.log(2)


def test_bits_per_byte_over_evenly_spread_windows_counts_their_bytes(bpe: SubwordTokenizer) -> None:
    text = FIXED_TEXT * 6
    split = tokenize_split(torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8), bpe)
    model = _model(bpe.vocab_size, seed=1)
    seq_len = 16
    out = evaluate(model, split.ids, seq_len, 2, 2, split.byte_counts)  # 4 of the windows, spread out
    n_windows = (len(split) - 1) // seq_len
    chosen = (torch.arange(4) * n_windows) // 4
    nats, n_bytes = 0.0, 0
    with torch.no_grad():
        for k in chosen.tolist():
            window = split.ids[k * seq_len : k * seq_len + seq_len + 1].long()
            logits = model(window[None, :-1]).logits[0]
            nats += torch.nn.functional.cross_entropy(logits.double(), window[1:], reduction="sum").item()
            n_bytes += int(split.byte_counts[k * seq_len + 1 : k * seq_len + seq_len + 1].sum())
    assert out["tokens"] == 4 * seq_len and out["bytes"] == n_bytes
    assert out["bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-6)


def test_the_byte_path_is_bit_for_bit_what_it_was() -> None:
    tokens = load_corpus().val[:2000]
    model = _model(256)
    split = tokenize_split(tokens, ByteTokenizer())
    assert split.ids is tokens  # no copy, no re-encoding
    old = evaluate(model, tokens, 32, 8, None)
    new = evaluate(model, split.ids, 32, 8, None, split.byte_counts)
    assert old == new and old["bytes"] == old["tokens"]
    assert old["bpb"] == old["loss"] / math.log(2)  # exactly, as before tokenizers


# ------------------------------------------------------------------------------------------ training
def test_a_bpe_run_sets_vocab_size_and_saves_the_tokenizer_with_every_model(tmp_path: Path, corpus_file, bpe) -> None:
    logs: list[str] = []
    result = train(_run(tmp_path, corpus_file, eval_every=3), log=logs.append)
    model = hierseq.load(tmp_path / "final")
    assert model.config.vocab_size == 400
    for folder in ("final", "checkpoint"):
        saved = tokenizer_of(hierseq.load(tmp_path / folder))
        assert saved.spec == "bpe:400" and saved.to_json() == bpe.to_json()  # trained on the train split only
    assert bpe.to_json() != train_bpe(corpus_file.read_text(), 400).to_json()  # (the whole file gives another)
    details = next(line for line in logs if line.startswith("data: "))
    assert "tokenizer bpe:400 (trained on the train split, 400 tokens): tokens per byte train 0." in details
    assert "tokenizer: bpe:400" in (tmp_path / "train_config.yaml").read_text()
    # The val metrics are the final model's, in bits per byte of the val text.
    corpus = load_corpus(str(corpus_file))
    val = evaluate_split(model, tokenize_split(corpus.val, bpe), 32, 4, 2)
    assert result["val_loss"] == pytest.approx(val["loss"], abs=1e-6)
    assert result["val_bpb"] == pytest.approx(val["bpb"], abs=1e-6)
    assert val["bpb"] < 0.8 * val["loss"] / math.log(2)  # bits per byte, not per token
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "eval"] == [3, 6]


def test_a_resumed_bpe_run_reads_its_saved_tokenizer_and_equals_the_uninterrupted_one(
    tmp_path: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    common = dict(max_steps=6, schedule_steps=6, eval_every=3)
    full = train(_run(tmp_path / "full", corpus_file, **common), log=None)
    train(_run(tmp_path / "split", corpus_file, **{**common, "max_steps": 3}), log=None)

    def no_training(*args, **kwargs):
        raise AssertionError("a resumed run must not train its tokenizer again")

    monkeypatch.setattr(subword, "train_bpe", no_training)
    monkeypatch.setattr(subword, "_BPE_CACHE", {})
    logs: list[str] = []
    second = train(_run(tmp_path / "split", corpus_file, **{**common, "resume": True}), log=logs.append)
    assert any("tokenizer bpe:400 (the checkpoint's tokenizer.json, 400 tokens)" in line for line in logs)
    assert second["val"] == full["val"] and second["test"] == full["test"]
    a = hierseq.load(tmp_path / "full" / "final").state_dict()
    b = hierseq.load(tmp_path / "split" / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_with_another_tokenizer_is_one_line_and_changes_nothing(tmp_path: Path, corpus_file: Path) -> None:
    train(_run(tmp_path, corpus_file, max_steps=2), log=None)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for other in ("bpe:500", "bytes"):
        with pytest.raises(ValueError) as info:
            train(_run(tmp_path, corpus_file, max_steps=3, tokenizer=other, resume=True), log=None)
        assert str(info.value).startswith(f"resume: tokenizer={other!r} differs from the checkpoint's 'bpe:400' in ")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_byte_checkpoint_without_the_field_resumes_as_bytes(tmp_path: Path, corpus_file: Path) -> None:
    # Checkpoints written before tokenizers were a setting have no "tokenizer" in their train_config.
    train(_run(tmp_path, corpus_file, max_steps=2, tokenizer="bytes"), log=None)
    state_json = tmp_path / "checkpoint" / "trainer_state.json"
    payload = json.loads(state_json.read_text())
    del payload["state"]["train_config"]["tokenizer"]
    state_json.write_text(json.dumps(payload))
    assert train(_run(tmp_path, corpus_file, max_steps=3, tokenizer="bytes", resume=True), log=None)["step"] == 3
    with pytest.raises(ValueError, match=r"^resume: tokenizer='bpe:400' differs from the checkpoint's 'bytes'"):
        train(_run(tmp_path, corpus_file, max_steps=4, resume=True), log=None)


def test_a_resume_whose_checkpoint_lost_its_tokenizer_is_one_line(tmp_path: Path, corpus_file: Path) -> None:
    train(_run(tmp_path, corpus_file, max_steps=2), log=None)
    (tmp_path / "checkpoint" / TOKENIZER_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"^resume: the checkpoint '.*checkpoint' holds no tokenizer.json"):
        train(_run(tmp_path, corpus_file, max_steps=3, resume=True), log=None)


def test_an_hf_tokenizer_file_is_copied_into_the_run(tmp_path: Path, corpus_file: Path, bpe) -> None:
    source = tmp_path / "mine" / TOKENIZER_FILE
    source.parent.mkdir()
    source.write_text(bpe.to_json())
    cfg = _run(tmp_path / "run", corpus_file, max_steps=2, tokenizer=f"hf:{source.parent}")
    assert cfg.tokenizer == f"hf:{source.parent.resolve()}"
    train(cfg, log=None)
    shutil.rmtree(source.parent)  # the run keeps its own copy: eval and resume need nothing else
    assert tokenizer_of(hierseq.load(tmp_path / "run" / "final")).to_json() == bpe.to_json()
    assert train(cfg.replace(max_steps=3, resume=True), log=None)["step"] == 3


def test_vocab_size_comes_from_the_tokenizer_and_a_mismatch_is_one_line(tmp_path: Path, corpus_file: Path) -> None:
    model_config = {"d_model": 32, "n_layers": 1, "n_heads": 2}
    with pytest.raises(ValueError) as info:
        train(_run(tmp_path, corpus_file, model_config={**model_config, "vocab_size": 512}), log=None)
    assert str(info.value) == (
        "model_config.vocab_size=512: the tokenizer 'bpe:400' has 400 tokens; leave vocab_size out (the tokenizer "
        "sets it) or make it equal"
    )
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []
    result = train(_run(tmp_path, corpus_file, max_steps=2, model_config={**model_config, "vocab_size": 400}), log=None)
    assert result["step"] == 2 and load_trainer_state(tmp_path / "checkpoint")["step"] == 2


def test_a_split_too_short_in_tokens_is_one_line(tmp_path: Path, corpus_file: Path) -> None:
    # 48 KB split by position: val is 2.4 KB of bytes, about 700 BPE tokens: enough bytes, too few tokens.
    with pytest.raises(
        ValueError, match=r"the val split is \d+ tokens under tokenizer='bpe:400' \(2400 bytes\), needs"
    ):
        train(_run(tmp_path, corpus_file, seq_len=1500), log=None)


def test_only_the_lm_task_takes_a_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^tokenizer='bpe:300': is an lm task field; the mqar task has none$"):
        TrainConfig(task="mqar", tokenizer="bpe:300", model_config={"vocab_size": 32}, out_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"^tokenizer='words': must be 'bytes', 'bpe:<vocab_size>'"):
        TrainConfig(tokenizer="words", out_dir=str(tmp_path))


def test_a_run_on_an_hf_jsonl_file_with_bpe(tmp_path: Path, corpus_file: Path) -> None:
    paragraphs = [p for p in corpus_file.read_text().split("\n\n") if p.strip()]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    result = train(_run(tmp_path / "run", corpus_file, data=f"hf:{data}", max_steps=2), log=None)
    assert result["step"] == 2 and math.isfinite(result["val_bpb"])
    assert f"data: hf:{data.resolve()}" in (tmp_path / "run" / "train_config.yaml").read_text()
