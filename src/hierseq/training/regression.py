"""Training and evaluation for chunked sequence regressors (kind ``seq_regression``: HiSS and its controls).

The path: optional first differences appended to the inputs (the HiSS paper's preprocessing; causal,
since the difference at step t uses steps t and t - 1 only), per-channel input standardisation and
target standardisation fitted on the training split only, Adam on the model's masked MSE, and the best
validation checkpoint kept for the test evaluation. MSE is reported in standardised target units (so
it is comparable across tasks and channels: predicting the training mean scores about 1.0).

Models are reached only through the ``seq_regression`` contract: ``model(x, targets, target_mask)``
returns ``SeqRegressionOutput(prediction [B, n, D_out], loss)``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import check_positive_float, check_positive_int, config_error


@dataclass
class RegressionTrainConfig:
    """epochs x (N / batch_size) Adam steps; ``eval_every`` epochs a validation pass keeps the best weights."""

    epochs: int = 30
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    first_differences: bool = True
    normalize_inputs: bool = True
    normalize_targets: bool = True
    eval_every: int = 1
    seed: int = 0
    max_seconds: float = 0.0  # 0 = no wall-clock limit

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_every"):
            check_positive_int(name, getattr(self, name))
        check_positive_float("lr", self.lr)
        if not self.weight_decay >= 0:
            raise config_error("weight_decay", self.weight_decay, "must be >= 0")
        if not self.grad_clip >= 0:
            raise config_error("grad_clip", self.grad_clip, "must be >= 0 (0 = no clipping)")
        if not self.max_seconds >= 0:
            raise config_error("max_seconds", self.max_seconds, "must be >= 0 (0 = no limit)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    try:
        for start in range(0, data.x.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            part_total, part_count = _squared_error_sum(model(data.x[sl]).prediction, data.y[sl], data.mask[sl])
            total += part_total
            count += part_count
    finally:
        model.train(was_training)
    return total / max(count, 1.0)


def chunk_history_features(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Causal hand-made features for a linear reference. x: [N, T, D] -> [N, T // C, C * D + 2 * D + 2]:
    at the end of chunk k, the chunk's own C input steps, the running sum and the running double sum of
    the inputs (a linear integrator's state) up to that step, and the chunk's relative time and its square."""
    x = x.to(torch.float64)
    batch, length, d = x.shape
    n = length // chunk_size
    ends = torch.arange(chunk_size - 1, n * chunk_size, chunk_size)
    once = x.cumsum(dim=1) / length
    twice = once.cumsum(dim=1) / length
    time = (torch.arange(1, n + 1, dtype=torch.float64) / n).expand(batch, n)
    return torch.cat(
        (
            x[:, : n * chunk_size].reshape(batch, n, chunk_size * d),
            once[:, ends],
            twice[:, ends],
            time.unsqueeze(-1),
            time.unsqueeze(-1) ** 2,
        ),
        dim=-1,
    )


class LinearChunkBaseline:
    """Ridge regression from :func:`chunk_history_features` to the targets: what a linear integrator can
    do with the same inputs and alignment as the models. ``fit`` picks the ridge strength on ``val``."""

    RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # times the number of labelled training chunks

    def __init__(self, chunk_size: int) -> None:
        check_positive_int("chunk_size", chunk_size)
        self.chunk_size = chunk_size
        self.features: Standardizer | None = None
        self.weight: torch.Tensor | None = None
        self.ridge: float | None = None

    def _design(self, x: torch.Tensor) -> torch.Tensor:
        assert self.features is not None
        f = self.features(chunk_history_features(x, self.chunk_size))
        return torch.cat((f, torch.ones(*f.shape[:-1], 1, dtype=f.dtype)), dim=-1)

    def fit(self, train: RegressionData, val: RegressionData) -> LinearChunkBaseline:
        raw = chunk_history_features(train.x, self.chunk_size)
        self.features = Standardizer.fit(raw, train.mask)
        design = self._design(train.x)[train.mask]
        target = train.y.to(torch.float64)[train.mask]
        gram, rhs = design.T @ design, design.T @ target
        best = (math.inf, None, None)
        for ridge in self.RIDGES:
            reg = ridge * design.shape[0] * torch.eye(gram.shape[0], dtype=gram.dtype)
            reg[-1, -1] = 0.0  # no penalty on the bias
            self.weight = torch.linalg.solve(gram + reg, rhs)
            score = prediction_mse(self.predict(val.x), val)
            if score < best[0]:
                best = (score, ridge, self.weight)
        _, self.ridge, self.weight = best
        return self

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, T, D] model inputs -> [N, T // C, D_out] (standardised target units)."""
        if self.weight is None:
            raise RuntimeError("LinearChunkBaseline: call fit() first")
        return self._design(x) @ self.weight


def train_regression(
    model: nn.Module, train: RegressionData, val: RegressionData | None, cfg: RegressionTrainConfig
) -> dict[str, Any]:
    """Adam on ``model(x, targets, target_mask).loss``; keeps the weights with the best validation MSE.

    Returns {"history": [{"epoch", "train_mse", "val_mse", "seconds"}], "best_val_mse", "best_epoch",
    "steps", "seconds"}. The model ends holding the best weights (or the last, without ``val``).
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = train.x.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    # Cosine decay to 10% over the run: the same schedule for every model in a comparison.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
    )
    history: list[dict[str, float]] = []
    best = (math.inf, -1, None)
    start_time = time.perf_counter()
    steps = 0
    model.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        running, batches = 0.0, 0
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            out = model(train.x[idx], targets=train.y[idx], target_mask=train.mask[idx])
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            running += float(out.loss.detach())
            batches += 1
            steps += 1
        record = {"epoch": epoch + 1, "train_mse": running / batches, "seconds": time.perf_counter() - start_time}
        last_epoch = epoch + 1 == cfg.epochs
        out_of_time = cfg.max_seconds > 0 and record["seconds"] > cfg.max_seconds
        if val is not None and ((epoch + 1) % cfg.eval_every == 0 or last_epoch or out_of_time):
            record["val_mse"] = evaluate_regression(model, val)
            if record["val_mse"] < best[0]:
                best = (record["val_mse"], epoch + 1, copy.deepcopy(model.state_dict()))
        history.append(record)
        if out_of_time:
            break
    if best[2] is not None:
        model.load_state_dict(best[2])
    return {
        "history": history,
        "best_val_mse": best[0] if best[2] is not None else None,
        "best_epoch": best[1],
        "steps": steps,
        "seconds": time.perf_counter() - start_time,
    }


def run_regression_config(config: dict[str, Any] | str | Path) -> dict[str, Any]:
    """Train and test one seq_regression model on a synthetic signal task, from a YAML file or dict
    (see configs/hiss_*.yaml: ``model``, ``model_config``, ``task``, ``data``, ``train``, ``out_dir``).

    Writes ``result.json`` and the model (``hierseq.save``) under ``out_dir``; returns the result dict
    (test MSE in standardised target units, training history).
    """
    import yaml

    from ..data.signals import make_signal_splits
    from ..registry import build_model
    from ..serialization import save

    if not isinstance(config, dict):
        config = yaml.safe_load(Path(config).read_text()) or {}
    known = {"model", "model_config", "task", "data", "train", "out_dir"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise config_error(unknown[0], config[unknown[0]], f"unknown key; known keys: {sorted(known)}")
    data_cfg = dict(config.get("data") or {})
    sizes = [data_cfg.pop(k, d) for k, d in (("n_train", 384), ("n_val", 64), ("n_test", 128))]
    seed = data_cfg.pop("seed", 0)
    train_set, val_set, test_set = make_signal_splits(
        config.get("task", "imu_integration"), *sizes, seed=seed, **data_cfg
    )
    cfg = RegressionTrainConfig(**(config.get("train") or {}))
    prep = RegressionPreprocessor(cfg.first_differences, cfg.normalize_inputs, cfg.normalize_targets)
    prep.fit(train_set.x, train_set.y, train_set.mask)
    train, val, test = (prep.transform(s.x, s.y, s.mask) for s in (train_set, val_set, test_set))
    torch.manual_seed(cfg.seed)
    model = build_model(config.get("model", "hiss"), **(config.get("model_config") or {}))
    fit = train_regression(model, train, val, cfg)
    result = {"test_mse": evaluate_regression(model, test), **fit, "config": config}
    out = Path(config.get("out_dir", "runs/regression"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    save(model, out / "model")
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Train a seq_regression model on a synthetic signal task")
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/hiss_imu.yaml")
    args = parser.parse_args()
    res = run_regression_config(args.config)
    print(f"test MSE {res['test_mse']:.4f} (standardised units), best val {res['best_val_mse']:.4f}")
