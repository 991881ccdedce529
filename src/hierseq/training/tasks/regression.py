"""The ``regression`` task: chunked sequence regressors (kind ``seq_regression``: HiSS and its controls) on
a synthetic sensor task of :mod:`hierseq.data.signals`.

Data: ``n_train`` / ``n_val`` / ``n_test`` sequences of ``seq_len`` steps of task ``signal`` drawn from
``data_seed``. Preprocessing (the HiSS paper's): optional first differences appended to the inputs
(causal: the difference at step t uses steps t and t - 1 only), per-channel input standardisation and
target standardisation fitted on the training split only. The model's ``d_in`` / ``d_out`` /
``chunk_size`` follow from the task. Training batches are epochs of a seeded permutation of the training
sequences (a last partial batch is dropped); the permutation, the position in it and the generator state
are checkpointed. MSE is reported in standardised target units (predicting the training mean scores
about 1.0), on the validation split during training and on the test split at the end.

Options: ``signal`` (a :data:`~hierseq.data.signals.SIGNAL_TASKS` name), ``n_train`` (1024), ``n_val``
(64), ``n_test`` (256), ``data_seed`` (1000), ``chunk_size`` (10), ``noise`` (0.05), ``label_dropout``
(0.0), ``first_differences``, ``normalize_inputs``, ``normalize_targets`` (all true).

Models are reached only through the ``seq_regression`` contract: ``model(x, targets, target_mask)``
returns ``SeqRegressionOutput(prediction [B, n, D_out], loss)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ...config import BaseConfig, config_error
from ...data.signals import SIGNAL_TASKS, SignalTask, make_signal_splits, make_signal_task
from .base import (
    Batch,
    GlobalRows,
    StepLoss,
    Task,
    bool_option,
    choice_option,
    float_option,
    int_option,
    model_device,
    run_eval,
)


def add_first_differences(x: torch.Tensor) -> torch.Tensor:
    """x: [B, T, D] -> [B, T, 2D]: x and x_t - x_{t-1} (0 at t = 0, so no step looks ahead)."""
    diff = torch.diff(x, dim=1, prepend=x[:, :1])
    return torch.cat((x, diff), dim=-1)


@dataclass
class Standardizer:
    """Per-channel affine standardisation: (v - mean) / std. mean, std: [D]."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, values: torch.Tensor, mask: torch.Tensor | None = None, enabled: bool = True) -> Standardizer:
        """values: [N, T, D] (statistics over N and T); mask: [N, T] selects the entries that count."""
        d = values.shape[-1]
        if not enabled:
            return cls(torch.zeros(d), torch.ones(d))
        flat = values.reshape(-1, d) if mask is None else values[mask.bool()]
        std = flat.std(dim=0, unbiased=False)
        return cls(flat.mean(dim=0), torch.where(std > 1e-8, std, torch.ones_like(std)))

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        return (values - self.mean.to(values)) / self.std.to(values)

    def inverse(self, values: torch.Tensor) -> torch.Tensor:
        return values * self.std.to(values) + self.mean.to(values)


@dataclass
class RegressionData:
    """Model-ready tensors. x: [N, T, D_in'] (after differences and standardisation); y: [N, n, D_out]
    (standardised); mask: [N, n] bool."""

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor


class RegressionPreprocessor:
    """Fits input / target statistics on a training split and applies them to any split."""

    def __init__(self, first_differences: bool = True, normalize_inputs: bool = True, normalize_targets: bool = True):
        self.first_differences = first_differences
        self.normalize_inputs = normalize_inputs
        self.normalize_targets = normalize_targets
        self.inputs: Standardizer | None = None
        self.targets: Standardizer | None = None

    def input_dim(self, d_in: int) -> int:
        """Width of the model input for raw inputs of width ``d_in``."""
        return 2 * d_in if self.first_differences else d_in

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return add_first_differences(x) if self.first_differences else x

    def fit(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, mask: Any) -> RegressionPreprocessor:
        x, y, mask = _as_tensors(x, y, mask)
        self.inputs = Standardizer.fit(self._features(x), enabled=self.normalize_inputs)
        self.targets = Standardizer.fit(y, mask, enabled=self.normalize_targets)
        return self

    def transform(self, x: Any, y: Any, mask: Any) -> RegressionData:
        if self.inputs is None or self.targets is None:
            raise RuntimeError("RegressionPreprocessor: call fit() on the training split first")
        x, y, mask = _as_tensors(x, y, mask)
        return RegressionData(self.inputs(self._features(x)), self.targets(y), mask)


def _as_tensors(x: Any, y: Any, mask: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float32)
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y, dtype=torch.float32)
    mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).bool()
    if x.dim() != 3 or y.dim() != 3 or mask.shape != y.shape[:2] or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"data: x {tuple(x.shape)}, y {tuple(y.shape)}, mask {tuple(mask.shape)}: "
            "need x [N, T, D_in], y [N, n, D_out], mask [N, n]"
        )
    return x, y, mask


def _squared_error_sum(pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(sum of squared errors over the labelled targets, number of labelled values). pred, y: [N, n, D]."""
    m = mask.unsqueeze(-1).expand_as(pred).to(pred.dtype)
    return float(((pred - y.to(pred.dtype)).pow(2) * m).sum()), float(m.sum())


def prediction_mse(prediction: Any, data: RegressionData) -> float:
    """Masked MSE of a given prediction [N, n, D_out] (standardised units, like ``data.y``) - for
    estimators that are not models (mean predictor, linear and analytic references)."""
    total, count = _squared_error_sum(torch.as_tensor(np.asarray(prediction), dtype=torch.float64), data.y, data.mask)
    return total / max(count, 1.0)


@torch.no_grad()
def evaluate_regression(model: nn.Module, data: RegressionData, batch_size: int = 32) -> float:
    """Masked MSE over all labelled targets of ``data`` (standardised units), in eval mode."""
    device = model_device(model)
    sums = [0.0, 0.0]

    def score(model: nn.Module, start: int) -> None:
        sl = slice(start, start + batch_size)
        pred = model(data.x[sl].to(device)).prediction
        total, count = _squared_error_sum(pred, data.y[sl].to(device), data.mask[sl].to(device))
        sums[0] += total
        sums[1] += count

    run_eval(model, range(0, data.x.shape[0], batch_size), score)
    return sums[0] / max(sums[1], 1.0)


@dataclass
class RegressionSplits:
    """One draw of a regression task: the raw splits, the preprocessor fitted on train, model-ready data."""

    raw: tuple[SignalTask, SignalTask, SignalTask]
    prep: RegressionPreprocessor
    train: RegressionData
    val: RegressionData
    test: RegressionData


def prepare_regression(opts: dict[str, Any], length: int) -> RegressionSplits:
    """The data of the regression task with options ``opts`` and sequences of ``length`` steps."""
    raw = make_signal_splits(
        opts["signal"],
        opts["n_train"],
        opts["n_val"],
        opts["n_test"],
        seed=opts["data_seed"],
        length=length,
        **{k: opts[k] for k in ("chunk_size", "noise", "label_dropout")},
    )
    prep = RegressionPreprocessor(opts["first_differences"], opts["normalize_inputs"], opts["normalize_targets"])
    prep.fit(raw[0].x, raw[0].y, raw[0].mask)
    train, val, test = (prep.transform(s.x, s.y, s.mask) for s in raw)
    return RegressionSplits(raw, prep, train, val, test)


class EpochSource:
    """Batches of a seeded permutation of ``n`` training rows, epoch after epoch (a last partial batch is
    dropped). The state is the current permutation, the position in it, the epoch and the generator."""

    kind = "epochs"

    def __init__(self, data: RegressionData, batch_size: int, seed: int, rank: int, world_size: int) -> None:
        self.data = data
        self.n = data.x.shape[0]
        self.global_rows = GlobalRows(batch_size, rank, world_size)
        self.generator = torch.Generator().manual_seed(seed)
        self.order: torch.Tensor | None = None
        self.position = self.epoch = 0

    def next_batch(self) -> Batch:
        size = self.global_rows.batch_size
        if self.order is None or self.position + size > self.n:
            self.order = torch.randperm(self.n, generator=self.generator)
            self.position = 0
            self.epoch += 1
        (idx,) = self.global_rows.rows(self.order[self.position : self.position + size])
        self.position += size
        return self.data.x[idx], self.data.y[idx], self.data.mask[idx]

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "generator_state": self.generator.get_state().clone(),
            "order": None if self.order is None else self.order.clone(),
            "position": self.position,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"loader state kind={state.get('kind')!r}: expected {self.kind!r}")
        self.generator.set_state(state["generator_state"].to(torch.uint8).cpu())
        self.order = None if state["order"] is None else state["order"].long().cpu()
        self.position, self.epoch = int(state["position"]), int(state["epoch"])


class RegressionTask(Task):
    name = "regression"
    kinds = ("seq_regression",)
    loss_unit = "MSE (standardised)"
    has_test = True
    options = {
        "signal": choice_option("imu_integration", sorted(SIGNAL_TASKS)),
        "n_train": int_option(1024, 1),
        "n_val": int_option(64, 1),
        "n_test": int_option(256, 1),
        "data_seed": int_option(1000, 0),
        "chunk_size": int_option(10, 1),
        "noise": float_option(0.05, 0.0, math.inf),
        "label_dropout": float_option(0.0, 0.0, 0.99),
        "first_differences": bool_option(True),
        "normalize_inputs": bool_option(True),
        "normalize_targets": bool_option(True),
    }

    @classmethod
    def resolve(cls, cfg) -> dict[str, Any]:
        opts = super().resolve(cfg)
        if cfg.seq_len < opts["chunk_size"]:
            rule = f"the regression task needs seq_len >= task_options.chunk_size={opts['chunk_size']}"
            raise config_error("seq_len", cfg.seq_len, rule)
        if cfg.batch_size > opts["n_train"]:
            rule = f"must be <= task_options.n_train={opts['n_train']} (batches are drawn from the training split)"
            raise config_error("batch_size", cfg.batch_size, rule)
        return opts

    @classmethod
    def implied_model_config(cls, cfg, opts: dict[str, Any]) -> dict[str, Any]:
        chunk = opts["chunk_size"]
        one = make_signal_task(opts["signal"], 1, seed=0, length=chunk, chunk_size=chunk)  # just the widths
        d_in = 2 * one.d_in if opts["first_differences"] else one.d_in
        return {"d_in": d_in, "d_out": one.d_out, "chunk_size": chunk}

    @classmethod
    def check_model_config(cls, model_config: BaseConfig, cfg, opts) -> None:
        for name, value in cls.implied_model_config(cfg, opts).items():
            if getattr(model_config, name) == value:
                continue
            if name == "chunk_size":
                rule = (
                    f"the regression task sets it from task_options.chunk_size={value} (the targets come one per "
                    f"chunk); set --set task.chunk_size={getattr(model_config, name)} instead"
                )
            else:
                rule = (
                    f"follows from the regression task (signal {opts['signal']!r}, first_differences="
                    f"{str(opts['first_differences']).lower()}: {name}={value}); leave the model field unset"
                )
            raise config_error(f"model_config.{name}", getattr(model_config, name), rule)

    def setup(self, rank: int, world_size: int, device: torch.device) -> None:
        cfg = self.cfg
        self.splits = prepare_regression(self.opts, cfg.seq_len)
        self.description = f"{self.opts['signal']} ({self.opts['n_train']} training sequences)"
        self.source = EpochSource(self.splits.train, cfg.batch_size, cfg.seed, rank, world_size)

    def forward(self, model: nn.Module, micro: Batch, index: int) -> StepLoss:
        x, y, mask = micro
        return StepLoss(model(x, targets=y, target_mask=mask).loss)

    def evaluate(self, model: nn.Module, split: str = "val") -> dict[str, float]:
        """The masked MSE of the whole split (standardised units); ``eval_batches`` does not apply."""
        mse = evaluate_regression(model, getattr(self.splits, split), self.eval_batch_size)
        return {"loss": mse, "mse": mse}

    def describe(self, metrics: dict[str, float]) -> str:
        return f"mse {metrics['mse']:.4f} (standardised)"
