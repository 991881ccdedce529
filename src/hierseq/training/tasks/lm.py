"""The ``lm`` task: next-byte prediction on a text corpus (the embedded Austen novels by default).

Batches: seeded random windows (``loader: random``) or contiguous streams (``loader: stream``); with
``tbptt: true`` the model's decoding state is carried, detached, from one batch to the next (one state
per micro-batch, dropped when the streams wrap) and written into checkpoints. Metrics: ``loss`` (nats per
token, the LM loss without any auxiliary loss) and ``bpb`` (bits per byte) on the validation split.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ...config import config_error
from ...data.corpora import load_corpus
from ...data.loaders import RandomWindowLoader, StreamLoader, eval_windows
from ...losses import nats_to_bits
from ...modules.state import DecodingState
from ...registry import build_config
from .base import Batch, StepLoss, Task, model_device


@torch.no_grad()
def evaluate(
    model: nn.Module, tokens: torch.Tensor, seq_len: int, batch_size: int, max_batches: int | None
) -> dict[str, float]:
    """Mean next-token loss of ``model`` over deterministic windows of ``tokens`` ([N] ids).

    Returns ``{"loss": nats per token, "bpb": bits per byte (= per token for bytes), "tokens": count}``.
    Uses the LM loss alone (no auxiliary loss), runs in eval mode without gradients, and restores the
    model's previous train/eval mode."""
    model = model.module if isinstance(model, DistributedDataParallel) else model
    was_training = model.training
    device = model_device(model)
    model.eval()
    total, count = 0.0, 0
    try:
        for input_ids, labels in eval_windows(tokens, batch_size, seq_len, max_batches):
            out = model(input_ids.to(device), labels=labels.to(device))
            lm_loss = out.lm_loss if out.lm_loss is not None else out.loss
            n = int((labels != -100).sum())
            total += float(lm_loss) * n  # weight by tokens: the last batch may be smaller
            count += n
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "bpb": nats_to_bits(loss), "tokens": count}


def lm_step_loss(out: Any) -> StepLoss:
    """A causal LM output -> (loss, (lm_loss, aux_loss)): the parts every causal-LM task logs."""
    lm = out.lm_loss if out.lm_loss is not None else out.loss
    aux = out.aux_loss if out.aux_loss is not None else torch.zeros(())
    return StepLoss(out.loss, (lm, aux.to(lm.device)))


class LMTask(Task):
    name = "lm"
    kinds = ("causal_lm",)
    loss_parts = ("lm_loss", "aux_loss")
    loss_unit = "nats / byte"
    reads_text = True

    def setup(self, rank: int, world_size: int, device: torch.device) -> None:
        cfg = self.cfg
        self.corpus = load_corpus(cfg.data, min_split_len=cfg.seq_len + 1)
        # Before the model exists (and before the run writes anything): every byte must be a token.
        self.corpus.check_vocab(build_config(cfg.model, **cfg.model_overrides()).vocab_size)
        self.description = self.corpus.name
        self.details = self.corpus.description
        self.stream = cfg.loader == "stream"
        if self.stream:
            self.source = StreamLoader(self.corpus.train, cfg.batch_size, cfg.seq_len, rank, world_size)
        else:
            self.source = RandomWindowLoader(self.corpus.train, cfg.batch_size, cfg.seq_len, cfg.seed, rank, world_size)
        self.distributed = world_size > 1
        self.device = device
        self.caches: list[Any] = [None] * cfg.grad_accum  # TBPTT: the carried state of every micro-batch

    def check_model(self, model: nn.Module) -> None:
        refusal = getattr(model, "tbptt_refusal", lambda: None)() if self.cfg.tbptt else None
        if refusal:
            raise config_error("tbptt", True, f"{self.cfg.model} cannot carry its state across segments: {refusal}")

    def next_batch(self) -> Batch:
        if not self.stream:
            return self.source.next_batch()
        input_ids, labels, reset = self.source.next_batch()
        if reset:
            self.caches = [None] * self.cfg.grad_accum
        return input_ids, labels

    def forward(self, model: nn.Module, micro: Batch, index: int) -> StepLoss:
        x, y = micro
        if self.cfg.tbptt:
            out = model(x, labels=y, cache=self.caches[index], use_cache=True)
            self.caches[index] = out.cache.detach()  # TBPTT: cut the graph at the batch boundary
        else:
            out = model(x, labels=y)
        return lm_step_loss(out)

    def evaluate(self, model: nn.Module, split: str = "val") -> dict[str, float]:
        # Every rank evaluates the same windows with the same weights: identical numbers everywhere.
        tokens = getattr(self.corpus, split)
        result = evaluate(model, tokens, self.cfg.seq_len, self.eval_batch_size, self.cfg.eval_batches)
        return {"loss": result["loss"], "bpb": result["bpb"]}

    def describe(self, metrics: dict[str, float]) -> str:
        return f"loss {metrics['loss']:.4f} nats, {metrics['bpb']:.4f} bits/byte"

    # ------------------------------------------------------------------ carried TBPTT state
    def state_dict(self) -> dict[str, Any] | None:
        return {"tbptt_caches": self._carried_states()} if self.cfg.tbptt else None

    def _carried_states(self) -> list[Any] | None:
        """The carried state of every micro-batch as plain tensors (None entries: nothing carried yet),
        or None when it is not written down (under DDP every rank carries its own streams and rank 0
        writes the checkpoint alone)."""
        if self.distributed:
            return None
        return [None if c is None else c.state_dict() for c in self.caches]

    def load_state_dict(self, state: Any, log: Callable[[str], None], distributed: bool) -> None:
        """The carried state of a checkpoint, rebuilt as :class:`DecodingState` s; when it cannot be, the
        state restarts empty and the log says why."""
        if not self.cfg.tbptt:
            return
        saved = (state or {}).get("tbptt_caches")
        reason = None
        if distributed:
            reason = "it is not checkpointed under DDP"
        elif saved is None:
            reason = "the checkpoint holds none"
        elif len(saved) != self.cfg.grad_accum:
            reason = f"the checkpoint holds {len(saved)} micro-batch states, grad_accum={self.cfg.grad_accum}"
        if reason is not None:
            log(f"resume with tbptt: the carried recurrent state restarts empty ({reason})")
            return
        log("resume with tbptt: the carried recurrent state is restored from the checkpoint")
        self.caches = [None if s is None else DecodingState.from_state_dict(s, self.device) for s in saved]
