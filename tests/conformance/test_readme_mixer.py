"""The README's "Add a mixer in one file" example, executed as written: one mixer file and one
registration make a causal LM that passes the conformance checks with nothing else added."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

import hierseq
from hierseq import registry
from hierseq.mixers import base as mixer_base

from .checks import (
    SMALL_VOCAB,
    assert_cached_decoding_matches,
    assert_causal_by_gradient,
    assert_causal_by_perturbation,
    assert_detach_keeps_values_and_cuts_graph,
    assert_gradients_reach_all_parameters,
    assert_iid_floor,
    assert_save_load_roundtrip,
    assert_state_round_trips,
    prefill_then_steps,
)

README = Path(__file__).resolve().parents[2] / "README.md"
V = SMALL_VOCAB


def _example_source() -> str:
    text = README.read_text()
    section = text[text.index("### Add a mixer in one file") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README lost its mixer example"
    return match.group(1)


@pytest.fixture(scope="module")
def short_conv():
    module = types.ModuleType("readme_short_conv")  # a real module: dataclasses look their class up in it
    sys.modules[module.__name__] = module
    exec(compile(_example_source(), str(README), "exec"), module.__dict__)  # noqa: S102 - our own README
    yield "short_conv"
    registry._REGISTRY.pop("short_conv", None)
    mixer_base.MIXERS.pop("short_conv", None)
    del sys.modules[module.__name__]


def _build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return hierseq.build_model(name, vocab_size=V, d_model=32, n_layers=2).eval()


def test_the_example_is_a_causal_lm_of_the_shell(short_conv):
    assert "short_conv" in hierseq.list_models("causal_lm")
    model = _build(short_conv)
    assert type(model.blocks[0].mixer).__name__ == "ShortConv"


def test_the_example_passes_the_conformance_checks(short_conv, tmp_path):
    model = _build(short_conv)
    assert_causal_by_perturbation(model, V)
    assert_causal_by_gradient(model, V)
    assert_cached_decoding_matches(model, V)
    assert_cached_decoding_matches(model, V, segments=prefill_then_steps(19, (1, 3, 17), 90))
    assert_detach_keeps_values_and_cuts_graph(model, V)
    assert_state_round_trips(model, V)
    assert_gradients_reach_all_parameters(model, V)
    assert_save_load_roundtrip(model, tmp_path / "saved", V)
    assert_iid_floor(lambda: _build(short_conv).train(), vocab=V)
