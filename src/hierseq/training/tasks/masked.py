"""Masked-autoencoder tasks (registry kind ``masked_ae``: ``hama``, ``flat_mae``).

* ``masked_bytes``: byte windows of a corpus (``data``; the embedded Austen novels by default); the
  model sees the text with some bytes hidden and is scored by masked-byte cross-entropy (nats) and
  accuracy on the validation split.
* ``masked_signal``: continuous multichannel signals (:class:`SinusoidSignals`: sums of random
  sinusoids plus noise) generated from a seed; scored by the MSE on masked positions next to the MSE of
  predicting each sequence's per-channel mean (``mean_baseline_mse``), so a model that has learned
  nothing scores ``mse_ratio`` ~1. It makes the model continuous with ``channels`` inputs. Options:
  ``channels`` (8), ``components`` (3 sinusoids per channel), ``noise`` (0.05). Validation signals
  come from the generator seeded ``10000 + seed``, never used for training.

Evaluation always runs the model in eval mode, where masks are deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...config import BaseConfig, config_error
from ...data.corpora import load_corpus
from ...data.loaders import RandomWindowLoader, eval_windows
from .base import Batch, GeneratorSource, StepLoss, Task, float_option, int_option, model_device, run_eval


class SinusoidSignals:
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


@torch.no_grad()
def evaluate_masked(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """Metrics over ``batches`` in eval mode (deterministic masks), pooled over masked positions.

    Tokens: ``masked_ce`` (nats), ``masked_acc``, ``all_acc``. Continuous: ``masked_mse``, ``all_mse``,
    ``mean_baseline_mse`` (predicting each sequence's per-channel mean at its masked positions) and
    ``mse_ratio`` = masked_mse / mean_baseline_mse. Plus ``mask_fraction`` and ``loss`` (mean model loss).
    """
    tokens = model.config.input_type == "tokens"
    device = model_device(model)
    sums: dict[str, float] = {}
    counts = {"masked": 0, "all": 0}
    losses: list[float] = []

    def add(key: str, value: torch.Tensor) -> None:
        sums[key] = sums.get(key, 0.0) + float(value)

    def score(model: nn.Module, x: torch.Tensor) -> None:
        x = x.to(device)
        out = model(x)
        losses.append(float(out.loss))
        mask = out.mask
        counts["masked"] += int(mask.sum())
        counts["all"] += mask.numel()
        rec = out.reconstruction.float()
        if tokens:
            correct = rec.argmax(-1) == x
            add("masked_ce", F.cross_entropy(rec[mask], x[mask], reduction="sum"))
            add("masked_acc", correct[mask].sum())
            add("all_acc", correct.sum())
        else:
            err = (rec - x).pow(2).mean(-1)  # [B, L]
            base = (x - x.mean(1, keepdim=True)).pow(2).mean(-1)
            add("masked_mse", err[mask].sum())
            add("all_mse", err.sum())
            add("mean_baseline_mse", base[mask].sum())

    run_eval(model, batches, score)
    per_masked = max(counts["masked"], 1)
    result = {k: v / (counts["all"] if k.startswith("all_") else per_masked) for k, v in sums.items()}
    if not tokens:
        result["mse_ratio"] = result["masked_mse"] / max(result["mean_baseline_mse"], 1e-12)
    result["mask_fraction"] = counts["masked"] / max(counts["all"], 1)
    result["loss"] = sum(losses) / max(len(losses), 1)
    return result


class _MaskedTask(Task):
    """What both masked tasks share: the forward, the evaluation and the masked_ae kind."""

    kinds = ("masked_ae",)
    loss_parts = ("aux_loss",)

    def forward(self, model: nn.Module, micro: Batch, index: int) -> StepLoss:
        (x,) = micro
        out = model(x)
        aux = out.aux_loss if out.aux_loss is not None else torch.zeros(())
        return StepLoss(out.loss, (aux.to(out.loss.device),))

    def evaluate(self, model: nn.Module, split: str = "val") -> dict[str, float]:
        return evaluate_masked(model, self.eval_inputs)

    def describe(self, metrics: dict[str, float]) -> str:
        keys = ("masked_ce", "masked_acc") if "masked_acc" in metrics else ("masked_mse", "mse_ratio")
        return ", ".join(f"{k} {metrics[k]:.4f}" for k in ("loss", *keys))


class _InputsOnly:
    """A next-token loader's batches without the labels (a masked AE reconstructs its input)."""

    def __init__(self, loader: RandomWindowLoader) -> None:
        self.loader = loader

    def next_batch(self) -> Batch:
        return (self.loader.next_batch()[0],)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


class MaskedBytesTask(_MaskedTask):
    name = "masked_bytes"
    loss_unit = "nats / masked byte"
    reads_text = True

    @classmethod
    def check_model_config(cls, model_config: BaseConfig, cfg, opts) -> None:
        if model_config.input_type != "tokens":
            raise config_error("input_type", model_config.input_type, "the masked_bytes task needs 'tokens'")
        if model_config.vocab_size < 256:
            raise config_error("vocab_size", model_config.vocab_size, "the masked_bytes task needs >= 256 (bytes)")

    def setup(self, rank: int, world_size: int, device: torch.device) -> None:
        cfg = self.cfg
        corpus = load_corpus(cfg.data, min_split_len=cfg.seq_len + 1)
        self.description = f"{corpus.name} (masked bytes)"
        self.details = corpus.description
        loader = RandomWindowLoader(corpus.train, cfg.batch_size, cfg.seq_len, cfg.seed, rank, world_size)
        self.source = _InputsOnly(loader)
        windows = eval_windows(corpus.val, self.eval_batch_size, cfg.seq_len, cfg.eval_batches)
        self.eval_inputs = [ids for ids, _ in windows]


class MaskedSignalTask(_MaskedTask):
    name = "masked_signal"
    loss_unit = "MSE"
    options = {
        "channels": int_option(8, 1),
        "components": int_option(3, 1),
        "noise": float_option(0.05, 0.0, math.inf),
    }
    #: validation signals come from the generator seeded ``VAL_SEED_OFFSET + seed``.
    VAL_SEED_OFFSET = 10_000

    @classmethod
    def implied_model_config(cls, cfg, opts: dict[str, Any]) -> dict[str, Any]:
        return {"input_type": "continuous", "d_input": opts["channels"]}

    @classmethod
    def check_model_config(cls, model_config: BaseConfig, cfg, opts) -> None:
        if model_config.input_type != "continuous":
            raise config_error("input_type", model_config.input_type, "the masked_signal task needs 'continuous'")
        if model_config.input_dim != opts["channels"]:
            rule = f"the masked_signal task has task_options.channels={opts['channels']} inputs"
            raise config_error("d_input", model_config.d_input, rule)

    def signals(self) -> SinusoidSignals:
        return SinusoidSignals(self.opts["channels"], self.opts["components"], self.opts["noise"])

    def setup(self, rank: int, world_size: int, device: torch.device) -> None:
        cfg, signals = self.cfg, self.signals()
        self.description = f"sinusoid mixtures ({signals.channels} channels)"

        def draw(batch: int, generator: torch.Generator) -> Batch:
            return (signals.sample(batch, cfg.seq_len, generator),)

        self.source = GeneratorSource(draw, cfg.batch_size, cfg.seed, rank, world_size)
        gen = torch.Generator().manual_seed(self.VAL_SEED_OFFSET + cfg.seed)
        self.eval_inputs = [signals.sample(self.eval_batch_size, cfg.seq_len, gen) for _ in range(cfg.eval_batches)]
