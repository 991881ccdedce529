"""``python -m hierseq.training CONFIG.yaml [--set key=value ...]`` (also under ``torchrun``).

``--set`` is parsed by :mod:`hierseq.training.overrides` (the parser of ``hierseq train``), e.g.
``--set max_steps=500 --set model.d_model=128 --set task.n_pairs=8``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .config import TrainConfig, load_yaml_mapping
from .overrides import apply_overrides
from .trainer import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hierseq.training", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML file of TrainConfig fields")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    args = parser.parse_args(argv)
    cfg = TrainConfig.from_dict(apply_overrides(load_yaml_mapping(args.config), args.set))
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
