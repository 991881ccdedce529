"""Save / load a model as ``config.json`` + ``model.safetensors`` (no pickle anywhere)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn

from .registry import get_entry

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model`` to ``directory`` (created if needed). Files are written to temporary names and
    renamed, so an interrupted save never leaves a half-written file under the final name."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "model_type", ""):
        raise ValueError(f"model={type(model).__name__}: only registered hierseq models can be saved")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(config.to_json() + "\n"))
    # save_model de-duplicates tied tensors (e.g. the embedding shared with the LM head).
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_model(model, p))
    return directory


def atomic_write(final: Path, write: Callable[[str], Any]) -> None:
    """Run ``write(tmp_path)`` on a temporary file beside ``final``, then rename it over ``final``: a reader
    sees the old file or the new one, never half of one, and a failed write leaves the old file."""
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_config(directory: str | Path):
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"directory={str(directory)!r}: not a directory")
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{CONFIG_NAME}: missing in {str(directory)!r}")
    try:
        data = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{CONFIG_NAME}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"{CONFIG_NAME}: must be a JSON object with a 'model_type' field")
    entry = get_entry(data["model_type"])
    return entry, entry.config_cls.from_dict(data)


def load(directory: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model saved in ``directory``; weights must match the config exactly."""
    directory = Path(directory)
    entry, config = load_config(directory)
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{WEIGHTS_NAME}: missing in {str(directory)!r}")
    try:
        state = load_file(str(weights_path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{WEIGHTS_NAME}: unreadable or truncated ({e})") from None
    model = entry.model_cls(config)
    load_state_exact(model, state, source=str(weights_path))
    return model


def load_state_exact(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` requiring every tensor to be present with the right shape.
    Tied parameters stored once under either name are accepted."""
    own = model.state_dict(keep_vars=True)
    # Group names that share storage (tied weights): any one of them in the file fills all.
    by_ptr: dict[int, list[str]] = {}
    for name, t in own.items():
        by_ptr.setdefault(t.data_ptr() if t.numel() else id(t), []).append(name)
    missing, filled = [], {}
    for names in by_ptr.values():
        present = [n for n in names if n in state]
        if not present:
            missing.extend(names)
            continue
        for n in names:
            filled[n] = state[present[0]]
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not match the config (missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    for name, t in filled.items():
        if tuple(t.shape) != tuple(own[name].shape):
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(t.shape)}, config needs {tuple(own[name].shape)}"
            )
    model.load_state_dict(filled, strict=True)
