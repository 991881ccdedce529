"""Tree attention decoder: the conformance checks in the non-default (exact) sibling mode, the
structure of the mixer (exact == dense causal attention, summary pooling, O(log L) decode state),
regression tests for each defect of the seed, the seed's ``Decoder`` API and config validation.

The default (summary) mode runs the whole conformance suite through the registry; here the same
check functions run for ``sibling_mode="exact"``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tests.conformance.checks import (
    assert_batch_independent,
    assert_cached_decoding_matches,
    assert_causal_by_gradient,
    assert_causal_by_perturbation,
    assert_clear_input_errors,
    assert_deterministic,
    assert_forward_shapes,
    assert_gradients_reach_all_parameters,
    assert_greedy_generate_matches_full,
    assert_iid_floor,
    assert_loss_consistent,
    assert_save_load_roundtrip,
    build_small,
    random_ids,
)

import hierseq
from hierseq.layers import tree_attention
from hierseq.mixers.tree import (
    TreeAttention,
    leaf_summaries,
    merge_summaries,
    summary_pyramid,
    tree_levels,
)
from hierseq.models.tree import Decoder, TreeConfig, TreeLM
from hierseq.training.trainer import TrainConfig

V = 32
LEAF = TreeConfig.small_overrides()["leaf_size"]  # 8
ROOT = Path(__file__).resolve().parents[2]


def small_tree(mode: str, seed: int = 0, **extra) -> TreeLM:
    return build_small("tree", seed=seed, vocab_size=V, sibling_mode=mode, **extra)


def dense_reference(attn: TreeAttention, x: torch.Tensor) -> torch.Tensor:
    """The same projections and rotary positions as ``attn``, with plain causal SDPA. x: [B, L, D]."""
    B, L, D = x.shape
    qkv = attn.qkv(x).view(B, L, 3, attn.n_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.rotary(q, k, 0)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attn.out(y.transpose(1, 2).reshape(B, L, D))


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
        assert_greedy_generate_matches_full(model, V)

    def test_round_trip_batch_determinism_gradients(self, tmp_path: Path) -> None:
        model = small_tree("exact")
        loaded = assert_save_load_roundtrip(model, tmp_path / "saved", V)
        assert loaded.config.sibling_mode == "exact"
        assert_batch_independent(model, V)
        assert_deterministic(lambda: small_tree("exact", seed=123), V)
        assert_gradients_reach_all_parameters(model, V)


# ----------------------------------------------------------------------------- the mixer itself
@pytest.mark.parametrize("length", [1, 5, 8, 9, 33, 64, 100, 257])
def test_exact_mode_equals_dense_causal_attention(length: int) -> None:
    torch.manual_seed(0)
    attn = TreeAttention(32, 2, LEAF, "exact", 4)
    x = torch.randn(2, length, 32)
    with torch.no_grad():
        diff = (attn(x) - dense_reference(attn, x)).abs().max().item()
    assert diff < 1e-5


def test_summary_mode_is_a_different_approximation_that_is_exact_on_short_inputs() -> None:
    torch.manual_seed(0)
    exact = TreeAttention(32, 2, LEAF, "exact", 4)
    summary = TreeAttention(32, 2, LEAF, "summary", 4)
    summary.load_state_dict(exact.state_dict())
    x = torch.randn(1, 40, 32)
    with torch.no_grad():
        y_exact, y_summary = exact(x), summary(x)
    # Inside the first leaf nothing is summarised, so both modes agree there ...
    assert torch.allclose(y_exact[:, :LEAF], y_summary[:, :LEAF], atol=1e-6)
    # ... and from the second leaf on, pooled siblings change the result.
    assert (y_exact[:, LEAF:] - y_summary[:, LEAF:]).abs().max() > 1e-3


def test_summary_log_count_offset_makes_pooling_exact_for_equal_keys() -> None:
    """With every key equal, exact attention is the plain mean of the visible values. A summary token
    averages g values and carries + log g on its logit, so it weighs as much as the g tokens it stands
    for: summary mode then gives exactly the same mean (without the offset it would not)."""
    torch.manual_seed(0)
    summary = TreeAttention(32, 2, LEAF, "summary", 2)
    exact = TreeAttention(32, 2, LEAF, "exact", 2)
    with torch.no_grad():
        summary.qkv.weight[32:64].zero_()  # key projection: every key is 0, every logit equal
    exact.load_state_dict(summary.state_dict())
    x = torch.randn(2, 77, 32)
    with torch.no_grad():
        assert torch.allclose(summary(x), exact(x), atol=1e-5)


def test_summary_pyramid_matches_direct_pooling() -> None:
    torch.manual_seed(0)
    keys = torch.randn(2, 3, 7, 8, 4)  # [B, H, n_leaves, leaf, Dh]
    pyramid = summary_pyramid(leaf_summaries(keys, 2), tree_levels(7))
    assert [p.shape[2] for p in pyramid] == [7, 4, 2]
    flat = keys.flatten(2, 3)  # [B, H, 56, Dh]
    # level 2, node 0 covers leaves 0-3 (32 tokens): two segments of 16 tokens each.
    direct = flat[:, :, :32].unflatten(2, (2, 16)).mean(dim=3)
    assert torch.allclose(pyramid[2][:, :, 0], direct, atol=1e-6)
    # merging two summaries = pooling their union
    assert torch.allclose(merge_summaries(pyramid[0][:, :, 4], pyramid[0][:, :, 5]), pyramid[1][:, :, 2], atol=0)


@pytest.mark.parametrize("n_leaves, levels", [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (512, 9), (513, 10)])
def test_tree_levels(n_leaves: int, levels: int) -> None:
    assert tree_levels(n_leaves) == levels


def test_summary_decode_state_is_logarithmic_and_exact_state_is_linear() -> None:
    n = 160
    for mode in ("summary", "exact"):
        model = small_tree(mode, n_layers=1)
        ids = random_ids(1, n, V, seed=11)
        with torch.no_grad():
            out = model(ids[:, :3], use_cache=True)
            sizes = []
            for t in range(3, n):
                out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True)
                sizes.append(out.cache.layers[0].num_cached_keys())
        if mode == "summary":
            # at most leaf - 1 raw keys plus n_summary per set bit of the number of completed leaves
            bound = max((LEAF - 1) + 4 * bin(t // LEAF).count("1") for t in range(4, n + 1))
            assert max(sizes) <= bound <= LEAF - 1 + 4 * tree_levels(n // LEAF + 1)
            assert max(sizes) < n // 4
        else:
            assert sizes == list(range(4, n + 1))  # every past token: the quadratic mode, honestly


def test_summary_cache_after_a_long_prefill_holds_only_logarithmic_memory() -> None:
    """The prefill stores copies, not views of the prompt's projections, so the cache's storage is just
    the keys a new token attends to: at most leaf - 1 raw tokens plus n_summary per tree level."""
    model = small_tree("summary", n_layers=1)
    with torch.no_grad():
        layer = model(random_ids(1, 1001, V, seed=16), use_cache=True).cache.layers[0]
    tensors = [layer.leaf_k, layer.leaf_v] + [t for slot in layer.slots if slot is not None for t in slot]
    bytes_per_key = 32 * 4  # n_heads * head_dim = d_model = 32 floats
    assert sum(t.untyped_storage().nbytes() for t in tensors) == 2 * layer.num_cached_keys() * bytes_per_key
    # 1001 = 125 leaves (0b1111101: 6 set bits) + 1 token
    assert layer.num_cached_keys() == 1 + 4 * 6


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

    monkeypatch.setattr(tree_attention, "causal_bias", seed_reversed_mask)
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
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_seed_defect_half_precision_padding_gives_no_nan(mode: str, dtype: torch.dtype) -> None:
    """Defect 4: the seed's -1e9 mask overflows in fp16 and fully masked rows gave NaN. Here every row,
    pad rows included, is finite in fp16/bf16, and real positions stay close to fp32."""
    torch.manual_seed(0)
    attn = TreeAttention(32, 2, LEAF, mode, 4)
    length = 4 * LEAF + 1  # the last leaf is one real token and LEAF - 1 pads
    x = torch.randn(2, length, 32)
    B, L, D = x.shape
    qkv = attn.qkv(x).view(B, L, 3, 2, 16)
    q, k, v = (t.to(dtype) for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))
    padded = [F.pad(t, (0, 0, 0, 5 * LEAF - length)) for t in (q, k, v)]
    with torch.no_grad():
        inner = attn._exact_levels if mode == "exact" else attn._summary_gathered
        every_row = inner(*padded, n_leaves=5)  # [B, H, 5*LEAF, Dh], pad rows included
        assert torch.isfinite(every_row).all()
        half = attn.to(dtype)(x.to(dtype)).float()
        full = attn.float()(x)
    assert torch.isfinite(half).all()
    assert (half - full).abs().max() < (0.05 if dtype == torch.bfloat16 else 0.01)


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
    assert model.config.leaf_size == 8 and model.config.sibling_mode == "exact"
    ids = torch.randint(0, 100, (3, 50))  # shorter than sequence_length and not a multiple of 8
    logits = model(ids)
    assert logits.shape == (3, 50, 100)
    with torch.no_grad():
        probs = model(ids, training=False)
    assert probs.shape == (3, 50, 100)
    assert torch.allclose(probs.sum(-1), torch.ones(3, 50), atol=1e-5)
    assert torch.allclose(probs, torch.softmax(logits.detach(), -1), atol=1e-6)
    assert isinstance(model, TreeLM) and model.config.model_type == "tree"


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
