"""The causal-LM contract, checked for every model registered with ``kind="causal_lm"``.

Models are built through the registry at their ``small_overrides()`` size with ``vocab_size=32``.
The checks themselves live in ``checks.py``; ``test_checks_can_fail.py`` shows they catch broken models.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from .checks import (
    SMALL_VOCAB,
    assert_batch_independent,
    assert_cached_decoding_matches,
    assert_causal_by_gradient,
    assert_causal_by_perturbation,
    assert_clear_input_errors,
    assert_detach_keeps_values_and_cuts_graph,
    assert_deterministic,
    assert_forward_shapes,
    assert_gradients_reach_all_parameters,
    assert_greedy_generate_matches_full,
    assert_iid_floor,
    assert_loss_consistent,
    assert_save_load_roundtrip,
    assert_state_round_trips,
    build_small,
    prefill_then_steps,
)

V = SMALL_VOCAB


def test_forward_shapes_at_odd_lengths(causal_lm_name: str) -> None:
    assert_forward_shapes(build_small(causal_lm_name, vocab_size=V), V, lengths=(1, 7, 33, 100), batch_sizes=(1, 3))


def test_forward_shapes_with_default_vocab(causal_lm_name: str) -> None:
    model = build_small(causal_lm_name)
    vocab = model.config.vocab_size
    assert_forward_shapes(model, vocab, lengths=(7,), batch_sizes=(2,))


def test_loss_matches_cross_entropy(causal_lm_name: str) -> None:
    assert_loss_consistent(build_small(causal_lm_name, vocab_size=V), V)


def test_causal_by_perturbation(causal_lm_name: str) -> None:
    assert_causal_by_perturbation(build_small(causal_lm_name, vocab_size=V), V, length=45)


def test_causal_by_gradient(causal_lm_name: str) -> None:
    assert_causal_by_gradient(build_small(causal_lm_name, vocab_size=V), V, length=45)


def test_iid_tokens_loss_stays_above_ln_vocab(causal_lm_name: str) -> None:
    result = assert_iid_floor(lambda: build_small(causal_lm_name, vocab_size=V), vocab=V)
    # Not vacuous: the run starts above the floor, and the floor is ln V - margin.
    assert result["first"] > math.log(V) - 0.02
    assert result["floor"] == pytest.approx(math.log(32) - 0.02)


def test_cached_decoding_matches_full_forward(causal_lm_name: str) -> None:
    model = build_small(causal_lm_name, vocab_size=V)
    # prefill 5, 35 single steps, a 13-token chunk, 27 single steps: 80 tokens, past a 64-slot buffer.
    assert_cached_decoding_matches(model, V, segments=(5,) + (1,) * 35 + (13,) + (1,) * 27)
    # a one-token prefill followed by one long chunk that itself crosses 64.
    assert_cached_decoding_matches(model, V, segments=(1, 70, 1, 1, 1))


def test_prefill_then_continue_in_steps_of_1_3_17(causal_lm_name: str) -> None:
    model = build_small(causal_lm_name, vocab_size=V)
    assert_cached_decoding_matches(model, V, segments=prefill_then_steps(19, (1, 3, 17), 90))
    # The same with the cache passed on without use_cache: a given cache is advanced all the same.
    assert_cached_decoding_matches(
        model, V, segments=prefill_then_steps(7, (17, 3, 1), 60), continue_with_use_cache=False
    )


def test_detach_keeps_values_and_cuts_the_graph(causal_lm_name: str) -> None:
    assert_detach_keeps_values_and_cuts_graph(build_small(causal_lm_name, vocab_size=V), V)


def test_state_round_trips_through_state_dict(causal_lm_name: str) -> None:
    assert_state_round_trips(build_small(causal_lm_name, vocab_size=V), V)


def test_greedy_generate_matches_full_forward(causal_lm_name: str) -> None:
    assert_greedy_generate_matches_full(build_small(causal_lm_name, vocab_size=V), V)


def test_save_load_round_trip(causal_lm_name: str, tmp_path: Path) -> None:
    model = build_small(causal_lm_name, vocab_size=V)
    assert_save_load_roundtrip(model, tmp_path / "saved", V)
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["config.json", "model.safetensors"]


def test_batch_independence(causal_lm_name: str) -> None:
    assert_batch_independent(build_small(causal_lm_name, vocab_size=V), V)


def test_deterministic_under_seed(causal_lm_name: str) -> None:
    assert_deterministic(lambda: build_small(causal_lm_name, seed=123, vocab_size=V), V)


def test_clear_errors_for_bad_input_ids(causal_lm_name: str) -> None:
    assert_clear_input_errors(build_small(causal_lm_name, vocab_size=V), V)


def test_gradients_reach_every_parameter(causal_lm_name: str) -> None:
    assert_gradients_reach_all_parameters(build_small(causal_lm_name, vocab_size=V), V)
