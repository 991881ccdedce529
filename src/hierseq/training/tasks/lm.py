"""The ``lm`` task: next-token prediction on a text corpus (the embedded Austen novels by default).

Tokens: bytes by default, or subwords (``tokenizer: bpe:<vocab_size>`` trained on the training split, or
``hf:<path-or-name>``; see :mod:`hierseq.data.tokenizer`). The tokenizer sets the model's ``vocab_size``, is
given to the model (so every checkpoint and the final model are saved with it), and a resumed run reads the
one saved in its checkpoint instead of training it again.

Batches: seeded random windows (``loader: random``) or contiguous streams (``loader: stream``); with
``tbptt: true`` the model's decoding state is carried, detached, from one batch to the next (one state
per micro-batch, dropped when the streams wrap) and written into checkpoints. Metrics: ``loss`` (nats per
token, the LM loss without any auxiliary loss) and ``bpb`` (bits per byte: the summed loss over the UTF-8
bytes of the text the scored tokens stand for, comparable across tokenizers) on the validation split.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ...config import config_error
from ...data.corpora import load_corpus
from ...data.loaders import RandomWindowLoader, StreamLoader, eval_windows
from ...data.tokenizer import (
    BYTES,
    TOKENIZER_FILE,
    ByteTokenizer,
    TokenizedSplit,
    attach_tokenizer,
    build_tokenizer,
    load_saved_tokenizer,
    tokenize_split,
)
from ...losses import nats_to_bits
from ...modules.state import DecodingState
from ...registry import build_config
from ...serialization import load_config
from .base import Batch, StepLoss, Task, model_device


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokens: torch.Tensor,
    seq_len: int,
    batch_size: int,
    max_batches: int | None,
    byte_counts: torch.Tensor | None = None,
) -> dict[str, float]:
    """Mean next-token loss of ``model`` over deterministic windows of ``tokens`` ([N] ids).

    ``byte_counts`` ([N], see :class:`~hierseq.data.tokenizer.TokenizedSplit`): the UTF-8 bytes each token
    stands for; None for bytes (one each). Returns ``{"loss": nats per token, "bpb": bits per byte (the
    summed loss of the scored tokens over the bytes of the text they stand for), "tokens": scored tokens,
    "bytes": their bytes}``. Uses the LM loss alone (no auxiliary loss), runs in eval mode without
    gradients, and restores the model's previous train/eval mode."""
    model = model.module if isinstance(model, DistributedDataParallel) else model
    was_training = model.training
    device = model_device(model)
    model.eval()
    total, count, n_bytes = 0.0, 0, 0
    windows = eval_windows(tokens, batch_size, seq_len, max_batches)
    # The same windows over the byte counts: their "labels" are the bytes of the scored tokens.
    counts = eval_windows(byte_counts, batch_size, seq_len, max_batches) if byte_counts is not None else None
    try:
        for (input_ids, labels), label_bytes in zip(windows, counts or itertools.repeat(None)):
            out = model(input_ids.to(device), labels=labels.to(device))
            lm_loss = out.lm_loss if out.lm_loss is not None else out.loss
            n = int((labels != -100).sum())
            total += float(lm_loss) * n  # weight by tokens: the last batch may be smaller
            count += n
            n_bytes += n if label_bytes is None else int(label_bytes[1].sum())
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    # For bytes n_bytes == count, so bpb is loss / ln 2 exactly as before tokenizers existed.
    return {"loss": loss, "bpb": nats_to_bits(total / max(n_bytes, 1)), "tokens": count, "bytes": n_bytes}


def evaluate_split(
    model: nn.Module, split: TokenizedSplit, seq_len: int, batch_size: int, max_batches: int | None
) -> dict[str, float]:
    """:func:`evaluate` over a tokenized split."""
    return evaluate(model, split.ids, seq_len, batch_size, max_batches, split.byte_counts)


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

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.loss_unit = "nats / byte" if cfg.tokenizer == BYTES else "nats / token"

    def setup(self, rank: int, world_size: int, device: torch.device) -> None:
        cfg = self.cfg
        self.corpus = load_corpus(cfg.data, min_split_len=cfg.seq_len + 1)
        self.tokenizer, origin = self._tokenizer(self.resume_from)
        self.splits = {
            name: tokenize_split(self.corpus.split(name), self.tokenizer) for name in ("train", "val", "test")
        }
        # Before the model exists (and before the run writes anything): every token must be in the vocabulary.
        if isinstance(self.tokenizer, ByteTokenizer):
            self.corpus.check_vocab(build_config(cfg.model, **cfg.model_overrides()).vocab_size)
        else:
            self._check_subword_split_sizes()
            given = cfg.model_config.get("vocab_size")
            if given is not None and given != self.tokenizer.vocab_size:
                raise config_error(
                    "model_config.vocab_size",
                    given,
                    f"the tokenizer {cfg.tokenizer!r} has {self.tokenizer.vocab_size} tokens; leave vocab_size out "
                    "(the tokenizer sets it) or make it equal",
                )
        self.description = self.corpus.name
        self.details = self.corpus.description
        if not isinstance(self.tokenizer, ByteTokenizer):
            per_byte = ", ".join(f"{k} {v.tokens_per_byte:.4f}" for k, v in self.splits.items())
            self.details += (
                f"; tokenizer {cfg.tokenizer} ({origin}, {self.tokenizer.vocab_size} tokens): tokens per byte "
                f"{per_byte}"
            )
        train = self.splits["train"].ids
        self.stream = cfg.loader == "stream"
        if self.stream:
            self.source = StreamLoader(train, cfg.batch_size, cfg.seq_len, rank, world_size)
        else:
            self.source = RandomWindowLoader(train, cfg.batch_size, cfg.seq_len, cfg.seed, rank, world_size)
        self.distributed = world_size > 1
        self.device = device
        self.caches: list[Any] = [None] * cfg.grad_accum  # TBPTT: the carried state of every micro-batch

    def _tokenizer(self, resume_from: Path | None) -> tuple[Any, str]:
        """The run's tokenizer and where it came from: a resumed run's own saved copy (never trained again, and
        the same whatever happened to an hf: source since), else the spec's (a BPE trained on this corpus'
        training split, or an existing tokenizer)."""
        spec = self.cfg.tokenizer
        if spec != BYTES and resume_from is not None:
            saved = load_saved_tokenizer(resume_from, load_config(resume_from)[1].vocab_size)
            if saved is None:
                raise FileNotFoundError(
                    f"resume: the checkpoint {str(resume_from)!r} holds no {TOKENIZER_FILE} for tokenizer={spec!r}"
                )
            saved.spec = spec
            return saved, f"the checkpoint's {TOKENIZER_FILE}"
        origin = "trained on the train split" if spec.startswith("bpe:") else "loaded"
        return build_tokenizer(spec, self.corpus.train), origin

    def _check_subword_split_sizes(self) -> None:
        need = self.cfg.seq_len + 1
        for name, split in self.splits.items():
            if len(split) < need:
                raise ValueError(
                    f"data={self.corpus.name!r}: the {name} split is {len(split)} tokens under tokenizer="
                    f"{self.cfg.tokenizer!r} ({split.n_bytes} bytes), needs at least seq_len + 1 = {need}; use more "
                    "text or a shorter seq_len"
                )

    def data_model_config(self) -> dict[str, Any]:
        """A subword tokenizer sets ``vocab_size``; bytes leave the model config as it is."""
        return {} if isinstance(self.tokenizer, ByteTokenizer) else {"vocab_size": self.tokenizer.vocab_size}

    def prepare_model(self, model: nn.Module) -> None:
        attach_tokenizer(model, self.tokenizer)

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
        result = evaluate_split(
            model, self.splits[split], self.cfg.seq_len, self.eval_batch_size, self.cfg.eval_batches
        )
        return {"loss": result["loss"], "bpb": result["bpb"]}

    def describe(self, metrics: dict[str, float]) -> str:
        unit = "nats" if self.cfg.tokenizer == BYTES else "nats/token"
        return f"loss {metrics['loss']:.4f} {unit}, {metrics['bpb']:.4f} bits/byte"

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
