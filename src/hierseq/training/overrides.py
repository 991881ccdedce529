"""The one ``--set key=value`` parser, used by ``hierseq train`` and ``python -m hierseq.training``.

Values are parsed as YAML scalars (numbers, booleans, null, lists, mappings); a plain string that reads
as a number (YAML 1.1 gives ``3e-4`` without a dot as a string) becomes a float. Keys prefixed
``model.`` or ``model_config.`` override a model config field, ``task.`` or ``task_options.`` a task
option, anything else a :class:`~hierseq.training.config.TrainConfig` field.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
#: key prefix -> the TrainConfig mapping it overrides a field of.
PREFIXES = {
    "model.": "model_config",
    "model_config.": "model_config",
    "task.": "task_options",
    "task_options.": "task_options",
}


def parse_value(pair: str, raw: str) -> Any:
    """The value of ``--set pair`` (``raw`` is the text after ``=``)."""
    if not raw.strip():
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ValueError(f"--set {pair!r}: value {raw!r} is not a valid YAML value") from None
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        value = float(value)
    return value


def parse_overrides(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """``["lr=3e-4", "model.d_model=128", "task.n_pairs=8"]`` -> ``{"train": {"lr": 0.0003},
    "model_config": {"d_model": 128}, "task_options": {"n_pairs": 8}}``."""
    out: dict[str, dict[str, Any]] = {"train": {}, "model_config": {}, "task_options": {}}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: must have the form key=value (e.g. --set lr=3e-4)")
        value = parse_value(pair, raw)
        for prefix, group in PREFIXES.items():
            if key.startswith(prefix):
                if not key[len(prefix) :]:
                    raise ValueError(f"--set {pair!r}: {prefix!r} needs a field name (e.g. --set {prefix}name=value)")
                out[group][key[len(prefix) :]] = value
                break
        else:
            out["train"][key] = value
    return out


def apply_overrides(data: dict[str, Any], pairs: list[str]) -> dict[str, Any]:
    """``data`` (TrainConfig fields) with ``--set`` overrides applied; returns a new dict (the model
    config and task options are merged field by field, not replaced)."""
    parsed = parse_overrides(pairs)
    out = {**data, **parsed["train"]}
    for group in ("model_config", "task_options"):
        base = out.get(group) or {}
        if not isinstance(base, dict):  # TrainConfig names the field and its rule
            continue
        out[group] = {**base, **parsed[group]}
    return out
