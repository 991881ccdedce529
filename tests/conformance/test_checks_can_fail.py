"""The conformance checks must be able to fail: run them on small broken models defined here.

``ToyLM`` is a tiny causal LM (not registered) whose state at t is the running mean of the token
embeddings up to t, kept in the library's decoding-state protocol. Switches break it in one way each:
seeing the next token everywhere or only at chunk boundaries, ignoring its input, forgetting its cache,
returning a new cache instead of advancing the given one, mixing rows of a batch, a ``detach`` that keeps
the graph or loses the values, and a lossy ``state_dict``. A correct ``ToyLM`` passes the same checks,
so each failure is caused by the defect and not by the toy.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hierseq.losses import causal_lm_loss
from hierseq.modules.state import DecodingState, LayerState
from hierseq.outputs import CausalLMOutput

from .checks import (
    SMALL_VOCAB,
    assert_batch_independent,
    assert_cached_decoding_matches,
    assert_causal_by_gradient,
    assert_causal_by_perturbation,
    assert_detach_keeps_values_and_cuts_graph,
    assert_iid_floor,
    assert_state_round_trips,
)

V = SMALL_VOCAB


@dataclasses.dataclass
class ToyState(LayerState):
    """Running sum of embeddings [B, D]."""

    total: torch.Tensor


@dataclasses.dataclass
class GraphKeepingState(ToyState):
    def detach(self) -> GraphKeepingState:
        return self


@dataclasses.dataclass
class ForgetfulDetachState(ToyState):
    def detach(self) -> ForgetfulDetachState:
        self.total = torch.zeros_like(self.total)
        return self


@dataclasses.dataclass
class LossyState(ToyState):
    def state_dict(self) -> dict:
        return LayerState.state_dict(self.map(lambda t: t.to(torch.bfloat16).float()))


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
        copy_cache: bool = False,
        state_type: type[ToyState] = ToyState,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.mix = nn.Linear(d_model, d_model)
        self.head = nn.Linear(d_model, vocab)
        self.leak = leak
        self.ignore_input = ignore_input
        self.forget_cache = forget_cache
        self.mix_batch = mix_batch
        self.copy_cache = copy_cache
        self.state_type = state_type

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        cache: DecodingState | None = None,
        use_cache: bool = False,
    ) -> CausalLMOutput:
        e = self.embed(input_ids)  # [B, L, D]
        if self.ignore_input:
            e = e * 0.0
        if self.mix_batch:
            e = e + e.mean(dim=0, keepdim=True)
        offset = 0 if cache is None or self.forget_cache else cache.length
        past = 0.0 if cache is None or self.forget_cache else cache.layers[0].total[:, None]
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
        new_cache = None
        if use_cache or cache is not None:
            new_cache = DecodingState(1) if cache is None or self.copy_cache else cache
            new_cache.layers[0] = self.state_type(running[:, -1])
            new_cache.length = (0 if cache is None else cache.length) + e.shape[1]
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
    assert_detach_keeps_values_and_cuts_graph(model, V)
    assert_state_round_trips(model, V)
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


def test_cache_check_catches_a_cache_that_is_not_advanced_in_place() -> None:
    with pytest.raises(AssertionError, match="advanced in place"):
        assert_cached_decoding_matches(toy(copy_cache=True), V)


def test_detach_check_catches_a_kept_graph() -> None:
    with pytest.raises(AssertionError, match="left a graph"):
        assert_detach_keeps_values_and_cuts_graph(toy(state_type=GraphKeepingState), V)


def test_detach_check_catches_lost_values() -> None:
    with pytest.raises(AssertionError, match="detached state differs"):
        assert_detach_keeps_values_and_cuts_graph(toy(state_type=ForgetfulDetachState), V)


def test_round_trip_check_catches_a_lossy_state_dict() -> None:
    with pytest.raises(AssertionError, match="continues differently"):
        assert_state_round_trips(toy(state_type=LossyState), V)
