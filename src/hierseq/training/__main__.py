"""``python -m hierseq.training CONFIG.yaml [--set key=value ...] [--overwrite]`` (also under ``torchrun``).

``--set`` is parsed by :mod:`hierseq.training.overrides` (the parser of ``hierseq train``), e.g.
``--set max_steps=500 --set model.d_model=128 --set task.n_pairs=8``. Errors go through the one error path
of ``hierseq`` (:func:`hierseq.cli.run_entry_point`): one line ``hierseq: error: ...`` and a non-zero exit;
under ``torchrun`` every rank fails alike and only rank 0 prints it.
"""

from __future__ import annotations

import json
import os
import sys

from ..cli import Parser, run_entry_point
from .config import TrainConfig, load_yaml_mapping
from .overrides import apply_overrides
from .trainer import train


def _run(argv: list[str] | None) -> int:
    parser = Parser(prog="python -m hierseq.training", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML file of TrainConfig fields")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run already in out_dir (else it is refused unless resume: true continues it)",
    )
    args = parser.parse_args(argv)
    cfg = TrainConfig.from_dict(apply_overrides(load_yaml_mapping(args.config), args.set))
    result = train(cfg, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_entry_point(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
