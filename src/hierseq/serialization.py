"""Save / load a model as ``config.json`` + ``model.safetensors`` (no pickle anywhere).

``config.json`` names the model ``"model_type": "hierseq-<name>"`` (the registry name behind a prefix:
bare names such as ``mamba`` are transformers' own model types, and ``AutoModelForCausalLM`` would pick
its Mamba for them). :func:`load` reads three kinds of directories: these, those of older hierseq
versions (bare ``model_type``), and ``save_pretrained`` directories of :mod:`hierseq.hf` (the native
fields among transformers' own, weights under the wrapper's ``model.`` prefix).

A model that carries a subword tokenizer (``model.tokenizer``, see :mod:`hierseq.data.tokenizer`) is saved
with it: ``tokenizer.json`` + ``tokenizer_config.json`` beside the weights (``AutoTokenizer`` reads them), and
:func:`load` gives it back to the loaded model.
"""

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

from .config import BaseConfig
from .data.tokenizer import load_saved_tokenizer, stale_tokenizer_files, tokenizer_files
from .registry import get_entry

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: prefix of ``model_type`` in config.json (shared with hierseq.hf's transformers configs).
MODEL_TYPE_PREFIX = "hierseq-"
#: the key a transformers ``save_pretrained`` config.json has and a native one has not.
_HF_MARKER = "transformers_version"
#: prefix of the native weights inside a hierseq.hf wrapper (its ``base_model_prefix``).
_HF_WEIGHTS_PREFIX = "model."


def native_model_type(model_type: Any) -> Any:
    """The registry name behind a config.json ``model_type`` (``hierseq-mamba`` and ``mamba`` -> ``mamba``)."""
    if isinstance(model_type, str) and model_type.startswith(MODEL_TYPE_PREFIX):
        return model_type[len(MODEL_TYPE_PREFIX) :]
    return model_type


def save(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model`` (a registered hierseq model, or its :mod:`hierseq.hf` wrapper, saved as the native
    model it holds) and the tokenizer it carries to ``directory`` (created if needed). Files are written to
    temporary names and renamed, so an interrupted save never leaves a half-written file under the final
    name. A model without a subword tokenizer removes the tokenizer files an earlier hierseq save left there
    (never other ones), so the folder never pairs it with another model's tokenizer."""
    native = getattr(model, "native_model", None)  # a hierseq.hf wrapper: save what it wraps
    if isinstance(native, nn.Module):
        model = native
    config = getattr(model, "config", None)
    if not isinstance(config, BaseConfig) or not getattr(config, "model_type", ""):
        raise ValueError(f"model={type(model).__name__}: only registered hierseq models can be saved")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = {**config.to_dict(), "model_type": MODEL_TYPE_PREFIX + config.model_type}
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    # Tokenizer and weights first, config.json last: a failure leaves the previous config.json, whose
    # vocab_size load() checks the tokenizer against. save_model de-duplicates tied tensors (e.g. the
    # embedding shared with the LM head).
    wrote_tokenizer = write_tokenizer_files(model, directory)
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_model(model, p))
    atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(text))
    if not wrote_tokenizer:  # only once the new model is complete: a failed save keeps the previous pair intact
        remove_stale_tokenizer_files(directory)
    return directory


def write_tokenizer_files(model: nn.Module, directory: Path) -> bool:
    """Write the subword tokenizer ``model`` carries into ``directory`` (each file atomically); returns
    whether there was one to write."""
    files = tokenizer_files(model)
    for name, content in files.items():
        atomic_write(directory / name, lambda p, content=content: Path(p).write_text(content))
    return bool(files)


def remove_stale_tokenizer_files(directory: Path) -> None:
    """Remove the tokenizer files an earlier hierseq save left in ``directory`` (never a user's own)."""
    for stale in stale_tokenizer_files(directory):
        stale.unlink()


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
    """The (registry entry, config) of the model saved in ``directory``."""
    return _config_from_json(_read_config_json(Path(directory)))


def _read_config_json(directory: Path) -> dict[str, Any]:
    """``directory/config.json`` parsed and checked to be an object naming a ``model_type``."""
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
    return data


def _config_from_json(data: dict[str, Any]):
    entry = get_entry(native_model_type(data["model_type"]))
    if _is_hf_config(data):
        # transformers adds its own fields (dtype, token ids, transformers_version ...): keep the native ones.
        data = {k: v for k, v in data.items() if k in entry.config_cls.field_names()}
    else:
        data = {**data, "model_type": entry.name}
    return entry, entry.config_cls.from_dict(data)


def _is_hf_config(data: dict[str, Any]) -> bool:
    return _HF_MARKER in data


def load(directory: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model saved in ``directory`` (by :func:`save`, or by ``save_pretrained`` of its
    :mod:`hierseq.hf` wrapper); weights must match the config exactly: names, shapes and dtypes. A saved
    tokenizer comes back as ``model.tokenizer`` (its size must be the config's ``vocab_size``)."""
    directory = Path(directory)
    data = _read_config_json(directory)
    entry, config = _config_from_json(data)
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{WEIGHTS_NAME}: missing in {str(directory)!r}")
    try:
        state = load_file(str(weights_path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{WEIGHTS_NAME}: unreadable or truncated ({e})") from None
    if _is_hf_config(data):
        state = {_strip(k, _HF_WEIGHTS_PREFIX): v for k, v in state.items()}
    tokenizer = load_saved_tokenizer(directory, config.vocab_size)  # before the model: its errors are cheaper
    model = entry.model_cls(config)
    load_state_exact(model, state, source=str(weights_path))
    if tokenizer is not None:
        model.tokenizer = tokenizer
    return model


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix) :] if name.startswith(prefix) else name


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "floating-point" if dtype.is_floating_point else "integer"


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
        # The file's header says how its bytes read; another kind (I32 where the model has F32) would be
        # reinterpreted garbage. Another precision of the same kind (bf16 weights) is cast, as intended.
        if _dtype_kind(t.dtype) != _dtype_kind(own[name].dtype):
            raise ValueError(
                f"{source}: tensor {name!r} is stored as {str(t.dtype).removeprefix('torch.')}, the model's is "
                f"{str(own[name].dtype).removeprefix('torch.')}: a damaged or foreign file"
            )
    model.load_state_dict(filled, strict=True)
