"""``hierseq bench lm`` plumbing at a tiny size (the benchmark itself is not a test): on subwords every model
gets the one tokenizer and its vocab_size, the report's bits per byte are the saved models' own, and tokens
per byte are reported; on bytes the configs and the table are what they were."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import hierseq
from hierseq.bench import lm
from hierseq.bench.lm import LMBenchSize
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
    assert "val bits/byte | test bits/byte | test tokens/byte | train tokens/s" in header
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
