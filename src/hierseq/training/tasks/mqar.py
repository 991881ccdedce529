"""The ``mqar`` task: multi-query associative recall (:mod:`hierseq.data.synthetic`) for causal LMs.

Every training batch is drawn fresh from a generator seeded with ``seed`` (its state is checkpointed);
the evaluation set is ``eval_batches`` batches of ``eval_batch_size`` sequences from the generator seeded
with ``task_options.eval_seed``, the same for every run with the same sizes, so runs answer the same
queries. The vocabulary is the model's ``vocab_size``.

Options: ``n_pairs`` (key-value pairs per sequence, 4), ``power_a`` (query-gap power law, 0.01),
``filler`` ("zeros" | "random"), ``eval_seed`` (1000003), ``stop_at`` (null, or an accuracy in (0, 1]
that ends the run at the first evaluation reaching it). Metrics: ``loss`` (nats per query) and
``accuracy`` (argmax accuracy at the queries).
"""

from __future__ import annotations

import torch
from torch import nn

from ...config import BaseConfig
from ...data.synthetic import FILLERS, mqar_accuracy, mqar_batch
from .base import (
    Batch,
    GeneratorSource,
    StepLoss,
    Task,
    choice_option,
    float_option,
    int_option,
    model_device,
    run_eval,
)
from .lm import lm_step_loss

#: the default evaluation seed: the same queries for every run.
EVAL_SEED = 1_000_003


class MQARTask(Task):
    name = "mqar"
    kinds = ("causal_lm",)
    loss_parts = ("lm_loss", "aux_loss")
    loss_unit = "nats / query"
    options = {
        "n_pairs": int_option(4, 1),
        "power_a": float_option(0.01, 0.0, 1.0, low_open=True),
        "filler": choice_option("zeros", FILLERS),
        "eval_seed": int_option(EVAL_SEED, 0),
        "stop_at": float_option(None, 0.0, 1.0, low_open=True, allow_none=True),
    }

    @classmethod
    def check_model_config(cls, model_config: BaseConfig, cfg, opts) -> None:
        # One tiny batch names any bad combination of seq_len, n_pairs and the model's vocab_size.
        cls._draw(1, cfg.seq_len, opts, model_config.vocab_size, torch.Generator().manual_seed(0))

    @staticmethod
    def _draw(batch: int, seq_len: int, opts: dict, vocab_size: int, generator: torch.Generator) -> Batch:
        return mqar_batch(batch, seq_len, opts["n_pairs"], vocab_size, generator, opts["power_a"], opts["filler"])

    def setup(self, rank: int, world_size: int, device: torch.device) -> None:
        from ...registry import build_config

        cfg, opts = self.cfg, self.opts
        vocab = build_config(cfg.model, **cfg.model_overrides()).vocab_size
        self.description = f"MQAR (V={vocab}, L={cfg.seq_len}, K={opts['n_pairs']} pairs)"

        def draw(batch: int, generator: torch.Generator) -> Batch:
            return self._draw(batch, cfg.seq_len, opts, vocab, generator)

        self.source = GeneratorSource(draw, cfg.batch_size, cfg.seed, rank, world_size)
        gen = torch.Generator().manual_seed(opts["eval_seed"])
        self.eval_set = [draw(self.eval_batch_size, gen) for _ in range(cfg.eval_batches)]

    def forward(self, model: nn.Module, micro: Batch, index: int) -> StepLoss:
        x, y = micro
        return lm_step_loss(model(x, labels=y))

    def evaluate(self, model: nn.Module, split: str = "val") -> dict[str, float]:
        device = model_device(model)
        sums = {"loss": 0.0, "correct": 0, "total": 0}

        def score(model: nn.Module, batch: Batch) -> None:
            ids, labels = (t.to(device) for t in batch)
            out = model(ids, labels=labels)
            correct, total = mqar_accuracy(out.logits, labels)
            lm = out.lm_loss if out.lm_loss is not None else out.loss
            sums["loss"] += float(lm) * total  # lm_loss is the mean over the batch's queries
            sums["correct"] += correct
            sums["total"] += total

        run_eval(model, self.eval_set, score)
        n = max(sums["total"], 1)
        return {"loss": sums["loss"] / n, "accuracy": sums["correct"] / n}

    def should_stop(self, metrics: dict[str, float]) -> bool:
        return self.opts["stop_at"] is not None and metrics["accuracy"] >= self.opts["stop_at"]

    def describe(self, metrics: dict[str, float]) -> str:
        return f"loss {metrics['loss']:.4f} nats/query, accuracy {metrics['accuracy']:.4f}"
