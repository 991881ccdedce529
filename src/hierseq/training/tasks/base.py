"""The contract between the training loop and a task adapter.

The loop (:mod:`hierseq.training.trainer`) owns everything a run shares: device, DDP, accumulation,
schedule, optimiser, clipping, checkpoints, progress bar, ``metrics.jsonl``, ``loss.png`` and the NaN
stop. A :class:`Task` owns what differs between model kinds:

* ``options``: the ``task_options`` it reads, with defaults and rules (:class:`Option`); unknown or bad
  options fail in one line ``task_options.name=value: rule``;
* :meth:`Task.implied_model_config`: the model-config fields the task fixes (a signal task makes a
  masked AE continuous with ``channels`` inputs), applied under the user's ``model_config``;
  :meth:`Task.check_model_config` refuses a model config the task cannot train;
* :meth:`Task.setup`: data and the training batch source (``task.source``, a :class:`BatchSource`
  whose ``state_dict`` goes into every checkpoint, so a resumed run draws the batches the uninterrupted
  one would have); a resumed run's checkpoint folder is ``task.resume_from`` (the lm task reads its saved
  tokenizer there);
* :meth:`Task.data_model_config`: the model-config fields the loaded data fixes (the lm task's tokenizer
  sets ``vocab_size``), applied over everything else; :meth:`Task.prepare_model` gives the built model what
  it carries (its tokenizer, saved with it);
* :meth:`Task.next_batch` / :meth:`Task.forward`: one global batch (this rank's rows), and the loss of
  one micro-batch of it as a :class:`StepLoss` (the loss to back-propagate and the named parts in
  :attr:`Task.loss_parts`);
* :meth:`Task.evaluate`: metrics of a split, a dict with at least ``loss`` (lower is better: the loop's
  ``keep_best`` selects on it); :meth:`Task.should_stop` may end a run early on them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from ...config import BaseConfig, config_error

if TYPE_CHECKING:  # pragma: no cover
    from ..config import TrainConfig

Batch = tuple[torch.Tensor, ...]


class BatchSource(Protocol):
    """Training batches of one rank; its state (generator states, positions) round-trips exactly."""

    def next_batch(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class StepLoss:
    """The loss of one micro-batch: ``loss`` is back-propagated; ``parts`` are the named terms of
    :attr:`Task.loss_parts` (scalars, logged next to the loss)."""

    loss: torch.Tensor
    parts: tuple[torch.Tensor, ...] = ()


# ------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class Option:
    """One task option: its default, the rule in words and the test of a value."""

    default: Any
    rule: str
    ok: Callable[[Any], bool]
    is_float: bool = False  # YAML gives "1e-3" as a string and 2 as an int: both become floats
    is_int: bool = False  # an integral float (1e3, 8.0) becomes an int


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def int_option(default: int | None, minimum: int, allow_none: bool = False) -> Option:
    rule = "must be a positive integer" if minimum == 1 else f"must be an integer >= {minimum}"
    return Option(
        default,
        rule + (" or null" if allow_none else ""),
        lambda v: (allow_none and v is None) or (_is_int(v) and v >= minimum),
        is_int=True,
    )


def float_option(default: float | None, low: float, high: float, low_open: bool = False, allow_none=False) -> Option:
    def ok(v: Any) -> bool:
        if allow_none and v is None:
            return True
        if not isinstance(v, float) or not math.isfinite(v):
            return False
        return (v > low if low_open else v >= low) and v <= high

    rule = f"must be a number in {'(' if low_open else '['}{low}, {high}]" + (" or null" if allow_none else "")
    return Option(default, rule, ok, is_float=True)


def bool_option(default: bool) -> Option:
    return Option(default, "must be true or false", lambda v: isinstance(v, bool))


def choice_option(default: str, choices: tuple[str, ...] | list[str]) -> Option:
    choices = tuple(choices)
    return Option(default, f"must be one of {list(choices)}", lambda v: v in choices)


def resolve_options(task: str, spec: dict[str, Option], given: Any) -> dict[str, Any]:
    """``given`` (the config's ``task_options``) checked against ``spec`` and completed with defaults."""
    if not isinstance(given, dict):
        raise config_error("task_options", given, f"must be a mapping of options of the {task} task")
    unknown = sorted(set(given) - set(spec))
    if unknown:
        raise config_error(
            f"task_options.{unknown[0]}", given[unknown[0]], f"unknown option of the {task} task; known: {sorted(spec)}"
        )
    out = {}
    for name, opt in spec.items():
        value = given.get(name, opt.default)
        if opt.is_int and isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if opt.is_float and not isinstance(value, bool):
            if _is_int(value):
                value = float(value)
            elif isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    pass
        if not opt.ok(value):
            raise config_error(f"task_options.{name}", value, opt.rule)
        out[name] = value
    return out


# ---------------------------------------------------------------------------------------------- task
class Task:
    """A task adapter (see the module docstring). Subclasses set the class attributes and implement
    :meth:`setup`, :meth:`forward` and :meth:`evaluate`."""

    name: ClassVar[str] = ""
    #: registry kinds of the models this task trains.
    kinds: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[dict[str, Option]] = {}
    #: named loss terms a micro-batch reports next to ``loss`` (logged as their own metrics fields).
    loss_parts: ClassVar[tuple[str, ...]] = ()
    #: the unit of the training loss (the y axis of loss.png).
    loss_unit: ClassVar[str] = "loss"
    #: whether the task reads ``data`` (a text corpus); ``loader`` / ``tbptt`` are for the lm task only.
    reads_text: ClassVar[bool] = False
    #: whether the run ends with an evaluation of a held-out test split.
    has_test: ClassVar[bool] = False

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.opts = cfg.task_opts
        self.source: BatchSource | None = None
        self.description = self.name  # what the run trains on, for the log
        self.details: str | None = None  # a longer account of the data (which files, which split), logged
        #: the checkpoint folder a resumed run continues (set by the loop before setup; None: a new run).
        self.resume_from: Path | None = None

    # ------------------------------------------------------------------ config time (no data loaded)
    @classmethod
    def resolve(cls, cfg: TrainConfig) -> dict[str, Any]:
        """Validated options with defaults; subclasses add rules across options and config fields."""
        return resolve_options(cls.name, cls.options, cfg.task_options)

    @classmethod
    def implied_model_config(cls, cfg: TrainConfig, opts: dict[str, Any]) -> dict[str, Any]:
        """Model-config fields the task fixes (the user's ``model_config`` is applied over them)."""
        return {}

    @classmethod
    def check_model_config(cls, model_config: BaseConfig, cfg: TrainConfig, opts: dict[str, Any]) -> None:
        """Refuse a model config the task cannot train (ValueError ``name=value: rule``)."""

    # ------------------------------------------------------------------ run time
    def setup(self, rank: int, world_size: int, device: torch.device) -> None:
        """Load the data, build the evaluation sets and ``self.source`` (this rank's batches)."""
        raise NotImplementedError

    def data_model_config(self) -> dict[str, Any]:
        """Model-config fields the data loaded by :meth:`setup` fixes (applied over every other override)."""
        return {}

    def check_model(self, model: nn.Module) -> None:
        """Refuse a built model the task cannot train (before step 1)."""

    def prepare_model(self, model: nn.Module) -> None:
        """Give the built model what it carries from the data (before step 1; the lm task: its tokenizer)."""

    def next_batch(self) -> Batch:
        """This rank's rows of the next global batch, a tuple of CPU tensors with the rows first."""
        return self.source.next_batch()

    def forward(self, model: nn.Module, micro: Batch, index: int) -> StepLoss:
        """The loss of micro-batch ``index`` (on the model's device) with ``model`` in training mode."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str = "val") -> dict[str, float]:
        """Metrics of ``split`` ("val", or "test" where :attr:`has_test`) in eval mode, without gradients."""
        raise NotImplementedError

    def should_stop(self, metrics: dict[str, float]) -> bool:
        """True ends the run after this evaluation (stopped_reason "target")."""
        return False

    def describe(self, metrics: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())

    def positions_per_step(self) -> int:
        """Sequence positions in one optimiser step (the ``tokens`` of the metrics and throughput)."""
        return self.cfg.batch_size * self.cfg.seq_len

    @property
    def eval_batch_size(self) -> int:
        return self.cfg.eval_batch_size or self.cfg.batch_size

    # ------------------------------------------------------------------ carried state (TBPTT)
    def state_dict(self) -> Any:
        """State the task carries across steps besides its batch source (None: none)."""
        return None

    def load_state_dict(self, state: Any, log: Callable[[str], None], distributed: bool) -> None:
        """Restore :meth:`state_dict` from a checkpoint."""


class GlobalRows:
    """Helper of batch sources that draw the whole GLOBAL batch on every rank (so generators stay in
    lock-step) and keep this rank's rows ``[rank * B / W, (rank + 1) * B / W)``."""

    def __init__(self, batch_size: int, rank: int, world_size: int) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size}: the global batch must be divisible by world_size={world_size}")
        self.batch_size = batch_size
        self.local = batch_size // world_size
        self.lo = rank * self.local

    def rows(self, *tensors: torch.Tensor) -> Batch:
        return tuple(t[self.lo : self.lo + self.local] for t in tensors)


class GeneratorSource:
    """A batch source drawing every global batch from one seeded ``torch.Generator`` with ``draw``
    (``draw(batch_size, generator) -> tuple of tensors``); its state is the generator's and a count."""

    kind = "generator"

    def __init__(self, draw: Callable, batch_size: int, seed: int, rank: int, world_size: int) -> None:
        self.draw = draw
        self.global_rows = GlobalRows(batch_size, rank, world_size)
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0

    def next_batch(self) -> Batch:
        self.step += 1
        return self.global_rows.rows(*self.draw(self.global_rows.batch_size, self.generator))

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "generator_state": self.generator.get_state().clone(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"loader state kind={state.get('kind')!r}: expected {self.kind!r}")
        self.generator.set_state(state["generator_state"].to(torch.uint8).cpu())
        self.step = int(state["step"])


def run_eval(model: nn.Module, batches, score: Callable) -> None:
    """Run ``score(model, batch)`` over ``batches`` in eval mode without gradients, restoring the mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                score(model, batch)
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
