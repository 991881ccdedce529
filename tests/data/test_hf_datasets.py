"""``--data hf:<dataset>[:<config>][@<split>]``: the real ``datasets`` loading code, run offline on small local
parquet / jsonl / text files written here, plus the spec's parsing and its one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hierseq.data import hf_datasets
from hierseq.data.corpora import canonical_data, check_data, data_exists, load_corpus, split_by_position
from hierseq.data.hf_datasets import HFData, parse_hf_data

DOCS = [f"Document {i}: naïve café 👍🏽, e\u0301 — {'words ' * (i % 7)}" for i in range(60)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, **columns: list) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def joined(rows: list[str]) -> bytes:
    return "".join(r if r.endswith("\n") else r + "\n" for r in rows).encode()


# ------------------------------------------------------------------------------------------ parsing
def test_hub_specs_parse_into_dataset_config_and_split() -> None:
    assert parse_hf_data("hf:wikitext") == HFData("wikitext", None, None, None)
    assert parse_hf_data("hf:wikitext:wikitext-103-raw-v1") == HFData("wikitext", "wikitext-103-raw-v1", None, None)
    assert parse_hf_data("hf:owner/name:cfg@validation") == HFData("owner/name", "cfg", "validation", None)
    assert parse_hf_data("hf:owner/name@train[:10%]").split == "train[:10%]"
    assert parse_hf_data("hf:owner/name:cfg@test").spec() == "hf:owner/name:cfg@test"


def test_local_specs_are_recorded_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    absolute = f"hf:{tmp_path.resolve() / 'a.jsonl'}"
    assert parse_hf_data("hf:a.jsonl").local == tmp_path.resolve() / "a.jsonl"
    assert canonical_data("hf:a.jsonl") == absolute == canonical_data("hf:./a.jsonl") == check_data("hf:a.jsonl")
    assert canonical_data("hf:a.jsonl@train") == absolute + "@train"
    assert data_exists(absolute) and data_exists("hf:wikitext") and not data_exists(f"hf:{tmp_path}/gone.jsonl")
    # A path with ':' or '@' in its name is read whole when it exists.
    odd = write_jsonl(tmp_path / "v1:final@2.jsonl", [{"text": "x"}])
    assert parse_hf_data(f"hf:{odd}").local == odd.resolve()


@pytest.mark.parametrize(
    "spec, error, rule",
    [
        ("hf:", ValueError, "needs a dataset name or a local path"),
        ("hf:wikitext@", ValueError, "a split after '@'"),
        ("hf:wikitext:", ValueError, "a config after ':'"),
        ("hf:/no/such/file.parquet", FileNotFoundError, "no such file or directory"),
        ("hf:missing.jsonl", FileNotFoundError, "no such file or directory"),
        ("hf:not a name", ValueError, "neither an existing file or folder nor a Hugging Face dataset name"),
    ],
)
def test_bad_specs_fail_in_one_line(spec: str, error: type, rule: str) -> None:
    with pytest.raises(error) as info:
        parse_hf_data(spec)
    assert str(info.value).startswith(f"data={spec!r}: ") and rule in str(info.value) and "\n" not in str(info.value)


def test_a_local_file_takes_no_config(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    with pytest.raises(ValueError, match="a local file or folder has no configs"):
        parse_hf_data(f"hf:{path}:cfg")


# ------------------------------------------------------------------------------------------ local files, for real
def test_a_jsonl_file_is_read_through_datasets_and_cut_by_position(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", [{"id": i, "text": d} for i, d in enumerate(DOCS)])
    corpus = load_corpus(f"hf:{path}")
    train, val, test = split_by_position(joined(DOCS))
    assert bytes(corpus.train.numpy()) == train and bytes(corpus.val.numpy()) == val
    assert bytes(corpus.test.numpy()) == test
    assert corpus.name == f"hf:{path}"
    assert (
        "streamed" in corpus.description
        and "column 'text'" in corpus.description
        and "rows train=60" in corpus.description
    )


def test_a_parquet_file_with_one_string_column(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "docs.parquet", n=list(range(len(DOCS))), body=DOCS)
    corpus = load_corpus(f"hf:{path}")
    assert bytes(corpus.train.numpy()) + bytes(corpus.val.numpy()) + bytes(corpus.test.numpy()) == joined(DOCS)
    assert "column 'body'" in corpus.description


def test_a_text_file_is_its_lines(tmp_path: Path) -> None:
    text = "".join(f"{d}\n" for d in DOCS)
    path = tmp_path / "docs.txt"
    path.write_text(text)
    corpus = load_corpus(f"hf:{path}")
    assert bytes(corpus.train.numpy()) + bytes(corpus.val.numpy()) + bytes(corpus.test.numpy()) == text.encode()


def test_a_folder_with_train_validation_and_test_keeps_its_splits(tmp_path: Path) -> None:
    parts = {"train": DOCS[:40], "validation": DOCS[40:50], "test": DOCS[50:]}
    for split, rows in parts.items():
        write_jsonl(tmp_path / f"{split}.jsonl", [{"text": r} for r in rows])
    corpus = load_corpus(f"hf:{tmp_path}")
    assert bytes(corpus.train.numpy()) == joined(parts["train"]) and bytes(corpus.val.numpy()) == joined(
        parts["validation"]
    )
    assert bytes(corpus.test.numpy()) == joined(parts["test"])
    assert "its splits train / validation / test" in corpus.description
    one = load_corpus(f"hf:{tmp_path}@validation")  # one split, cut by position
    assert bytes(one.train.numpy()) == split_by_position(joined(parts["validation"]))[0]


def test_rows_that_end_in_a_newline_get_no_second_one(tmp_path: Path) -> None:
    rows = [" = Title = \n", "", " A line of text .\n", "no newline"]
    corpus = load_corpus(f"hf:{write_parquet(tmp_path / 'w.parquet', text=rows * 20)}")
    whole = bytes(corpus.train.numpy()) + bytes(corpus.val.numpy()) + bytes(corpus.test.numpy())
    assert whole == (" = Title = \n\n A line of text .\nno newline\n" * 20).encode()


@pytest.mark.parametrize(
    "write, rule",
    [
        (lambda d: write_parquet(d / "a.parquet", a=["x"], b=["y"]), "has no 'text' column and 2 text columns"),
        (lambda d: write_parquet(d / "a.parquet", n=[1, 2]), "has no 'text' column and 0 text columns"),
        (
            lambda d: write_jsonl(d / "a.jsonl", [{"text": "ok"}, {"text": None}]),
            "row 1 of the train split: 'text' is None",
        ),
        (lambda d: write_jsonl(d / "a.jsonl", []), "the file is empty"),
        (lambda d: (d / "a.jsonl").write_text("\n\n") and d / "a.jsonl", "the train split has no rows"),
        (lambda d: write_parquet(d / "a.parquet", text=pa.array([], pa.string())), "reading the train split failed"),
        (lambda d: (d / "a.csv").write_text("text\n" + "x\n" * 40) and d / "a.csv", None),
    ],
)
def test_unusable_tables_fail_in_one_line(tmp_path: Path, write, rule: str | None) -> None:
    spec = f"hf:{write(tmp_path)}"
    if rule is None:  # the csv builder works too
        assert bytes(load_corpus(spec).train.numpy()) == split_by_position(b"x\n" * 40)[0]
        return
    with pytest.raises(ValueError) as info:
        load_corpus(spec)
    assert str(info.value).startswith(f"data={spec!r}: ") and rule in str(info.value) and "\n" not in str(info.value)


def test_a_split_the_dataset_lacks_and_a_broken_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    with pytest.raises(ValueError, match=r"datasets could not open it: ValueError: Bad split: nope") as info:
        load_corpus(f"hf:{path}@nope")
    assert "\n" not in str(info.value)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"^data='hf:.*broken.jsonl': reading the train split failed: "):
        load_corpus(f"hf:{broken}")
    with pytest.raises(ValueError, match=r"a local file is read by its suffix"):
        load_corpus(f"hf:{write_jsonl(tmp_path / 'a.xml', [])}")


def test_small_splits_are_refused_like_any_corpus(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "tiny"}])
    with pytest.raises(ValueError, match=r"the train split has 4 bytes, needs at least 65 \(one window"):
        load_corpus(f"hf:{path}", min_split_len=65)


# ------------------------------------------------------------------------------------------ the hub, without a network
def test_a_hub_dataset_is_streamed_with_its_config_and_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    splits = {"train": [{"text": d} for d in DOCS[:30]], "validation": [{"text": "v"}] * 8, "test": [{"text": "t"}] * 8}

    def load_dataset(**kwargs):
        calls.append(kwargs)
        return splits

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    corpus = load_corpus("hf:wikitext:wikitext-103-raw-v1")
    assert calls == [{"path": "wikitext", "name": "wikitext-103-raw-v1", "split": None, "streaming": True}]
    assert bytes(corpus.val.numpy()) == b"v\n" * 8 and bytes(corpus.train.numpy()) == joined(DOCS[:30])
    assert "(hub, config 'wikitext-103-raw-v1', streamed)" in corpus.description


def test_a_hub_dataset_while_offline_fails_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", lambda **kw: pytest.fail("the hub must not be asked"))
    with pytest.raises(ValueError) as info:
        load_corpus("hf:wikitext:wikitext-103-raw-v1@train")
    message = str(info.value)
    assert message.startswith(
        "data='hf:wikitext:wikitext-103-raw-v1@train': is a Hugging Face hub dataset and the hub is offline"
    )
    assert "\n" not in message


def test_hub_errors_from_datasets_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(**kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ValueError) as info:
        load_corpus("hf:wikitext")
    assert str(info.value) == (
        "data='hf:wikitext': datasets could not open it: ConnectionError: Couldn't reach 'wikitext' on the Hub "
        "(LocalEntryNotFoundError)"
    )


def test_missing_datasets_package_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    monkeypatch.setitem(sys.modules, "datasets", None)
    extra = r"needs the optional 'data' extra: pip install 'hierseq\[data\]'$"
    with pytest.raises(ImportError, match=r"^data='hf:.*a.jsonl': reading Hugging Face datasets " + extra):
        hf_datasets.load_hf_text(f"hf:{path}")
