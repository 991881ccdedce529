"""Tree attention decoder (the LM): the conformance checks in the non-default (exact) sibling mode, the
LM's decoding state, regression tests for each defect of the seed, the seed's ``Decoder`` API
(``hierseq.compat.tree``) and config validation.

The default (summary) mode runs the whole conformance suite through the registry; here the same
check functions run for ``sibling_mode="exact"``. The mixer itself (exact == dense attention, summary
pooling, the O(log L) state) is tested in tests/mixers/test_tree.py, its ops in tests/ops/test_tree_attention.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tests.conformance.checks import (
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
    random_ids,
)

import hierseq
from hierseq.compat.tree import Decoder
from hierseq.mixers import tree as tree_mixer
from hierseq.mixers.tree import TreeAttention, TreeAttentionCache
from hierseq.models.causal_lms import TreeConfig, TreeLM
from hierseq.modules.state import DecodingState
from hierseq.training.trainer import TrainConfig

V = 32
LEAF = TreeConfig.small_overrides()["leaf_size"]  # 8
ROOT = Path(__file__).resolve().parents[2]


def small_tree(mode: str, seed: int = 0, **extra) -> TreeLM:
    return build_small("tree", seed=seed, vocab_size=V, sibling_mode=mode, **extra)


# ------------------------------------------------------------ conformance checks, exact mode
class TestExactModeConformance:
    """The conformance suite's checks for ``sibling_mode="exact"`` (summary runs in tests/conformance)."""

    def test_shapes_loss_and_errors(self) -> None:
        model = small_tree("exact")
        assert_forward_shapes(model, V, lengths=(1, 7, 33, 100), batch_sizes=(1, 3))
        assert_loss_consistent(model, V)
        assert_clear_input_errors(model, V)

    def test_causal_by_perturbation_and_gradient(self) -> None:
        model = small_tree("exact")
        assert_causal_by_perturbation(model, V, length=45)
        assert_causal_by_gradient(model, V, length=45)

    def test_iid_floor(self) -> None:
        # Exact mode is dense causal attention (tested above); 20 steps at lr 1e-2 still expose a leak
        # (see the reversed-mask regression test) at a third of the default cost.
        result = assert_iid_floor(lambda: small_tree("exact"), vocab=V, steps=20, batch=8, lr=1e-2)
        assert result["first"] > math.log(V) - 0.02

    def test_cached_decoding_and_generation(self) -> None:
        model = small_tree("exact")
        assert_cached_decoding_matches(model, V, segments=(5,) + (1,) * 35 + (13,) + (1,) * 27)
        assert_cached_decoding_matches(model, V, segments=(1, 70, 1, 1, 1))
        assert_cached_decoding_matches(model, V, segments=prefill_then_steps(19, (1, 3, 17), 90))
        assert_cached_decoding_matches(
            model, V, segments=prefill_then_steps(7, (17, 3, 1), 60), continue_with_use_cache=False
        )
        assert_greedy_generate_matches_full(model, V)

    def test_state_detach_and_round_trip(self) -> None:
        model = small_tree("exact")
        assert_detach_keeps_values_and_cuts_graph(model, V)
        assert_state_round_trips(model, V)

    def test_round_trip_batch_determinism_gradients(self, tmp_path: Path) -> None:
        model = small_tree("exact")
        loaded = assert_save_load_roundtrip(model, tmp_path / "saved", V)
        assert loaded.config.sibling_mode == "exact"
        assert_batch_independent(model, V)
        assert_deterministic(lambda: small_tree("exact", seed=123), V)
        assert_gradients_reach_all_parameters(model, V)


# ------------------------------------------------------------------------------- the LM's cache
@pytest.mark.parametrize("mode", ["summary", "exact"])
def test_cache_is_a_decoding_state_of_tree_states_sized_by_state_floats(mode: str) -> None:
    model = small_tree(mode)
    assert all(isinstance(block.mixer, TreeAttention) for block in model.blocks)
    assert model.tbptt_refusal() is None if mode == "summary" else "exact" in model.tbptt_refusal()
    ids = random_ids(2, 77, V, seed=10)
    with torch.no_grad():
        cache = model(ids[:, :40], use_cache=True).cache
        assert isinstance(cache, DecodingState) and cache.length == 40
        assert all(isinstance(layer, TreeAttentionCache) and layer.length == 40 for layer in cache.layers)
        assert cache.num_floats() == 2 * model.state_floats(40)
        for t in range(40, 77):
            assert model(ids[:, t : t + 1], cache=cache).cache is cache
        assert cache.length == 77 and cache.num_floats() == 2 * model.state_floats(77)


def test_cache_reorder_selects_rows() -> None:
    model = small_tree("summary")
    ids = random_ids(3, 30, V, seed=12)
    with torch.no_grad():
        out = model(ids[:, :29], use_cache=True)
        out.cache.reorder(torch.tensor([2, 0]))
        step = model(ids[[2, 0], 29:], cache=out.cache, use_cache=True).logits
        full = model(ids[[2, 0]]).logits
    assert torch.allclose(step[:, 0], full[:, -1], atol=1e-5)


# ------------------------------------------------------------------- regressions: seed defects
def test_seed_defect_reversed_mask_is_caught_by_the_iid_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defect 1: the seed masked the allowed positions, so each leaf query saw only later tokens.
    Re-creating that mask in our mixer must make the i.i.d.-token floor check fail."""

    def seed_reversed_mask(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        lower = torch.ones(size, size, dtype=torch.bool, device=device).tril(-1)
        return torch.zeros(size, size, dtype=dtype, device=device).masked_fill(lower, float("-inf"))

    # the mixer's own reference to the op (it imports the name), so every leaf attention uses it
    monkeypatch.setattr(tree_mixer, "causal_bias", seed_reversed_mask)
    with pytest.raises(AssertionError, match="ln V"):
        # lr 1e-2 so that 20 steps suffice: the leaking model reaches ~3.40 nats, floor 3.446
        assert_iid_floor(lambda: small_tree("summary"), vocab=V, steps=20, batch=8, lr=1e-2)


@pytest.mark.parametrize("mode", ["summary", "exact"])
def test_seed_defect_right_child_keeps_its_own_content(mode: str) -> None:
    """Defect 2: the seed replaced a right child by its cross-attention output. Here perturbing a token
    of a right child (at every level) changes that token's own logits."""
    model = small_tree(mode)
    length = 8 * LEAF
    # first and last token of right children at levels 0, 1, 2 (leaf 1, leaves 2-3, leaves 4-7)
    positions = [LEAF, 2 * LEAF - 1, 2 * LEAF, 4 * LEAF - 1, 4 * LEAF, 8 * LEAF - 1]
    base = random_ids(1, length, V, seed=13)
    batch = base.repeat(len(positions) + 1, 1)
    for row, t in enumerate(positions, start=1):
        batch[row, t] = (base[0, t] + 1) % V
    logits = build_logits(model, batch)
    for row, t in enumerate(positions, start=1):
        assert (logits[row, t] - logits[0, t]).abs().max() > 1e-3, f"token {t}'s logits ignore token {t}"


def build_logits(model: TreeLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("mode", ["summary", "exact"])
def test_seed_defect_lengths_not_divisible_by_the_tree_work(mode: str) -> None:
    """Defect 5: the seed crashed unless L was a multiple of 2**levels, and real tokens attended to pad.
    Here any length works, and the logits of a prefix do not depend on how much padding follows it."""
    model = small_tree(mode)
    ids = random_ids(2, 77, V, seed=14)
    full = build_logits(model, ids)
    for length in (1, 3, 8, 9, 15, 17, 31, 33, 47, 64, 65, 76):
        prefix = build_logits(model, ids[:, :length])
        assert prefix.shape == (2, length, V)
        assert torch.allclose(prefix, full[:, :length], atol=1e-5), f"length {length}"


def test_long_input_works_beyond_any_fixed_table() -> None:
    """Defect (spec): the seed's sinusoidal table had a fixed length. Rotary positions and a growing
    tree handle any length; one 2050-token input gives finite logits and a prefix-consistent result."""
    model = small_tree("summary")
    ids = random_ids(1, 2050, V, seed=15)
    logits = build_logits(model, ids)
    assert torch.isfinite(logits).all()
    assert torch.allclose(build_logits(model, ids[:, :1030]), logits[:, :1030], atol=1e-5)


# --------------------------------------------------------------------------------- seed API
def test_seed_decoder_readme_example() -> None:
    torch.manual_seed(0)
    model = Decoder(vocab_size=100, sequence_length=64, heads=2, d_model=32, levels=3)
    assert model.config.leaf_size == 8
    assert (model.config.level_mode, model.config.sibling_mode) == ("levelwise", "summary")
    ids = torch.randint(0, 100, (3, 50))  # shorter than sequence_length and not a multiple of 8
    logits = model(ids)
    assert logits.shape == (3, 50, 100)
    with torch.no_grad():
        probs = model(ids, training=False)
    assert probs.shape == (3, 50, 100)
    assert torch.allclose(probs.sum(-1), torch.ones(3, 50), atol=1e-5)
    assert torch.allclose(probs, torch.softmax(logits.detach(), -1), atol=1e-6)
    assert isinstance(model, TreeLM) and model.config.model_type == "tree"


def test_seed_decoder_levels_change_the_logits_with_the_same_weights() -> None:
    """``levels`` sets the depth of the tree (via the leaf size), so with one set of weights a different
    depth is a different function; ``sibling_mode`` is honoured too."""
    ids = random_ids(2, 64, 100, seed=3)
    torch.manual_seed(0)
    reference = Decoder(vocab_size=100, sequence_length=64, heads=2, d_model=32, levels=1).eval()
    logits = {}
    for levels in (1, 3, 5):
        for sibling_mode in ("summary", "exact"):
            model = Decoder(100, 64, 2, 32, levels, sibling_mode=sibling_mode).eval()
            model.load_state_dict(reference.state_dict())
            with torch.no_grad():
                logits[levels, sibling_mode] = model(ids)
    keys = list(logits)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            # At init attention is near uniform, where pooling barely changes it: differences are small
            # (~1e-4) but far above float noise (~1e-7).
            assert (logits[a] - logits[b]).abs().max() > 1e-5, (a, b)


def test_seed_decoder_levels_rule() -> None:
    with pytest.raises(ValueError, match=r"^levels=7 needs sequence_length >= 128, got 100$"):
        Decoder(vocab_size=100, sequence_length=100, heads=2, d_model=32, levels=7)
    with pytest.raises(ValueError, match="levels=-1"):
        Decoder(vocab_size=100, sequence_length=100, heads=2, d_model=32, levels=-1)
    with pytest.raises(ValueError, match="sequence_length=0"):
        Decoder(vocab_size=100, sequence_length=0, heads=2, d_model=32, levels=0)
    assert Decoder(vocab_size=10, sequence_length=100, heads=2, d_model=16, levels=6).config.leaf_size == 2


# ------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"sibling_mode": "full"}, r"sibling_mode='full': must be one of \['exact', 'summary'\]"),
        ({"leaf_size": 0}, "leaf_size=0: must be a positive integer"),
        ({"n_summary": 3}, "n_summary=3: must divide leaf_size=32"),
        ({"n_summary": 0}, "n_summary=0: must be a positive integer"),
        ({"n_heads": 3}, "d_model=256: must be divisible by n_heads=3"),
        ({"d_model": 20, "n_heads": 4}, "n_heads=4: head dim d_model/n_heads=5 must be even"),
    ],
)
def test_config_validation(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hierseq.build_model("tree", **overrides)


def test_yaml_config_builds_the_benchmarked_model() -> None:
    cfg = TrainConfig.from_yaml(ROOT / "configs" / "tree.yaml")
    assert cfg.model == "tree"
    model_cfg = hierseq.build_config("tree", **cfg.model_config)
    assert (model_cfg.d_model, model_cfg.n_layers, model_cfg.sibling_mode) == (256, 4, "summary")
