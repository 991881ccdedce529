"""Corpora: the embedded Austen split by novel, user files and folders, and their error messages."""

import gzip

import pytest
import torch

from hierseq.data import SPLIT, load_corpus
from hierseq.data.corpora import CORPORA_DIR, SEPARATOR

NOVEL_BYTES = {  # uncompressed UTF-8 sizes of the shipped files
    "emma": 883027,
    "mansfieldpark": 883279,  # one 2-byte character
    "northangerabbey": 433410,
    "persuasion": 466853,
    "prideprejudice": 684767,
    "sensesensibility": 673687,
}


def _novel(name: str) -> bytes:
    with gzip.open(CORPORA_DIR / f"{name}.txt.gz", "rb") as f:
        return f.read()


def test_embedded_split_sizes_and_by_novel():
    corpus = load_corpus()
    assert corpus.name == "austen"
    assert sorted(sum(SPLIT.values(), [])) == sorted(NOVEL_BYTES)
    for split, names in SPLIT.items():
        expected = sum(NOVEL_BYTES[n] for n in names) + len(SEPARATOR) * (len(names) - 1)
        assert len(corpus.split(split)) == expected
    assert corpus.sizes() == {"train": 3124766, "val": 433410, "test": 466853}
    assert corpus.train.dtype == torch.uint8
    # The split is by novel: val is exactly Northanger Abbey, test exactly Persuasion, and train starts
    # with Emma and ends with Sense and Sensibility.
    assert bytes(corpus.val.tolist()) == _novel("northangerabbey")
    assert bytes(corpus.test.tolist()) == _novel("persuasion")
    assert bytes(corpus.train[:4].tolist()) == b"EMMA"
    assert bytes(corpus.train[-NOVEL_BYTES["sensesensibility"] :].tolist()) == _novel("sensesensibility")
    assert "northangerabbey" in corpus.description


def test_embedded_is_cached():
    assert load_corpus() is load_corpus()


def test_single_file_position_split(tmp_path):
    data = bytes(range(256)) * 4  # 1024 bytes
    path = tmp_path / "book.txt"
    path.write_bytes(data)
    corpus = load_corpus(str(path))
    assert corpus.sizes() == {"train": 921, "val": 51, "test": 52}
    joined = torch.cat([corpus.train, corpus.val, corpus.test])
    assert bytes(joined.tolist()) == data  # contiguous, nothing lost
    assert "90/5/5" in corpus.description


def test_folder_split_by_file(tmp_path):
    for i, name in enumerate(["a.txt", "b.md", "sub/c.text", "d.txt"]):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(f"document {i} " * 10)
    (tmp_path / "ignored.bin").write_bytes(b"\x00" * 100)
    corpus = load_corpus(tmp_path)
    # sorted: a.txt, b.md, d.txt, sub/c.text -> train a, b; val d; test sub/c
    assert bytes(corpus.train.tolist()) == ("document 0 " * 10).encode() + SEPARATOR + ("document 1 " * 10).encode()
    assert bytes(corpus.val.tolist()) == ("document 3 " * 10).encode()
    assert bytes(corpus.test.tolist()) == ("document 2 " * 10).encode()
    assert "val=['d.txt']" in corpus.description and "test=['sub/c.text']" in corpus.description


def test_folder_with_two_files_splits_by_position(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"x" * 500)
    (tmp_path / "b.txt").write_bytes(b"y" * 500)
    corpus = load_corpus(tmp_path)
    assert sum(corpus.sizes().values()) == 1000 + len(SEPARATOR)
    assert "by position" in corpus.description


def test_missing_path_error(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=r"data=.*nope\.txt.*: no such file or directory"):
        load_corpus(missing)


def test_folder_without_text_files_error(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match=r"no text files.*\.txt"):
        load_corpus(tmp_path)


def test_split_too_short_error(tmp_path):
    path = tmp_path / "short.txt"
    path.write_bytes(b"a" * 100)  # val gets 5 bytes
    with pytest.raises(ValueError, match=r"short\.txt.*val split has 5 bytes, needs at least 33"):
        load_corpus(path, min_split_len=33)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(empty)
