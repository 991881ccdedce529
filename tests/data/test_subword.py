"""Subword tokenizers: spec checking, a deterministic byte-level BPE with exact Unicode round trips, per-token
byte counts that add up to the text's UTF-8 bytes, existing tokenizers from a file, a folder or the hub
(offline: one line), saving with a model, and the errors of each."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import hierseq
from hierseq.data import subword
from hierseq.data.corpora import load_corpus
from hierseq.data.subword import SubwordTokenizer, load_hf_tokenizer, split_text, train_bpe
from hierseq.data.tokenizer import (
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    ByteTokenizer,
    attach_tokenizer,
    build_tokenizer,
    check_tokenizer_spec,
    tokenize_split,
    tokenizer_of,
)

#: Unicode a tokenizer must carry through exactly: accents (precomposed and combining), emoji with skin
#: tone and ZWJ sequences, flags, CJK, right-to-left scripts, a lone combining mark, tabs and CRLF.
UNICODE = (
    "naïve café, e\u0301 and a\u0308\u0301 (combining marks), \u0301 alone\n"
    "👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇯🇵 — “quoted” «guillemets»\r\n"
    "日本語のテキスト、中文，한국어 · עברית · العربية\tend 🙂"
)


@pytest.fixture(scope="module")
def austen() -> str:
    """About 40 KB of the embedded training text: enough for a 512-token BPE, trained in well under a second."""
    return bytes(load_corpus(None).train[:40_000].numpy()).decode("utf-8")


@pytest.fixture(scope="module")
def bpe(austen: str) -> SubwordTokenizer:
    return train_bpe(austen, 512)


# ------------------------------------------------------------------------------------------ specs
@pytest.mark.parametrize(
    "spec, canonical",
    [("bytes", "bytes"), ("bpe:300", "bpe:300"), ("bpe:0512", "bpe:512"), ("hf:gpt2", "hf:gpt2"), ("hf:o/n", "hf:o/n")],
)
def test_specs_are_checked_and_made_canonical(spec: str, canonical: str) -> None:
    assert check_tokenizer_spec(spec) == canonical


def test_a_local_hf_path_is_recorded_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tok.json").write_text("{}")
    assert check_tokenizer_spec("hf:tok.json") == f"hf:{tmp_path.resolve() / 'tok.json'}"
    assert check_tokenizer_spec("hf:./missing/tokenizer.json") == f"hf:{tmp_path.resolve() / 'missing/tokenizer.json'}"


@pytest.mark.parametrize(
    "spec, rule",
    [
        ("words", "must be 'bytes', 'bpe:<vocab_size>'"),
        ("", "must be 'bytes'"),
        (None, "must be 'bytes'"),
        ("bpe:", "needs an integer vocab_size >= 257"),
        ("bpe:4k", "needs an integer vocab_size >= 257"),
        ("bpe:256", "needs an integer vocab_size >= 257"),
        ("bpe:-300", "needs an integer vocab_size >= 257"),
        ("hf:", "must be 'bytes'"),
        ("hf:not a name!", "neither an existing path nor a Hugging Face hub name"),
    ],
)
def test_bad_specs_fail_in_one_line(spec, rule: str) -> None:
    with pytest.raises(ValueError) as info:
        check_tokenizer_spec(spec)
    message = str(info.value)
    assert message.startswith(f"tokenizer={spec!r}: ") and rule in message and "\n" not in message


# ------------------------------------------------------------------------------------------ BPE
def test_bpe_has_exactly_the_vocab_asked_for_and_is_deterministic(austen: str, bpe: SubwordTokenizer) -> None:
    assert bpe.vocab_size == 512 and bpe.spec == "bpe:512"
    again = train_bpe(austen, 512)
    assert again.to_json() == bpe.to_json()  # the same file, byte for byte
    assert train_bpe(austen, 400).to_json() != bpe.to_json()
    ids = bpe.encode(austen[:2000])
    assert ids.dtype == torch.long and torch.equal(ids, again.encode(austen[:2000]))
    assert len(ids) < 0.6 * len(austen[:2000].encode())  # it learned merges: fewer tokens than bytes


@pytest.mark.parametrize("text", [UNICODE, "", " ", "\n\n\n", "a", "🙂", "e\u0301" * 40, "\x00\x7f\U0010ffff"])
def test_bpe_round_trips_unicode_exactly(bpe: SubwordTokenizer, text: str) -> None:
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert bpe.decode(ids.tolist()) == text
    ids32, counts = bpe.encode_with_bytes(text)
    assert ids32.dtype == torch.int32 and counts.dtype == torch.int32 and len(counts) == len(ids32)
    assert torch.equal(ids32.long(), ids)
    assert int(counts.sum()) == len(text.encode("utf-8"))  # every byte of the text belongs to one token
    assert bool((counts >= 0).all())


def test_byte_counts_follow_the_text(bpe: SubwordTokenizer) -> None:
    # Each token's count is the length of the bytes it decodes to, when no character is split across tokens.
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    ids, counts = bpe.encode_with_bytes(text)
    assert counts.tolist() == [len(bpe.decode([i]).encode("utf-8")) for i in ids.tolist()]
    # A character split over two tokens goes to the first: the total still holds.
    ids, counts = bpe.encode_with_bytes("🏳️‍🌈")
    assert len(ids) > 1 and int(counts.sum()) == len("🏳️‍🌈".encode())


def test_a_long_text_is_encoded_in_pieces_cut_at_line_ends(bpe: SubwordTokenizer, monkeypatch) -> None:
    text = "".join(f"line {i}: {UNICODE}\n" for i in range(40))
    pieces = split_text(text, 500)
    assert len(pieces) > 5 and "".join(pieces) == text and all(p.endswith("\n") for p in pieces[:-1])
    assert all(len(p) <= 500 for p in pieces) and split_text("") == [] and split_text("x" * 7, 3) == ["xxx", "xxx", "x"]
    expected = [bpe.encode_with_bytes(piece) for piece in pieces]
    monkeypatch.setattr(subword, "CHUNK_CHARS", 500)
    ids, counts = bpe.encode_with_bytes(text)  # in pieces now: each piece encoded on its own, then joined
    assert torch.equal(ids, torch.cat([i for i, _ in expected]))
    assert torch.equal(counts, torch.cat([c for _, c in expected]))
    assert bpe.decode(ids) == text and int(counts.sum()) == len(text.encode())


def test_a_vocab_larger_than_the_text_allows_fails_in_one_line() -> None:
    with pytest.raises(ValueError) as info:
        train_bpe("abcabc abcabc " * 50, 4096)
    message = str(info.value)
    assert message.startswith("tokenizer='bpe:4096': the training split (700 bytes) allows only ")
    assert "use bpe:" in message and "\n" not in message


def test_bpe_is_trained_on_the_training_split_only_and_remembered(monkeypatch) -> None:
    corpus = load_corpus(None)
    train = corpus.train[:30_000]
    calls = []
    real = subword.train_bpe
    monkeypatch.setattr(subword, "train_bpe", lambda text, *a: calls.append(text) or real(text, *a))
    monkeypatch.setattr(subword, "_BPE_CACHE", {})
    first = build_tokenizer("bpe:400", train)
    second = build_tokenizer("bpe:400", bytes(train.numpy()))
    assert calls == [bytes(train.numpy()).decode()]  # trained once, on exactly these bytes
    assert first is not second and first.to_json() == second.to_json()
    build_tokenizer("bpe:400", corpus.train[:20_000])
    assert len(calls) == 2  # other text, another training


# ------------------------------------------------------------------------------------------ tokenized splits
def test_tokenize_split_keeps_bytes_untouched_and_counts_subword_bytes(bpe: SubwordTokenizer) -> None:
    data = torch.frombuffer(bytearray(UNICODE.encode()), dtype=torch.uint8)
    as_bytes = tokenize_split(data, ByteTokenizer())
    assert as_bytes.ids is data and as_bytes.byte_counts is None and as_bytes.n_bytes == len(data)
    assert as_bytes.tokens_per_byte == 1.0
    split = tokenize_split(data, bpe)
    assert split.n_bytes == len(data) and int(split.byte_counts.sum()) == len(data)
    assert bpe.decode(split.ids) == UNICODE and split.tokens_per_byte == len(split.ids) / len(data)


def test_invalid_utf8_is_replaced_and_its_replacement_counted(bpe: SubwordTokenizer) -> None:
    data = torch.tensor(list(b"ab\xff\xfecd"), dtype=torch.uint8)
    split = tokenize_split(data, bpe)
    assert bpe.decode(split.ids) == "ab\ufffd\ufffdcd" and split.n_bytes == len("ab\ufffd\ufffdcd".encode())


# ------------------------------------------------------------------------------------------ streaming decode
def test_stream_decoder_prints_exactly_the_text(bpe: SubwordTokenizer) -> None:
    prompt, rest = "Emma said", " “yes” 👨‍👩‍👧 e\u0301 — fine"
    decode = bpe.stream_decoder(bpe.encode(prompt).tolist())
    pieces = [decode(i) for i in bpe.encode(rest).tolist()]
    assert "".join(pieces) == rest and "\ufffd" not in "".join(pieces)
    byte_decode = ByteTokenizer().stream_decoder()
    assert "".join(byte_decode(b) for b in rest.encode()) == rest


# ------------------------------------------------------------------------------------------ existing tokenizers
def test_hf_tokenizer_from_a_file_or_a_folder(tmp_path: Path, bpe: SubwordTokenizer) -> None:
    (tmp_path / TOKENIZER_FILE).write_text(bpe.to_json())
    for source in (tmp_path / TOKENIZER_FILE, tmp_path):
        spec = check_tokenizer_spec(f"hf:{source}")
        tok = build_tokenizer(spec, b"")
        assert (
            tok.vocab_size == 512 and tok.spec == spec and tok.encode(UNICODE).tolist() == bpe.encode(UNICODE).tolist()
        )


def test_hf_tokenizer_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    cases = [
        (f"hf:{tmp_path / 'missing.json'}", FileNotFoundError, "no such file or directory"),
        (f"hf:{tmp_path / 'empty'}", FileNotFoundError, "the folder holds no tokenizer.json"),
        (f"hf:{tmp_path / 'bad.json'}", ValueError, "is not a readable tokenizer file"),
    ]
    for spec, error, rule in cases:
        with pytest.raises(error) as info:
            load_hf_tokenizer(spec)
        assert rule in str(info.value) and "\n" not in str(info.value), spec


def test_a_hub_name_while_offline_fails_in_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: nothing to fall back on
    with pytest.raises(ValueError) as info:
        build_tokenizer("hf:gpt2", b"")
    message = str(info.value)
    assert (
        message.startswith("tokenizer='hf:gpt2': is a Hugging Face hub name, the hub is offline")
        and "\n" not in message
    )


def test_missing_tokenizers_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match=r"^tokenizer='bpe:300': .*pip install 'hierseq\[hf\]'$"):
        train_bpe("some text", 300)


# ------------------------------------------------------------------------------------------ travels with the model
def _model(vocab_size: int) -> torch.nn.Module:
    return hierseq.build_model("transformer", vocab_size=vocab_size, d_model=16, n_layers=1, n_heads=2)


def test_a_saved_model_carries_its_tokenizer(tmp_path: Path, bpe: SubwordTokenizer) -> None:
    model = _model(512)
    assert isinstance(tokenizer_of(model), ByteTokenizer)  # a model without one reads bytes
    attach_tokenizer(model, bpe)
    hierseq.save(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / TOKENIZER_CONFIG_FILE).read_text())
    assert config["hierseq_tokenizer"] == "bpe:512" and config["tokenizer_class"] == "PreTrainedTokenizerFast"
    loaded = tokenizer_of(hierseq.load(tmp_path / "m"))
    assert loaded.spec == "bpe:512" and loaded.to_json() == bpe.to_json()
    # Saved again from the loaded model (the tokenizer came back with it), and over with a byte model.
    hierseq.save(hierseq.load(tmp_path / "m"), tmp_path / "copy")
    assert (tmp_path / "copy" / TOKENIZER_FILE).read_text() == bpe.to_json()
    hierseq.save(_model(256), tmp_path / "copy")
    assert (
        not (tmp_path / "copy" / TOKENIZER_FILE).exists() and not (tmp_path / "copy" / TOKENIZER_CONFIG_FILE).exists()
    )
    assert isinstance(tokenizer_of(hierseq.load(tmp_path / "copy")), ByteTokenizer)


def test_a_users_own_tokenizer_files_are_never_removed(tmp_path: Path, bpe: SubwordTokenizer) -> None:
    (tmp_path / TOKENIZER_FILE).write_text(bpe.to_json())
    (tmp_path / TOKENIZER_CONFIG_FILE).write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    hierseq.save(_model(512), tmp_path)  # no tokenizer attached: the folder's own files stay, and are read
    assert (tmp_path / TOKENIZER_FILE).read_text() == bpe.to_json()
    assert tokenizer_of(hierseq.load(tmp_path)).vocab_size == 512


def test_a_vocab_size_mismatch_is_one_line(tmp_path: Path, bpe: SubwordTokenizer) -> None:
    with pytest.raises(ValueError, match=r"^vocab_size=256: the tokenizer 'bpe:512' has 512 tokens: they must match$"):
        attach_tokenizer(_model(256), bpe)
    hierseq.save(_model(300), tmp_path)
    (tmp_path / TOKENIZER_FILE).write_text(bpe.to_json())
    with pytest.raises(
        ValueError, match=r"^tokenizer.json: has 512 tokens, the model's vocab_size in config.json is 300"
    ):
        hierseq.load(tmp_path)
