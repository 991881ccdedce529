"""Every causal LM is the shared shell over its mixer: same-seed builds agree outside the mixers, the
init scales the residual projections by role, and a hybrid is only a config."""

from __future__ import annotations

import math

import pytest
import torch

import hierseq
from hierseq.bench.report import parse_model_spec
from hierseq.modules.causal_lm import CausalLM

from .checks import SMALL_VOCAB, assert_cached_decoding_matches, assert_causal_by_perturbation, small_overrides
from .conftest import CAUSAL_LMS

V = SMALL_VOCAB
#: the shell's fields, the same for every model (mamba's default is mlp="none"; here all get one MLP).
SHELL = {"vocab_size": V, "d_model": 32, "n_layers": 3, "mlp": "swiglu", "norm": "rmsnorm", "init_std": 0.02}


def _build(name: str, seed: int = 0, **extra: object) -> CausalLM:
    torch.manual_seed(seed)
    return hierseq.build_model(parse_model_spec(name)[1], **{**small_overrides(name), **SHELL, **extra})


def _outside_mixers(model: CausalLM) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".mixer." not in n}


def test_every_causal_lm_is_the_shell() -> None:
    for name in CAUSAL_LMS:
        model = _build(name)
        assert isinstance(model, CausalLM), f"{name} is not the shared CausalLM shell"
        assert len(model.blocks) == SHELL["n_layers"]
        assert {type(b).__name__ for b in model.blocks} == {"Block"}


def test_everything_outside_the_mixer_is_identical_in_shape_and_value() -> None:
    reference = _outside_mixers(_build("transformer"))
    assert any(n.startswith("blocks.0.mlp.") for n in reference) and "embed.weight" in reference
    for name in CAUSAL_LMS:
        shell = _outside_mixers(_build(name))
        assert shell.keys() == reference.keys(), f"{name}: {sorted(shell.keys() ^ reference.keys())[:6]}"
        for n, p in shell.items():
            assert p.shape == reference[n].shape, f"{name}: {n} {tuple(p.shape)} vs {tuple(reference[n].shape)}"
            assert torch.equal(p, reference[n]), f"{name}: {n} differs in value from the transformer's"


def test_a_different_seed_changes_the_shell() -> None:
    a, b = _outside_mixers(_build("hamt", seed=0)), _outside_mixers(_build("hamt", seed=1))
    assert not torch.equal(a["embed.weight"], b["embed.weight"])


@pytest.mark.parametrize("name", CAUSAL_LMS)
def test_residual_projections_are_scaled_by_depth_by_role(name: str) -> None:
    """block.mixer.out_proj and block.mlp.out_proj ~ N(0, std / sqrt(2 n_layers)), other matrices N(0, std),
    whatever the mixer calls them."""
    n_layers, std = 12, 0.02
    model = _build(name, d_model=64, n_layers=n_layers)
    expected = std / math.sqrt(2 * n_layers)
    for block in model.blocks:
        for projection in (block.mixer.out_proj, block.mlp.out_proj):
            measured = projection.weight.std().item()
            assert abs(measured - expected) < 0.15 * expected, f"{name}: residual std {measured:.5f} vs {expected:.5f}"
    embed = model.embed.weight.std().item()
    assert abs(embed - std) < 0.1 * std, f"{name}: embedding std {embed:.4f}"
    gate_up = model.blocks[0].mlp.gate_up.weight.std().item()
    assert abs(gate_up - std) < 0.1 * std, f"{name}: MLP input std {gate_up:.4f}"


def test_a_hybrid_is_a_config() -> None:
    model = _build("hamt", n_layers=4, mixers=["hamt", "attention"], mixer_options={"attention": {"n_heads": 2}})
    assert [type(m).__name__ for m in model.mixers] == ["HolographicMemoryMixer", "Attention"] * 2
    assert model.blocks[1].mixer.n_heads == 2
    model.eval()
    assert_causal_by_perturbation(model, V, length=45)
    assert_cached_decoding_matches(model, V, segments=(9,) + (1,) * 20 + (17, 3))


@pytest.mark.parametrize(
    ("overrides", "rule"),
    [
        ({"mixers": ["hamt", "nope"]}, "unknown mixer"),
        ({"mixers": ["hamt", "attention", "hamt"]}, "must divide n_layers"),
        ({"mixers": ["hamt", "attention"], "mixer_options": {"tree": {}}}, "not a mixer of this model"),
        ({"mixers": ["hamt", "attention"], "mixer_options": {"attention": {"n_heads": 3}}}, "n_heads=3"),
        ({"mixers": ["hamt", "attention"], "mixer_options": {"attention": {"heads": 3}}}, "unknown field"),
    ],
)
def test_bad_schedules_fail_at_config_time(overrides: dict, rule: str) -> None:
    with pytest.raises(ValueError, match=rule):
        hierseq.build_config("hamt", d_model=32, n_layers=4, **overrides)
