"""A run directory (``out_dir``): which files make a run, whether a new run may write there, and the run's
recorded data source.

This module is the one place that

* decides what happens to an ``out_dir`` that already holds a run (:func:`prepare_out_dir`, checked before
  anything is written: continue it with ``resume``, replace it with ``overwrite``, or refuse);
* checks that ``out_dir`` can be written at all (:func:`check_out_dir`: not a file, not read-only);
* records the data source of a run (:func:`~hierseq.data.corpora.canonical_data`: ``data`` as an absolute,
  tilde-expanded path, or an ``hf:`` spec whose local path is, so ``train_config.yaml`` names the corpus
  whatever the working directory) and checks it on resume and in ``hierseq eval`` (:func:`same_data`,
  :func:`recorded_run`).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import config_error
from ..data.corpora import canonical_data

#: Files and folders the trainer writes into ``out_dir``: together they are "a run".
RUN_FILES = (
    "train_config.yaml",
    "metrics.jsonl",
    "loss.png",
    "final",
    "final.old",
    "final.tmp",
    "checkpoint",
    "checkpoint.old",
    "checkpoint.tmp",
)
TRAIN_CONFIG_NAME = "train_config.yaml"


# ----------------------------------------------------------------------------------------------- data
def same_data(saved: str | None, current: str | None) -> bool:
    """Whether a checkpoint's recorded ``data`` and the current run's name the same corpus. Runs recorded
    before paths were made absolute hold the string as typed: it is resolved from the working directory,
    the best that can be done for them."""
    return canonical_data(saved) == canonical_data(current)


@dataclass
class RecordedRun:
    """What ``hierseq eval`` / ``generate`` need to know of the training run a model came from."""

    directory: Path
    config: dict[str, Any]

    @property
    def data(self) -> str | None:
        """The run's corpus (None: the embedded one), as an absolute path."""
        data = self.config.get("data")
        return canonical_data(data) if isinstance(data, str) and data else None

    @property
    def seq_len(self) -> int | None:
        value = self.config.get("seq_len")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def task(self) -> str | None:
        task = self.config.get("task")
        return task if isinstance(task, str) else None


def recorded_run(model_dir: str | Path) -> RecordedRun | None:
    """The training run behind ``model_dir`` (a run directory, or its ``final/`` / ``checkpoint/``), read
    from its ``train_config.yaml``; None for a plain ``hierseq.save`` directory."""
    p = Path(model_dir)
    for candidate in (p, p.parent if p.name in ("final", "checkpoint", "checkpoint.old") else None):
        if candidate is not None and (candidate / TRAIN_CONFIG_NAME).is_file():
            try:
                config = yaml.safe_load((candidate / TRAIN_CONFIG_NAME).read_text()) or {}
            except yaml.YAMLError:
                raise config_error(
                    "model_dir", str(model_dir), f"its {TRAIN_CONFIG_NAME} is not valid YAML (pass --data explicitly)"
                ) from None
            if not isinstance(config, dict):
                raise config_error("model_dir", str(model_dir), f"its {TRAIN_CONFIG_NAME} is not a mapping")
            return RecordedRun(candidate, config)
    return None


# -------------------------------------------------------------------------------------------- out_dir
def existing_run_files(out_dir: str | Path) -> list[str]:
    """The names of :data:`RUN_FILES` present in ``out_dir`` (other files are never touched)."""
    p = Path(out_dir)
    if not p.is_dir():
        return []
    return [name for name in RUN_FILES if (p / name).exists()]


def check_out_dir(out_dir: str | Path) -> None:
    """Refuse an ``out_dir`` that cannot hold a run, before anything is written: an existing non-folder,
    or a location whose nearest existing folder is read-only or not writable."""
    p = Path(out_dir)
    if p.exists() and not p.is_dir():
        raise config_error("out_dir", str(out_dir), "exists and is not a directory")
    ancestor = p
    while not ancestor.exists():
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise config_error("out_dir", str(out_dir), f"{str(ancestor)!r} is a file, so the folder cannot be created")
    if not os.access(ancestor, os.W_OK | os.X_OK) or _read_only_fs(ancestor):
        reason = "is on a read-only file system" if _read_only_fs(ancestor) else "is not writable"
        where = "" if ancestor == p else f" (its nearest existing folder {str(ancestor)!r})"
        raise config_error("out_dir", str(out_dir), f"cannot be written: it{where} {reason}")


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows): os.access has answered
        return False


def prepare_out_dir(out_dir: str | Path, resume: bool, has_checkpoint: bool, overwrite: bool) -> list[str]:
    """Decide what a new run does with ``out_dir``; raises before anything is written.

    ``resume`` with a checkpoint there (``has_checkpoint``): it is continued and the run's files stay.
    Otherwise an ``out_dir`` holding a run (any of :data:`RUN_FILES`) is refused unless ``overwrite``;
    returns the files :func:`clear_run_files` must remove once the new run has been validated (empty:
    nothing to replace)."""
    existing = existing_run_files(out_dir)
    if (resume and has_checkpoint) or not existing:
        return []
    if overwrite:
        return existing
    if resume:
        rule = (
            f"holds a run ({', '.join(existing)}) but no checkpoint to resume from; pass --overwrite to start "
            "it again, or choose another --out"
        )
    else:
        rule = (
            f"already holds a run ({', '.join(existing)}); pass --resume to continue it, --overwrite to replace "
            "it, or choose another --out"
        )
    raise config_error("out_dir", str(out_dir), rule)


def clear_run_files(out_dir: str | Path, names: list[str]) -> None:
    """Remove the previous run's files (only :data:`RUN_FILES`), so the folder never mixes two runs."""
    p = Path(out_dir)
    for name in names:
        if name not in RUN_FILES:  # pragma: no cover - a programming error
            raise ValueError(f"{name!r}: not a run file")
        target = p / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


def write_error(what: str, out_dir: str | Path, error: BaseException) -> OSError:
    """A one-line ``OSError`` for a failed write into ``out_dir`` (disk full, read-only, ...); the caller
    has already removed what it half-wrote."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = getattr(error, "strerror", None) or (lines[0] if lines else type(error).__name__)
    return OSError(f"out_dir={str(out_dir)!r}: writing {what} failed ({reason})")
