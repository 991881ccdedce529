"""Text corpora as byte tensors with a fixed train / val / test split.

- ``load_corpus(None)``: the embedded Jane Austen novels, split by novel (:data:`SPLIT`).
- ``load_corpus("file.txt")``: one text file, split by position 90 / 5 / 5 (contiguous).
- ``load_corpus("folder/")``: its text files (recursively, sorted by path); with >= 4 files the split is
  by file (about 5% of the files each, at least one, to val and test: the last files in sorted order),
  otherwise the files are joined and split by position, so a folder of 2 or 3 files trains on all of
  them rather than on one. ``Corpus.description`` says which files went where (the trainer logs it).
- ``load_corpus("hf:<dataset>[:<config>][@<split>]")``: a Hugging Face dataset, hub or local
  parquet / json / text files, through ``datasets`` (the optional ``data`` extra; :mod:`.hf_datasets`).
- ``~`` is expanded; anything but a regular file or a folder (``/dev/zero``, a FIFO) is refused.

Text is kept as raw UTF-8 bytes (``torch.uint8``); the byte tokenizer is the identity on them, other
tokenizers encode them (:func:`hierseq.data.tokenizer.tokenize_split`).
"""

from __future__ import annotations

import functools
import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import config_error
from .hf_datasets import canonical_hf_data, is_hf_data, load_hf_text, parse_hf_data

#: The embedded corpus split, by novel (file stem in ``data/corpora/``).
SPLIT: dict[str, list[str]] = {
    "train": ["emma", "mansfieldpark", "prideprejudice", "sensesensibility"],
    "val": ["northangerabbey"],
    "test": ["persuasion"],
}

#: Joined between documents so a window crossing a boundary sees a paragraph break, not glued words.
SEPARATOR = b"\n\n"

#: File suffixes read from a user folder.
TEXT_SUFFIXES = (".txt", ".md", ".text")

#: A folder is split by file from this many text files on (with fewer, holding out one file each for
#: val and test would leave at most one file to train on).
MIN_FILES_FOR_FILE_SPLIT = 4

#: Position split of a single text: train / val / test fractions.
POSITION_FRACTIONS = (0.90, 0.05, 0.05)

CORPORA_DIR = Path(__file__).parent / "corpora"


@dataclass
class Corpus:
    """A byte corpus. train / val / test: uint8 tensors [N_split] of UTF-8 bytes."""

    name: str
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    description: str

    def split(self, name: str) -> torch.Tensor:
        """The split called ``name`` ("train", "val" or "test")."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"split={name!r}: must be one of ['train', 'val', 'test']")
        return getattr(self, name)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def max_token(self) -> int:
        """The largest byte value in any split (-1 for an empty corpus)."""
        return max((int(t.max()) for t in (self.train, self.val, self.test) if len(t)), default=-1)

    def check_vocab(self, vocab_size: int, name: str = "model_config.vocab_size") -> None:
        """Refuse a model vocabulary that cannot hold every byte of this corpus (one line, naming ``name``)."""
        top = self.max_token()
        if top >= vocab_size:
            raise ValueError(
                f"{name}={vocab_size!r}: the corpus {self.name!r} holds byte values up to {top}, so the model "
                f"needs vocab_size >= {top + 1} (256 covers every byte)"
            )


def _to_tensor(data: bytes) -> torch.Tensor:
    """bytes -> owned uint8 tensor [N] (frombuffer on a bytearray avoids a Python-level loop)."""
    if not data:
        return torch.zeros(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


@functools.cache
def _embedded_novel(name: str) -> bytes:
    """Decompressed bytes of one embedded novel; cached per process (decompressing all six ~0.3 s)."""
    path = CORPORA_DIR / f"{name}.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"embedded corpus file {str(path)!r} is missing: the package is incomplete")
    with gzip.open(path, "rb") as f:
        return f.read()


@functools.lru_cache(maxsize=1)
def _embedded_corpus() -> Corpus:
    parts = {split: SEPARATOR.join(_embedded_novel(n) for n in names) for split, names in SPLIT.items()}
    description = (
        "Jane Austen's six novels (public domain, Project Gutenberg via Debian r-cran-janeaustenr), UTF-8 bytes, "
        f"split by novel: train={SPLIT['train']}, val={SPLIT['val']}, test={SPLIT['test']}"
    )
    return Corpus(
        name="austen",
        train=_to_tensor(parts["train"]),
        val=_to_tensor(parts["val"]),
        test=_to_tensor(parts["test"]),
        description=description,
    )


def load_corpus(path: str | Path | None = None, min_split_len: int = 2) -> Corpus:
    """Load a corpus: ``None`` = embedded Austen; a text file; a folder of text files; or an ``hf:`` dataset.

    Every split must hold at least ``min_split_len`` bytes (the trainer passes ``seq_len + 1``, one
    training window); otherwise a ``ValueError`` names the path, the split and the rule.
    The embedded corpus is cached per process; the returned tensors must be treated as read-only.
    """
    if isinstance(min_split_len, bool) or not isinstance(min_split_len, int) or min_split_len < 1:
        raise ValueError(f"min_split_len={min_split_len!r}: must be a positive integer")
    if path is None:
        corpus = _embedded_corpus()
    elif is_hf_data(path):
        corpus = _load_hf(str(path))
    else:
        p = check_data_path(path)
        corpus = _load_folder(p) if p.is_dir() else _load_file(p)
    for split, tokens in corpus.sizes().items():
        if tokens < min_split_len:
            raise ValueError(
                f"data={corpus.name!r}: the {split} split has {tokens} bytes, needs at least {min_split_len} "
                f"(one window of seq_len + 1); {corpus.description}. Use more text or a shorter seq_len."
            )
    return corpus


def canonical_data(data: str | None) -> str | None:
    """``data`` as a run records it: None (the embedded corpus); an ``hf:`` spec with a local path made
    absolute (:func:`~hierseq.data.hf_datasets.canonical_hf_data`); else the absolute path with ``~``
    expanded and symlinks resolved. Two spellings of one file (``./x.txt``, ``x.txt``, ``~/x.txt``) give the
    same string, and the same relative path typed in another directory does not."""
    if data is None:
        return None
    if is_hf_data(data):
        return canonical_hf_data(data)
    return str(Path(os.path.expanduser(data)).resolve())


def data_exists(data: str) -> bool:
    """Whether a recorded data source is still there: a file or folder, or an ``hf:`` spec whose local path
    exists (a hub dataset is taken to be there; reading it says otherwise)."""
    if is_hf_data(data):
        try:
            parse_hf_data(data)
        except FileNotFoundError:
            return False
        return True
    return Path(data).exists()


def check_data_path(path: str | Path, name: str = "data") -> Path:
    """``path`` with ``~`` expanded, when it is a regular file or a folder; else a one-line error (a
    missing path, or a device / FIFO such as ``/dev/zero`` that would be read forever)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{name}={str(path)!r}: no such file or directory")
    if not (p.is_dir() or p.is_file()):
        raise config_error(name, str(path), "is not a regular file or a folder of text files")
    return p


def check_data(data: str, name: str = "data") -> str:
    """A data source given on the command line, checked and as a run records it (:func:`canonical_data`): an
    ``hf:`` spec (its local path must exist), or a file or folder (:func:`check_data_path`)."""
    if is_hf_data(data):
        return parse_hf_data(data, name).spec()
    return str(check_data_path(data, name))


def _load_hf(spec: str) -> Corpus:
    texts, description = load_hf_text(spec)
    if "val" not in texts:
        texts["train"], texts["val"], texts["test"] = split_by_position(texts["train"])
    return Corpus(
        name=spec,
        train=_to_tensor(texts["train"]),
        val=_to_tensor(texts["val"]),
        test=_to_tensor(texts["test"]),
        description=f"{description} ({sum(len(t) for t in texts.values()):,} bytes)",
    )


def split_by_position(data: bytes) -> tuple[bytes, bytes, bytes]:
    """Contiguous 90 / 5 / 5 split of ``data`` (val and test at the end, as held-out continuations)."""
    n = len(data)
    n_train = int(n * POSITION_FRACTIONS[0])
    n_val = int(n * POSITION_FRACTIONS[1])
    return data[:n_train], data[n_train : n_train + n_val], data[n_train + n_val :]


def _load_file(path: Path) -> Corpus:
    data = path.read_bytes()
    if not data:
        raise ValueError(f"data={str(path)!r}: the file is empty")
    train, val, test = split_by_position(data)
    return Corpus(
        name=str(path),
        train=_to_tensor(train),
        val=_to_tensor(val),
        test=_to_tensor(test),
        description=f"text file {str(path)!r} ({len(data)} bytes), split by position 90/5/5 (contiguous)",
    )


def _list_text_files(folder: Path) -> list[Path]:
    files = [f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES]
    # Sort by the path relative to the folder so the split does not depend on where the folder lives.
    return sorted(files, key=lambda f: f.relative_to(folder).as_posix())


def _load_folder(folder: Path) -> Corpus:
    files = _list_text_files(folder)
    if not files:
        raise ValueError(
            f"data={str(folder)!r}: the folder holds no text files (rule: files ending in "
            f"{list(TEXT_SUFFIXES)}, searched recursively)"
        )
    rel = [f.relative_to(folder).as_posix() for f in files]
    if len(files) < MIN_FILES_FOR_FILE_SPLIT:
        data = SEPARATOR.join(f.read_bytes() for f in files)
        train, val, test = split_by_position(data)
        description = (
            f"folder {str(folder)!r}: {len(files)} text file(s) {rel} ({len(data)} bytes) joined and split by "
            f"position 90/5/5 (contiguous), since fewer than {MIN_FILES_FOR_FILE_SPLIT} files are not split by file"
        )
    else:
        # By file: about 5% of the files each to val and test, at least one each; the last files in
        # sorted order are held out so adding files at the end does not reshuffle the training set.
        n_hold = max(1, round(0.05 * len(files)))
        n_train = len(files) - 2 * n_hold
        if n_train < 1:  # only possible for tiny counts; keep >= 1 training file
            n_hold, n_train = 1, len(files) - 2
        groups = {
            "train": files[:n_train],
            "val": files[n_train : n_train + n_hold],
            "test": files[n_train + n_hold :],
        }
        joined = {k: SEPARATOR.join(f.read_bytes() for f in v) for k, v in groups.items()}
        train, val, test = joined["train"], joined["val"], joined["test"]
        names = {k: [f.relative_to(folder).as_posix() for f in v] for k, v in groups.items()}
        description = (
            f"folder {str(folder)!r}: {len(files)} text files split by file (sorted by path; the last files are "
            f"held out): train={len(names['train'])} files, val={names['val']}, test={names['test']}"
        )
    return Corpus(
        name=str(folder),
        train=_to_tensor(train),
        val=_to_tensor(val),
        test=_to_tensor(test),
        description=description,
    )
