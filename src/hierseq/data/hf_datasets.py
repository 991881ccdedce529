"""Text corpora through HF ``datasets`` (the optional ``data`` extra): ``--data hf:<dataset>[:<config>][@<split>]``.

``<dataset>`` is a hub dataset (``wikitext``, ``owner/name``; ``<config>`` picks one of its configurations,
e.g. ``hf:wikitext:wikitext-103-raw-v1``) or a local file or folder: a file is read by the ``datasets``
builder its suffix names (:data:`BUILDERS`: ``.parquet``, ``.json`` / ``.jsonl``, ``.txt``, ``.csv``), a folder
by ``datasets``' own inference from the files in it (``train.jsonl`` / ``validation.jsonl`` / ``test.jsonl``
give three splits). Everything is read with ``streaming=True``: rows arrive as they are read, and no Arrow
copy of the dataset is written to the cache.

Splits: with ``@<split>``, that split alone, cut by position 90/5/5 like a text file. Without, the dataset's
own train / validation / test when it has all three (``valid`` and ``dev`` count as validation), otherwise its
train split (or its only one) cut by position. Text: the ``text`` column, else the only string column; rows
are joined with a newline (none is added after a row that already ends with one).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import config_error, import_extra
from .hub import HUB_NAME, hub_offline, written_as_path

PREFIX = "hf:"
#: The ``datasets`` builder that reads a local file, by suffix.
BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".txt": "text", ".csv": "csv"}
VALIDATION_SPLITS = ("validation", "valid", "dev")


def is_hf_data(data: Any) -> bool:
    """Whether ``data`` is an ``hf:`` spec (rather than a text file or folder)."""
    return isinstance(data, str) and data.startswith(PREFIX)


@dataclass(frozen=True)
class HFData:
    """A parsed spec. local: the file or folder it reads (None: a hub dataset)."""

    dataset: str
    config: str | None
    split: str | None
    local: Path | None

    def spec(self) -> str:
        """The canonical spec: a local path absolute, so a run's record holds whatever the working directory."""
        name = str(self.local) if self.local is not None else self.dataset
        return PREFIX + name + (f":{self.config}" if self.config else "") + (f"@{self.split}" if self.split else "")


def parse_hf_data(spec: str, name: str = "data") -> HFData:
    """``hf:<dataset>[:<config>][@<split>]`` parsed; a local path must exist (one-line errors naming ``name``).

    A path that exists as written (even with ``:`` or ``@`` in it) is read whole."""
    rest = spec[len(PREFIX) :]
    if not rest:
        raise config_error(name, spec, "hf:<dataset>[:<config>][@<split>] needs a dataset name or a local path")
    if _exists(rest):
        return HFData(rest, None, None, _local(rest))
    dataset, split = rest, None
    if "@" in rest:
        dataset, _, split = rest.rpartition("@")
        if not split or not dataset:
            raise config_error(
                name, spec, "hf:<dataset>[:<config>][@<split>]: a split after '@' and a dataset before it"
            )
    config = None
    if not _exists(dataset) and ":" in dataset:
        dataset, _, config = dataset.partition(":")
        if not config or not dataset:
            raise config_error(
                name, spec, "hf:<dataset>[:<config>][@<split>]: a config after ':' and a dataset before it"
            )
    if _exists(dataset):
        if config:
            raise config_error(name, spec, "a local file or folder has no configs (hf:<path>[@<split>])")
        return HFData(dataset, None, split, _local(dataset))
    if written_as_path(dataset, BUILDERS):
        raise FileNotFoundError(f"{name}={spec!r}: no such file or directory")
    if not HUB_NAME.match(dataset):
        raise config_error(name, spec, "is neither an existing file or folder nor a Hugging Face dataset name")
    return HFData(dataset, config, split, None)


def canonical_hf_data(spec: str) -> str:
    """The spec as a run records it (see :meth:`HFData.spec`); a missing local path stays as written, so the
    error comes where the data is read."""
    try:
        return parse_hf_data(spec).spec()
    except (ValueError, FileNotFoundError):
        return spec


def _exists(path: str) -> bool:
    return Path(path).expanduser().exists()


def _local(path: str) -> Path:
    return Path(path).expanduser().resolve()


# ---------------------------------------------------------------------------------------------- loading
def import_datasets(spec: str) -> Any:
    """The ``datasets`` module, or a one-line error naming the extra that brings it."""
    return import_extra("datasets", "data", f"data={spec!r}: reading Hugging Face datasets")


def load_hf_text(spec: str) -> tuple[dict[str, bytes], str]:
    """The UTF-8 text of the ``train`` / ``val`` / ``test`` splits an ``hf:`` spec names (``train`` alone when it
    is to be cut by position) and a description of what was read (which splits, column, rows)."""
    parsed = parse_hf_data(spec)
    datasets = import_datasets(spec)
    if parsed.local is None and hub_offline():
        # Streaming reads the hub as it goes: with the hub switched off there is nothing it could read.
        raise config_error(
            "data",
            spec,
            "is a Hugging Face hub dataset and the hub is offline (HF_HUB_OFFLINE is set); streaming needs the "
            "network: pass a local file or folder (hf:<path>)",
        )
    with _quiet(datasets):
        return _read_splits(datasets, parsed, spec)


@contextlib.contextmanager
def _quiet(datasets: Any) -> Iterator[None]:
    """No log lines or progress bars of ``datasets`` while it reads: whatever fails is reported once, in the
    one-line error that names the spec."""
    logging = datasets.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity(logging.CRITICAL + 10)
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _read_splits(datasets: Any, parsed: HFData, spec: str) -> tuple[dict[str, bytes], str]:
    loaded = _load(datasets, parsed, spec)
    if parsed.split is not None:
        chosen, note = {"train": loaded}, f"split {parsed.split!r} cut by position 90/5/5"
    else:
        names = list(loaded.keys())
        val = next((s for s in VALIDATION_SPLITS if s in names), None)
        if "train" in names and val is not None and "test" in names:
            chosen, note = (
                {"train": loaded["train"], "val": loaded[val], "test": loaded["test"]},
                (f"its splits train / {val} / test"),
            )
        elif "train" in names or len(names) == 1:
            first = "train" if "train" in names else names[0]
            chosen, note = {"train": loaded[first]}, f"split {first!r} cut by position 90/5/5 (splits: {names})"
        else:
            raise config_error("data", spec, f"has splits {names} and none is 'train': name one with @<split>")
    texts, columns, rows = {}, set(), {}
    for split, dataset in chosen.items():
        texts[split], column, rows[split] = _read_text(dataset, spec, split)
        columns.add(column)
    where = f"local {'folder' if parsed.local.is_dir() else 'file'} {str(parsed.local)!r}" if parsed.local else "hub"
    config = f", config {parsed.config!r}" if parsed.config else ""
    counts = ", ".join(f"{k}={v:,}" for k, v in rows.items())
    description = (
        f"Hugging Face dataset {parsed.dataset!r} ({where}{config}, streamed), {note}, column "
        f"{'/'.join(sorted(columns))!r}, rows {counts}, joined by newlines"
    )
    return {split: text.encode("utf-8") for split, text in texts.items()}, description


def _load(datasets: Any, parsed: HFData, spec: str) -> Any:
    """``datasets.load_dataset`` (streaming) of the spec: an IterableDataset with a split, else a dict of them."""
    if parsed.local is not None and parsed.local.is_file():
        builder = BUILDERS.get(parsed.local.suffix.lower())
        if builder is None:
            raise config_error("data", spec, f"a local file is read by its suffix, one of {sorted(BUILDERS)}")
        if parsed.local.stat().st_size == 0:  # datasets' own error for it is a bare StopIteration
            raise config_error("data", spec, "the file is empty")
        args: dict[str, Any] = {"path": builder, "data_files": str(parsed.local)}
    elif parsed.local is not None:
        args = {"path": str(parsed.local)}
    else:
        args = {"path": parsed.dataset, "name": parsed.config}
    try:
        return datasets.load_dataset(**args, split=parsed.split, streaming=True)
    except Exception as e:  # datasets' errors (not found, offline, bad config or split) share no base class
        raise config_error("data", spec, f"datasets could not open it: {_reason(e)}") from None


def _read_text(dataset: Any, spec: str, split: str) -> tuple[str, str, int]:
    """(the rows' text joined by newlines, the column read, the number of rows) of one streamed split."""
    parts: list[str] = []
    column = None
    rows = iter(dataset)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            break
        except Exception as e:  # a file that stops parsing midway, a connection lost while streaming
            raise config_error("data", spec, f"reading the {split} split failed: {_reason(e)}") from None
        if column is None:
            column = _text_column(row, spec)
        value = row[column]
        if not isinstance(value, str):
            raise config_error(
                "data", spec, f"row {len(parts)} of the {split} split: {column!r} is {value!r}, not text"
            )
        parts.append(value if value.endswith("\n") else value + "\n")
    if column is None:
        raise config_error("data", spec, f"the {split} split has no rows")
    return "".join(parts), column, len(parts)


def _text_column(row: dict[str, Any], spec: str) -> str:
    if "text" in row:
        return "text"
    strings = [k for k, v in row.items() if isinstance(v, str)]
    if len(strings) != 1:
        raise config_error(
            "data", spec, f"has no 'text' column and {len(strings)} text columns ({strings}) among {list(row)}"
        )
    return strings[0]


def _reason(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")
