"""Training checkpoints without pickle, written atomically.

Layout of ``out_dir/checkpoint/``::

    config.json, model.safetensors        the model (``hierseq.save``; ``hierseq.load`` reads it directly)
    trainer_state.safetensors             every tensor of the trainer state (optimizer moments, RNG states,
                                          loader generator state)
    trainer_state.json                    everything else (step, tokens, scheduler, loader position, ...);
                                          tensors appear as {"__tensor__": key} references into the file above

Atomicity: the whole checkpoint is written into ``checkpoint.tmp/``; only when complete is the previous
``checkpoint/`` renamed to ``checkpoint.old/``, the new one renamed into place, and the old one deleted.
A crash at any point leaves either ``checkpoint/`` or ``checkpoint.old/`` complete, and
:func:`find_checkpoint` picks whichever exists (``checkpoint/`` first). The run's ``final/`` model is
written the same way (:func:`save_final`). A write that fails (disk full, read-only file system) removes
its ``.tmp/`` folder, keeps the previous one, and raises a one-line ``OSError``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..serialization import save as save_model
from .run_dir import write_error

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
CHECKPOINT = "checkpoint"
FINAL = "final"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------- encoding
def encode_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """Nested state (dicts, lists, tuples, tensors, scalars) -> JSON-able structure; tensors are moved
    into ``tensors`` under unique keys. Non-string dict keys (the optimizer's parameter indices) and
    tuples (Adam betas) are tagged so :func:`decode_state` restores them exactly."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}.{len(tensors)}"
        # safetensors needs contiguous, non-shared CPU storage.
        tensors[key] = obj.detach().to("cpu").clone().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: encode_state(v, tensors, prefix) for k, v in obj.items()}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
            return {"__intdict__": [[k, encode_state(v, tensors, prefix)] for k, v in obj.items()]}
        raise TypeError(f"state: dict keys must be all str or all int, got {sorted(map(repr, obj))[:5]}")
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [encode_state(v, tensors, prefix) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"state: cannot store a {type(obj).__name__} without pickle")


def decode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_state`."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__intdict__"}:
            return {int(k): decode_state(v, tensors) for k, v in obj["__intdict__"]}
        if set(obj) == {"__tuple__"}:
            return tuple(decode_state(v, tensors) for v in obj["__tuple__"])
        return {k: decode_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------- save / load
def _rename(src: Path, dst: Path) -> None:
    """One step of the swap; a separate function so tests can simulate a crash between the steps."""
    os.replace(src, dst)


def _write_trainer_state(directory: Path, state: dict[str, Any]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    encoded = encode_state(state, tensors)
    save_file(tensors, str(directory / STATE_TENSORS))
    payload = {"format_version": FORMAT_VERSION, "state": encoded}
    # Written last: a directory with this file is complete (the rename protocol relies on it too).
    with open(directory / STATE_JSON, "w") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def replace_dir(out_dir: str | Path, name: str, write: Callable[[Path], None], what: str) -> Path:
    """Atomically (re)write the folder ``out_dir/name`` with ``write(folder)``.

    Everything is written into ``name.tmp/``; only when complete is the previous ``name/`` renamed to
    ``name.old/``, the new one renamed into place and the old one deleted, so the previous folder stays
    intact and loadable until the new one is complete. A failed write (disk full, read-only file
    system, ...) removes ``name.tmp/`` and raises a one-line ``OSError`` naming ``what``."""
    out_dir = Path(out_dir)
    final, tmp, old = out_dir / name, out_dir / f"{name}.tmp", out_dir / f"{name}.old"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # leftover of an interrupted save: never complete, safe to drop
            shutil.rmtree(tmp)
        tmp.mkdir()
        write(tmp)
    except (OSError, SafetensorError) as e:
        # A write that failed (a kill cannot get here: its torn .tmp/ is dropped by the next save).
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(what, out_dir, e) from e
    if final.exists():
        if old.exists():
            if name == CHECKPOINT and not (final / STATE_JSON).is_file():  # pragma: no cover - always complete
                raise RuntimeError(f"{final}: incomplete checkpoint next to {old}; refusing to delete either")
            shutil.rmtree(old)
        _rename(final, old)
    _rename(tmp, final)
    if old.exists():
        shutil.rmtree(old)
    return final


def save_checkpoint(out_dir: str | Path, model: nn.Module, state: dict[str, Any]) -> Path:
    """Atomically write ``out_dir/checkpoint/`` holding ``model`` (hierseq format) and ``state``.

    The previous checkpoint stays intact and loadable until the new one is completely written; a failed
    write leaves no ``checkpoint.tmp/`` behind and raises a one-line ``OSError``."""

    def write(folder: Path) -> None:
        save_model(model, folder)
        _write_trainer_state(folder, state)

    return replace_dir(out_dir, CHECKPOINT, write, "the checkpoint")


def save_final(out_dir: str | Path, model: nn.Module) -> Path:
    """Atomically write the run's model to ``out_dir/final/`` (as :func:`save_checkpoint` does)."""
    return replace_dir(out_dir, FINAL, lambda folder: save_model(model, folder), "the final model")


def find_checkpoint(out_dir: str | Path) -> Path | None:
    """The complete checkpoint in ``out_dir``: ``checkpoint/``, else ``checkpoint.old/`` (a save that was
    interrupted after moving the previous one aside), else None. ``checkpoint.tmp/`` is never used."""
    out_dir = Path(out_dir)
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):
        candidate = out_dir / name
        if (candidate / STATE_JSON).is_file():
            return candidate
    return None


def load_trainer_state(directory: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    """The trainer state saved by :func:`save_checkpoint` in ``directory`` (tensors on ``map_location``)."""
    directory = Path(directory)
    json_path = directory / STATE_JSON
    if not json_path.is_file():
        raise FileNotFoundError(f"{STATE_JSON}: missing in {str(directory)!r}: not a complete checkpoint")
    payload = json.loads(json_path.read_text())
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{json_path}: format_version={payload.get('format_version')!r}: this hierseq reads {FORMAT_VERSION}"
        )
    tensors = load_file(str(directory / STATE_TENSORS), device=map_location)
    return decode_state(payload["state"], tensors)
