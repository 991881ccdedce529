"""The conformance checks must be able to fail: run them on small broken models defined here.

``ToyLM`` is a tiny causal LM (not registered) whose state at t is the running mean of the token
embeddings up to t. Switches break it in one way each: seeing the next token everywhere or only at
chunk boundaries, ignoring its input, forgetting its cache, or mixing rows of a batch. A correct
``ToyLM`` passes the same checks, so each failure is caused by the defect and not by the toy.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hierseq.losses import causal_lm_loss
from hierseq.outputs import CausalLMOutput

from .checks import (
    SMALL_VOCAB,
    assert_batch_independent,
    assert_cached_decoding_matches,
    assert_causal_by_gradient,
    assert_causal_by_perturbation,
    assert_iid_floor,
)

V = SMALL_VOCAB


class ToyState:
    """Running sum of embeddings [B, D] and the number of tokens seen."""

    def __init__(self, total: torch.Tensor, length: int) -> None:
        self.total = total
        self.length = length


class ToyLM(nn.Module):
    """input_ids [B, L] -> CausalLMOutput(logits [B, L, V]).

    h_t = e_t + mean(e_0 .. e_t), logits_t = head(tanh(h_t)); with ``leak`` the state at t also adds
    ``mix(e_{t+1})`` (at every position for "all", only where t + 1 is a multiple of 16 for "boundary").
    """

    def __init__(
        self,
        vocab: int = V,
        d_model: int = 32,
        leak: str | None = None,
        ignore_input: bool = False,
        forget_cache: bool = False,
        mix_batch: bool = False,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.mix = nn.Linear(d_model, d_model)
        self.head = nn.Linear(d_model, vocab)
        self.leak = leak
        self.ignore_input = ignore_input
        self.forget_cache = forget_cache
        self.mix_batch = mix_batch

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        cache: ToyState | None = None,
        use_cache: bool = False,
    ) -> CausalLMOutput:
        e = self.embed(input_ids)  # [B, L, D]
        if self.ignore_input:
            e = e * 0.0
        if self.mix_batch:
            e = e + e.mean(dim=0, keepdim=True)
        offset = 0 if cache is None or self.forget_cache else cache.length
        past = 0.0 if cache is None or self.forget_cache else cache.total[:, None]
        running = e.cumsum(dim=1) + past  # [B, L, D]
        counts = torch.arange(offset + 1, offset + e.shape[1] + 1, dtype=e.dtype)[:, None]
        h = e + running / counts
        if self.leak is not None:
            following = F.pad(e[:, 1:], (0, 0, 0, 1))  # e_{t+1}, zero at the last position
            if self.leak == "boundary":
                positions = torch.arange(offset, offset + e.shape[1])
                following = following * ((positions + 1) % 16 == 0).to(e.dtype)[:, None]
            h = h + self.mix(following)
        logits = self.head(torch.tanh(h))
        new_cache = ToyState(running[:, -1], offset + e.shape[1]) if use_cache else None
        zero = logits.new_zeros(())
        lm_loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits, loss=lm_loss, lm_loss=lm_loss, aux_loss=zero, cache=new_cache)


def toy(**switches: object) -> ToyLM:
    torch.manual_seed(0)
    return ToyLM(**switches).eval()


def test_correct_toy_passes_every_check() -> None:
    model = toy()
    assert_causal_by_perturbation(model, V)
    assert_causal_by_gradient(model, V)
    assert_cached_decoding_matches(model, V)
    assert_batch_independent(model, V)
    assert_iid_floor(lambda: ToyLM(), vocab=V)


@pytest.mark.parametrize("leak", ["all", "boundary"])
def test_perturbation_check_catches_future_leak(leak: str) -> None:
    with pytest.raises(AssertionError, match="earlier positions"):
        assert_causal_by_perturbation(toy(leak=leak), V)


@pytest.mark.parametrize("leak", ["all", "boundary"])
def test_gradient_check_catches_future_leak(leak: str) -> None:
    with pytest.raises(AssertionError, match="later positions"):
        assert_causal_by_gradient(toy(leak=leak), V)


def test_iid_floor_check_catches_future_leak() -> None:
    with pytest.raises(AssertionError, match="< ln V"):
        assert_iid_floor(lambda: ToyLM(leak="all"), vocab=V)


def test_perturbation_check_is_not_vacuous() -> None:
    with pytest.raises(AssertionError, match="vacuous"):
        assert_causal_by_perturbation(toy(ignore_input=True), V)


def test_gradient_check_needs_a_path_to_the_past() -> None:
    with pytest.raises(AssertionError, match="zero gradient to the past"):
        assert_causal_by_gradient(toy(ignore_input=True), V)


def test_cache_check_catches_a_forgotten_cache() -> None:
    with pytest.raises(AssertionError, match="cached logits differ"):
        assert_cached_decoding_matches(toy(forget_cache=True), V)


def test_batch_check_catches_rows_mixing() -> None:
    with pytest.raises(AssertionError, match="batched and single-row"):
        assert_batch_independent(toy(mix_batch=True), V)
