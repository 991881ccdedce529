"""``python -m hierseq.training CONFIG.yaml [--set key=value ...]`` (also under ``torchrun``).

``--set`` values are parsed as YAML scalars; keys prefixed ``model.`` or ``model_config.`` override a
model config field, e.g. ``--set max_steps=500 --set model.d_model=128``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

from .trainer import TrainConfig, train


def apply_overrides(data: dict[str, Any], pairs: list[str]) -> dict[str, Any]:
    """``data`` (TrainConfig fields) with ``key=value`` overrides applied; returns a new dict."""
    data = {**data, "model_config": dict(data.get("model_config") or {})}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: must have the form key=value (e.g. --set lr=3e-4)")
        value = yaml.safe_load(raw) if raw.strip() else ""
        for prefix in ("model.", "model_config."):
            if key.startswith(prefix):
                data["model_config"][key[len(prefix) :]] = value
                break
        else:
            data[key] = value
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hierseq.training", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML file of TrainConfig fields")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    args = parser.parse_args(argv)
    base = TrainConfig.from_yaml(args.config).to_dict()
    cfg = TrainConfig.from_dict(apply_overrides(base, args.set))
    result = train(cfg)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
