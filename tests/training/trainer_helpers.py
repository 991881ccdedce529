"""Helpers for the trainer tests: tiny configs and test-only models registered for one test.

Test models are removed from the registry when the test ends, so other test files never see them in
``hierseq.list_models()``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import hierseq
from hierseq import registry
from hierseq.config import BaseConfig
from hierseq.losses import causal_lm_loss
from hierseq.modules.state import DecodingState, LayerState
from hierseq.outputs import CausalLMOutput
from hierseq.training import TrainConfig


def tiny_config(out_dir, **overrides) -> TrainConfig:
    """A seconds-long run of the smallest transformer on the embedded corpus."""
    base = dict(
        model="transformer",
        model_config=hierseq.get_entry("transformer").config_cls.small_overrides(),
        seq_len=32,
        batch_size=4,
        max_steps=6,
        warmup_steps=2,
        eval_every=0,
        eval_batches=2,
        log_every=1,
        save_every=0,
        out_dir=str(out_dir),
        progress=False,
    )
    base.update(overrides)
    return TrainConfig(**base)


def _small(name: str, **extra) -> dict:
    return {**hierseq.get_entry(name).config_cls.small_overrides(), **extra}


#: task -> tiny_config overrides of a seconds-long run of that task, for every model kind. Every one has
#: randomness besides its batches (dropout, or a masked AE's random masks) so the RNG must resume too.
TASK_RUNS: dict[str, dict] = {
    "lm": dict(model_config=_small("transformer", dropout=0.1)),
    "mqar": dict(
        task="mqar",
        model_config=_small("transformer", dropout=0.1, vocab_size=32),
        seq_len=16,
        task_options={"n_pairs": 2},
        eval_batch_size=8,
        eval_batches=1,
    ),
    "masked_bytes": dict(model="flat_mae", task="masked_bytes", model_config=_small("flat_mae"), eval_batch_size=4),
    "masked_signal": dict(
        model="hama", task="masked_signal", model_config=_small("hama"), task_options={"channels": 2}, eval_batch_size=4
    ),
    "regression": dict(
        model="hiss",
        task="regression",
        model_config={"d_model": 16, "n_layers": 1, "d_state": 4, "dropout": 0.1},
        task_options={"n_train": 8, "n_val": 4, "n_test": 4, "chunk_size": 4},
        seq_len=16,
        batch_size=2,
        keep_best=True,
    ),
}


def task_config(task: str, out_dir, **overrides) -> TrainConfig:
    """A seconds-long run of ``task`` (see :data:`TASK_RUNS`)."""
    return tiny_config(out_dir, **{**TASK_RUNS[task], **overrides})


# ----------------------------------------------------------------------------------- test-only models
@dataclass
class TinyRNNConfig(BaseConfig):
    d_model: int = 8
    n_layers: int = 1
    nan_at_call: int = 0  # > 0: the n-th training forward returns a NaN loss


@dataclasses.dataclass
class TinyRNNState(LayerState):
    """The GRU's hidden state, batch first: [B, 1, D]."""

    h: torch.Tensor


class TinyRNN(nn.Module):
    """Embedding -> GRU -> head. Records, for every training forward, what cache it was given."""

    calls: list[dict] = []  # class-level so a test can read it although train() builds the model

    def __init__(self, config: TinyRNNConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.rnn = nn.GRU(config.d_model, config.d_model, batch_first=True)
        self.head = nn.Linear(config.d_model, config.vocab_size)
        self.n_train_calls = 0

    def forward(self, input_ids, labels=None, cache=None, use_cache=False):
        if self.training:
            self.n_train_calls += 1
            TinyRNN.calls.append(
                {
                    "tokens_seen": None if cache is None else cache.length,
                    "h_has_graph": None if cache is None else cache.layers[0].h.grad_fn is not None,
                    "first_token": input_ids[:, 0].tolist(),
                }
            )
        h0 = None if cache is None else cache.layers[0].h.transpose(0, 1).contiguous()
        out, h = self.rnn(self.embed(input_ids), h0)
        logits = self.head(out)
        loss = lm = None
        if labels is not None:
            lm = causal_lm_loss(logits, labels)
            if self.training and self.n_train_calls == self.config.nan_at_call:
                lm = lm * float("nan")
            loss = lm
        new_cache = None
        if use_cache or cache is not None:  # the protocol: a given cache is advanced in place
            new_cache = cache if cache is not None else DecodingState(1)
            new_cache.layers[0] = TinyRNNState(h.transpose(0, 1))
            new_cache.length += input_ids.shape[1]
        return CausalLMOutput(logits=logits, loss=loss, lm_loss=lm, aux_loss=logits.new_zeros(()), cache=new_cache)


@pytest.fixture
def tiny_rnn():
    """Registers ``TinyRNN`` as "test_tiny_rnn" for one test and removes it afterwards."""
    name = "test_tiny_rnn"
    hierseq.register(name, config=TinyRNNConfig)(TinyRNN)
    TinyRNN.calls.clear()
    yield name
    registry._REGISTRY.pop(name, None)
    TinyRNN.calls.clear()
