"""``TrainConfig``: one run of any model kind, validated on construction (``ValueError("name=value: rule")``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import config_error
from ..data.tokenizer import BYTES, check_tokenizer_spec
from ..registry import build_config, get_entry
from .run_dir import canonical_data
from .tasks import DEFAULT_TASKS, TASKS, task_class


@dataclass
class TrainConfig:
    """Everything a training run needs. ``task`` (null: the model kind's default, see
    :data:`hierseq.training.tasks.DEFAULT_TASKS`) picks the task adapter; ``task_options`` are its
    options (each adapter documents and validates them)."""

    model: str = "transformer"  # registry name
    model_config: dict = field(default_factory=dict)  # overrides of the model config fields
    task: str | None = None  # "lm" | "mqar" | "masked_bytes" | "masked_signal" | "regression"; null = kind's default
    task_options: dict = field(default_factory=dict)
    data: str | None = None  # text tasks: None = embedded Austen; else a text file or folder (~ expanded,
    # recorded as an absolute path: the run's record of its corpus, see run_dir.canonical_data), or a
    # Hugging Face dataset "hf:<dataset>[:<config>][@<split>]" (hub or local files; extra "data")
    tokenizer: str = "bytes"  # lm task: "bytes" | "bpe:<vocab_size>" (trained on the train split) |
    # "hf:<tokenizer.json, folder or hub name>"; sets the model's vocab_size and is saved with the model
    seq_len: int = 256
    batch_size: int = 16  # GLOBAL sequences per optimiser step (split over DDP ranks and micro-steps)
    grad_accum: int = 1
    max_steps: int = 1000
    max_time_s: float = 0.0  # 0 = no limit; else stop cleanly (final eval + save) after this wall time
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    eval_every: int = 200  # 0 = only at the end
    eval_batches: int = 20
    eval_batch_size: int = 0  # 0 = batch_size
    log_every: int = 10
    save_every: int = 200  # 0 = only at the end
    keep_best: bool = False  # the final model is the one of the evaluation with the lowest val loss
    out_dir: str = "runs/train"
    seed: int = 0
    loader: str = "random"  # lm task: "random" | "stream"
    tbptt: bool = False  # lm task: stream loader + carry the model's cache (detached) across batches
    resume: bool = False
    progress: bool = True  # tqdm bar with loss and tokens/s
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    schedule_steps: int = 0  # length of the warmup+cosine schedule; 0 = max_steps. Set it to stop a run
    # early (max_steps < schedule_steps) and later extend it with resume on the same schedule.

    def __post_init__(self) -> None:
        self._coerce()
        self.validate()

    # ------------------------------------------------------------------ validation
    def _coerce(self) -> None:
        """YAML 1.1 reads ``1e-3`` as a string and ``2`` as an int: accept both for float fields; and
        an integral number written as a float (``max_steps=1e3``, ``2.0``) for int fields."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                continue
            if f.type in ("float", float):
                if isinstance(value, int):
                    setattr(self, f.name, float(value))
                elif isinstance(value, str):
                    try:
                        setattr(self, f.name, float(value))
                    except ValueError:
                        pass  # validate() names the field
            elif f.type in ("int", int):
                integral = _integral(value)
                if integral is not None:
                    setattr(self, f.name, integral)
        if isinstance(self.data, Path):
            self.data = str(self.data)
        if isinstance(self.out_dir, Path):
            self.out_dir = str(self.out_dir)

    def validate(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise config_error("model", self.model, "must be a registered model name")
        kind = get_entry(self.model).kind  # unknown name -> the registry's ValueError listing the models
        if self.task is None:
            self.task = DEFAULT_TASKS[kind]
        if self.task not in TASKS:
            raise config_error("task", self.task, f"must be one of {sorted(TASKS)} (or null: the model kind's default)")
        task = task_class(self.task)
        if kind not in task.kinds:
            raise config_error("task", self.task, f"trains {' / '.join(task.kinds)} models; {self.model} is a {kind}")
        if not isinstance(self.model_config, dict):
            raise config_error("model_config", self.model_config, "must be a mapping of model config fields")
        if self.data is not None and (not isinstance(self.data, str) or not self.data):
            raise config_error("data", self.data, "must be null (embedded corpus) or a file/folder path")
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_batches", "log_every"):
            _check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "eval_every", "eval_batch_size", "save_every", "seed", "schedule_steps"):
            _check_int(name, getattr(self, name), 0)
        if self.batch_size % self.grad_accum:
            raise config_error("batch_size", self.batch_size, f"must be divisible by grad_accum={self.grad_accum}")
        _check_float("lr", self.lr, 0.0, math.inf, low_open=True)
        _check_float("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _check_float("max_time_s", self.max_time_s, 0.0, math.inf)
        _check_float("weight_decay", self.weight_decay, 0.0, math.inf)
        _check_float("beta1", self.beta1, 0.0, 1.0, high_open=True)
        _check_float("beta2", self.beta2, 0.0, 1.0, high_open=True)
        _check_float("grad_clip", self.grad_clip, 0.0, math.inf)
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise config_error("out_dir", self.out_dir, "must be a non-empty path")
        if self.loader not in ("random", "stream"):
            raise config_error("loader", self.loader, "must be one of ['random', 'stream']")
        for name in ("tbptt", "resume", "progress", "keep_best"):
            if not isinstance(getattr(self, name), bool):
                raise config_error(name, getattr(self, name), "must be true or false")
        if self.tbptt and self.loader != "stream":
            raise config_error("tbptt", self.tbptt, "needs loader='stream' (carried state must see contiguous text)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise config_error("device", self.device, "must be one of ['auto', 'cpu', 'cuda']")
        if not task.reads_text and self.data is not None:
            raise config_error("data", self.data, f"the {self.task} task reads no text corpus (see its task_options)")
        self.tokenizer = check_tokenizer_spec(self.tokenizer)
        if self.task != "lm" and self.tokenizer != BYTES:
            raise config_error("tokenizer", self.tokenizer, f"is an lm task field; the {self.task} task has none")
        if self.task != "lm":
            for name, default in (("loader", "random"), ("tbptt", False)):
                if getattr(self, name) != default:
                    raise config_error(name, getattr(self, name), f"is an lm task field; the {self.task} task has none")
        self._task_opts = task.resolve(self)
        model_config = build_config(self.model, **self.model_overrides())  # names the bad model field
        task.check_model_config(model_config, self, self._task_opts)
        # Recorded as an absolute path (the run directory's record of its corpus; see run_dir).
        self.data = canonical_data(self.data)

    @property
    def task_opts(self) -> dict[str, Any]:
        """The task's options: ``task_options`` checked and completed with the task's defaults."""
        return dict(self._task_opts)

    def model_overrides(self) -> dict[str, Any]:
        """The model config overrides of the run: what the task implies, then ``model_config`` over it."""
        implied = task_class(self.task).implied_model_config(self, self._task_opts)
        return {**implied, **self.model_config}

    # ------------------------------------------------------------------ dict / YAML
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        if not isinstance(data, dict):
            raise config_error("config", type(data).__name__, "must be a mapping of TrainConfig fields")
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise config_error(
                unknown[0], data[unknown[0]], f"unknown TrainConfig field; known fields: {cls.field_names()}"
            )
        data = {k: v for k, v in data.items() if not (k in ("model_config", "task_options") and v is None)}
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(load_yaml_mapping(path))

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def replace(self, **overrides: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **overrides})


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file (one-line errors for a missing file or bad YAML)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config={str(path)!r}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config={str(path)!r}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise config_error("config", str(path), "top level must be a mapping of TrainConfig fields")
    return data


def _integral(value: Any) -> int | None:
    """``value`` as an int when it is an integral float or a number string (``1e3``, ``"1e3"``, ``2.0``)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        rule = "must be a positive integer" if minimum == 1 else f"must be an integer >= {minimum}"
        raise config_error(name, value, rule)


def _check_float(
    name: str, value: Any, low: float, high: float, low_open: bool = False, high_open: bool = False
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = ("(" if low_open else "[") + f"{low}", f"{high}" + (")" if high_open else "]")
        raise config_error(name, value, f"must be a number in {lo}, {hi}")
