"""Training and evaluation of masked autoencoders (registry kind ``masked_ae``: ``hama``, ``flat_mae``).

Two tasks:

* ``bytes``: byte windows of a corpus (the embedded Austen novels by default); the model sees the text
  with some bytes hidden and is scored by masked-byte cross-entropy (nats) and accuracy.
* ``signal``: continuous multichannel signals (sums of random sinusoids plus noise, generated from a
  seed); scored by the MSE on masked positions, next to the MSE of predicting each sequence's
  per-channel mean (``mean_baseline_mse``), so a model that has learned nothing scores ratio ~1.

Entry point: ``train_masked(cfg) -> dict`` with a :class:`MaskedTrainConfig` (or a dict / keyword
overrides). Evaluation always runs the model in eval mode, where masks are deterministic.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from ..config import config_error
from ..registry import build_config, build_model, count_parameters, get_entry

TASKS = ("bytes", "signal")


# =============================================================================================== config
@dataclass
class MaskedTrainConfig:
    """A masked-autoencoder training run; validated on construction."""

    model: str = "hama"  # a registered masked_ae model
    model_config: dict = field(default_factory=dict)  # overrides of the model config
    task: str = "bytes"  # "bytes" | "signal"
    data: str | None = None  # bytes task: None = embedded corpus, else a text file or folder
    seq_len: int = 256
    batch_size: int = 16
    max_steps: int = 500
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # 0 = off
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int = 8
    eval_batch_size: int = 16
    log_every: int = 50
    seed: int = 0
    signal_channels: int = 8
    max_time_s: float = 0.0  # 0 = no limit
    out_dir: str | None = None  # metrics.jsonl, result.json and the model (hierseq.save) when set

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # YAML may give ints or strings for float fields
            value = getattr(self, f.name)
            if f.type in ("float", float) and isinstance(value, (int, str)) and not isinstance(value, bool):
                try:
                    setattr(self, f.name, float(value))
                except ValueError:
                    pass
        self.validate()

    def validate(self) -> None:
        entry = get_entry(self.model)
        if entry.kind != "masked_ae":
            raise config_error("model", self.model, f"is a {entry.kind} model; train_masked trains masked_ae models")
        if self.task not in TASKS:
            raise config_error("task", self.task, f"must be one of {list(TASKS)}")
        if not isinstance(self.model_config, dict):
            raise config_error("model_config", self.model_config, "must be a mapping of model config fields")
        build_config(self.model, **self.model_overrides())
        for name in ("seq_len", "batch_size", "max_steps", "eval_batches", "eval_batch_size", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise config_error(name, value, "must be a positive integer")
        for name in ("warmup_steps", "eval_every", "seed", "signal_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise config_error(name, value, "must be a non-negative integer")
        if self.task == "signal" and self.signal_channels < 1:
            raise config_error("signal_channels", self.signal_channels, "must be >= 1 for the signal task")
        for name, lo in (("lr", 0.0), ("weight_decay", 0.0), ("grad_clip", 0.0), ("max_time_s", 0.0)):
            value = getattr(self, name)
            if not isinstance(value, float) or not math.isfinite(value) or value < lo or (name == "lr" and value == 0):
                raise config_error(name, value, "must be a finite number >= 0" + (" and > 0" if name == "lr" else ""))
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise config_error("min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")

    def model_overrides(self) -> dict[str, Any]:
        """Model config overrides; the signal task makes the model continuous with d_input = channels."""
        over = dict(self.model_config)
        if self.task == "signal":
            over.setdefault("input_type", "continuous")
            over.setdefault("d_input", self.signal_channels)
        return over

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MaskedTrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise config_error(unknown[0], data[unknown[0]], f"unknown field; known fields: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> MaskedTrainConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise config_error("yaml", type(data).__name__, "top level must be a mapping")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ================================================================================================= data
class SignalTask:
    """Continuous sequences [B, L, C]: every channel is a sum of ``n_components`` sinusoids with random
    periods (8 .. 128 steps), phases and amplitudes, plus Gaussian noise of std ``noise``; the
    expected per-step variance is about 1. Generated from a ``torch.Generator``, so a seed fixes them."""

    def __init__(self, channels: int, n_components: int = 3, noise: float = 0.05) -> None:
        self.channels, self.n_components, self.noise = channels, n_components, noise

    def sample(self, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
        shape = (batch, 1, self.channels, self.n_components)
        log_period = math.log(8) + (math.log(128) - math.log(8)) * torch.rand(shape, generator=generator)
        freq = 2 * math.pi / log_period.exp()
        phase = 2 * math.pi * torch.rand(shape, generator=generator)
        amp = 0.5 + torch.rand(shape, generator=generator)
        t = torch.arange(length, dtype=torch.float32)[None, :, None, None]
        x = (amp * torch.sin(freq * t + phase)).sum(-1)  # [B, L, C]
        # E[amp^2] = 13/12 for amp ~ U(0.5, 1.5) and E[sin^2] = 1/2: unit variance per channel.
        x = x / math.sqrt(self.n_components * 0.5 * 13 / 12)
        return x + self.noise * torch.randn(x.shape, generator=generator)


def byte_batches(tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int) -> Iterator[torch.Tensor]:
    """Random byte windows [B, L] (long) from ``tokens`` forever (uses the data package's loader)."""
    from ..data.loaders import RandomWindowLoader

    loader = RandomWindowLoader(tokens, batch_size, seq_len, seed)
    while True:
        yield loader.next_batch()[0]


def eval_byte_batches(tokens: torch.Tensor, batch_size: int, seq_len: int, max_batches: int) -> list[torch.Tensor]:
    """Deterministic, evenly spread windows [b, L] of an evaluation split."""
    from ..data.loaders import eval_windows

    return [ids for ids, _ in eval_windows(tokens, batch_size, seq_len, max_batches)]


def signal_batches(task: SignalTask, batch_size: int, seq_len: int, seed: int) -> Iterator[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield task.sample(batch_size, seq_len, gen)


# =========================================================================================== evaluation
@torch.no_grad()
def evaluate_masked(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """Metrics over ``batches`` in eval mode (deterministic masks), pooled over masked positions.

    Tokens: ``masked_ce`` (nats), ``masked_acc``, ``all_acc``. Continuous: ``masked_mse``, ``all_mse``,
    ``mean_baseline_mse`` (predicting each sequence's per-channel mean at its masked positions) and
    ``mse_ratio`` = masked_mse / mean_baseline_mse. Plus ``mask_fraction`` and ``loss`` (mean model loss).
    """
    was_training = model.training
    model.eval()
    tokens = model.config.input_type == "tokens"
    sums: dict[str, float] = {}
    n_masked = n_all = 0
    losses = []
    try:
        for x in batches:
            out = model(x)
            losses.append(float(out.loss))
            mask = out.mask
            n_masked += int(mask.sum())
            n_all += mask.numel()
            rec = out.reconstruction.float()
            if tokens:
                ce = F.cross_entropy(rec[mask], x[mask], reduction="sum")
                correct = rec.argmax(-1) == x
                sums["masked_ce"] = sums.get("masked_ce", 0.0) + float(ce)
                sums["masked_acc"] = sums.get("masked_acc", 0.0) + float(correct[mask].sum())
                sums["all_acc"] = sums.get("all_acc", 0.0) + float(correct.sum())
            else:
                err = (rec - x).pow(2).mean(-1)  # [B, L]
                base = (x - x.mean(1, keepdim=True)).pow(2).mean(-1)
                sums["masked_mse"] = sums.get("masked_mse", 0.0) + float(err[mask].sum())
                sums["all_mse"] = sums.get("all_mse", 0.0) + float(err.sum())
                sums["mean_baseline_mse"] = sums.get("mean_baseline_mse", 0.0) + float(base[mask].sum())
    finally:
        model.train(was_training)
    per_masked = max(n_masked, 1)
    result = {k: v / (n_all if k.startswith("all_") else per_masked) for k, v in sums.items()}
    if not tokens:
        result["mse_ratio"] = result["masked_mse"] / max(result["mean_baseline_mse"], 1e-12)
    result["mask_fraction"] = n_masked / max(n_all, 1)
    result["loss"] = sum(losses) / max(len(losses), 1)
    return result


# ============================================================================================= training
def _lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train_masked(
    cfg: MaskedTrainConfig | dict[str, Any] | None = None,
    log: Callable[[str], None] | None = print,
    **overrides: Any,
) -> dict[str, Any]:
    """Train a masked autoencoder; returns ``{"config", "params", "steps", "train_time_s", "history",
    "final", "model"}`` where ``final`` holds :func:`evaluate_masked` metrics on the validation data and
    ``model`` is the trained module (left out of result.json)."""
    if cfg is None:
        cfg = MaskedTrainConfig(**overrides)
    elif isinstance(cfg, dict):
        cfg = MaskedTrainConfig.from_dict({**cfg, **overrides})
    elif overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, **cfg.model_overrides())
    params = count_parameters(model)
    if cfg.task == "bytes":
        from ..data.corpora import load_corpus

        corpus = load_corpus(cfg.data)
        train_iter = byte_batches(corpus.train, cfg.batch_size, cfg.seq_len, cfg.seed)
        val = eval_byte_batches(corpus.val, cfg.eval_batch_size, cfg.seq_len, cfg.eval_batches)
    else:
        task = SignalTask(cfg.signal_channels)
        train_iter = signal_batches(task, cfg.batch_size, cfg.seq_len, cfg.seed)
        # Validation signals come from a different seed stream than any training seed.
        val_gen = torch.Generator().manual_seed(10_000 + cfg.seed)
        val = [task.sample(cfg.eval_batch_size, cfg.seq_len, val_gen) for _ in range(cfg.eval_batches)]

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    )
    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.jsonl").write_text("")
    history: list[dict[str, Any]] = []

    def record(event: dict[str, Any]) -> None:
        history.append(event)
        if out_dir:
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(event) + "\n")

    model.train()
    t0 = time.perf_counter()
    step = 0
    recent: list[float] = []
    while step < cfg.max_steps:
        x = next(train_iter)
        loss = model(x).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: loss is {loss.item()} (model {cfg.model}, lr {cfg.lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        recent.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            event = {"step": step, "train_loss": sum(recent) / len(recent), "time_s": time.perf_counter() - t0}
            recent.clear()
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                event.update({f"val_{k}": v for k, v in evaluate_masked(model, val).items()})
            record(event)
            if log:
                log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in event.items()))
        if cfg.max_time_s and time.perf_counter() - t0 > cfg.max_time_s:
            break
    train_time = time.perf_counter() - t0
    final = evaluate_masked(model, val)
    record({"step": step, **{f"val_{k}": v for k, v in final.items()}})
    result = {
        "config": cfg.to_dict(),
        "model_name": cfg.model,
        "params": params,
        "steps": step,
        "train_time_s": train_time,
        "history": history,
        "final": final,
    }
    if log:
        log(f"{cfg.model} {cfg.task}: " + ", ".join(f"{k}={v:.4g}" for k, v in final.items()))
    if out_dir:
        import hierseq

        hierseq.save(model, out_dir / "model")
        (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    result["model"] = model
    return result
