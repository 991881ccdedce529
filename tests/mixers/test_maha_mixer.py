"""The MAHA mixer (MultiscaleAttention): causality at every scale alone, the reach pyramid (its kernel
against a loop over its definition, full-context reach at 16k tokens), the dilated conv it uses, the
three aggregations (convex = an exact QP over the simplex that depends on the scale outputs; nash = a
certified equilibrium of the redundancy game; softmax = plain gating), the aux term, the forward being
free of host reads (it runs on meta tensors), cached decoding == the full forward in every mode (state
advanced in place), ``state_size``, and the TBPTT refusal."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hierseq.mixers.maha import (
    MAHAMixerConfig,
    MAHAState,
    MultiscaleAttention,
    PyramidLevel,
    pyramid_window_attention,
)
from hierseq.modules.state import LayerState
from hierseq.ops.banded_attention import banded_attention
from hierseq.ops.redundancy_game import redundancy_game_nash_gap
from hierseq.ops.simplex import sparsemax
from hierseq.ops.simplex_qp import mixture_qp_kkt_residual, mixture_qp_reference_cvxpy, mixture_qp_weights

D = 32
AGGREGATIONS = ("convex", "nash", "softmax")
MODES = [(a, g) for a in ("windowed", "full") for g in AGGREGATIONS]


def small_cfg(**fields: object) -> MAHAMixerConfig:
    """The LM's small settings (tests/conformance): window 8 and r = 2, so 33-80 tokens cross many
    windows at every scale, reach the coarsest scale (needs r^(S-1) = 4 tokens) and the pyramid."""
    cfg = MAHAMixerConfig(**{"n_heads": 2, "n_scales": 3, "downsample": 2, "window": 8, **fields})
    cfg.check(D)
    return cfg


def make_mixer(seed: int = 0, d_model: int = D, **fields: object) -> MultiscaleAttention:
    torch.manual_seed(seed)
    cfg = MAHAMixerConfig(**{"n_heads": 2, "n_scales": 3, "downsample": 2, "window": 8, **fields})
    cfg.check(d_model)
    return MultiscaleAttention(d_model, cfg)


def test_the_conv_is_the_configured_dilated_depthwise_conv() -> None:
    mixer = make_mixer(conv_kernel=5, conv_dilation=3)
    assert (mixer.conv.kernel_size, mixer.conv.dilation, mixer.conv.channels) == (5, 3, D)
    assert mixer.conv.state_len == 12
    assert mixer.conv.bias is None  # unbiased, as the seed's conv started; a bias would cost D parameters


@pytest.mark.parametrize("attention", ["windowed", "full"])
def test_mixer_gradient_is_causal_at_every_scale_alone(attention: str) -> None:
    # Scores that put all the QP's weight on one scale (once it has a finished token): the output at t
    # must not depend on h > t, through that scale alone, the reach pyramid included (scale 2).
    mixer = make_mixer(seed=3, window=4, attention=attention)
    h = torch.randn(1, 48, D, requires_grad=True)
    for scale in range(3):
        with torch.no_grad():
            mixer.scores.weight.zero_()
            mixer.scores.bias.fill_(-100.0)
            mixer.scores.bias[scale] = 100.0
        for t in (3, 8, 17, 31, 47):
            h.grad = None
            y, state, _aux, weights = mixer.forward_with_weights(h)
            assert state is None
            assert weights[0, t, scale].item() == 1.0
            y[0, t].sum().backward()
            future = h.grad[0, t + 1 :].abs().sum().item()
            assert future == 0.0, f"scale {scale}: output at {t} depends on later inputs"
            assert h.grad[0, : t + 1].abs().sum().item() > 0


# ---------------------------------------------------------------------------------- reach pyramid
def pyramid_reference(q, first, levels, window, causal):
    """Loop over queries and levels, straight from the definition in pyramid_window_attention."""
    B, H, n, dk = q.shape
    out = torch.zeros(B, H, n, levels[0].v.shape[-1], dtype=q.dtype)
    for i in range(n):
        j = first + i
        keys, values = [], []
        for level in levels:
            if level.active is not None and not level.active[i]:
                continue
            g = level.group
            if causal:
                a = (j + 1) // g
                wanted = range(a - window, a)
            else:
                a = j // g
                wanted = range(a - window + 1, a + window)
            for idx in wanted:
                if idx >= max(level.first, 0) and idx < level.first + level.k.shape[2]:
                    keys.append(level.k[:, :, idx - level.first])
                    values.append(level.v[:, :, idx - level.first])
        k, v = torch.stack(keys, 2), torch.stack(values, 2)  # [B, H, K, d]
        scores = torch.einsum("bhd,bhkd->bhk", q[:, :, i], k) / math.sqrt(dk)
        out[:, :, i] = torch.einsum("bhk,bhkd->bhd", scores.softmax(-1), v)
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("first", "n"), [(0, 37), (13, 1), (20, 9), (0, 3)])
def test_pyramid_attention_matches_a_loop_over_its_definition(causal: bool, first: int, n: int) -> None:
    gen = torch.Generator().manual_seed(first * 100 + n)
    window, r = 4, 3
    q = torch.randn(2, 2, n, 6, generator=gen, dtype=torch.float64)
    total = first + n
    levels = []
    for m in range(4):  # the query level and three coarser ones, each holding only a recent slice
        g = r**m
        made = total // g if causal else -(-total // g)
        held_from = max(0, made - window - 2) if m else max(0, first - window)
        count = made - held_from
        k = torch.randn(2, 2, count, 6, generator=gen, dtype=torch.float64)
        v = torch.randn(2, 2, count, 5, generator=gen, dtype=torch.float64)
        queries = torch.arange(first, total)
        active = None if m == 0 or not causal else (queries + 1) // r ** (m - 1) > window
        levels.append(PyramidLevel(k, v, held_from, g, active))
    y = pyramid_window_attention(q, first, levels, window, causal)
    torch.testing.assert_close(y, pyramid_reference(q, first, levels, window, causal), atol=1e-12, rtol=0)


@pytest.mark.parametrize(("n_prefix", "n"), [(0, 50), (7, 1), (5, 23)])
def test_pyramid_with_one_level_is_banded_attention(n_prefix: int, n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(2, 3, n, 8, generator=gen)
    k = torch.randn(2, 3, n_prefix + n, 8, generator=gen)
    v = torch.randn(2, 3, n_prefix + n, 8, generator=gen)
    y = pyramid_window_attention(q, 30, [PyramidLevel(k, v, 30 - n_prefix, 1)], 8)
    torch.testing.assert_close(y, banded_attention(q, k, v, 8, n_prefix), atol=1e-5, rtol=0)


def _first_reached(mixer: MultiscaleAttention, length: int) -> int:
    """The earliest input position the output at the last position depends on (by gradient)."""
    h = torch.randn(1, length, mixer.d_model, requires_grad=True)
    mixer(h)[0][0, -1].sum().backward()
    return int((h.grad[0].abs().sum(-1) > 0).nonzero().min())


def test_the_pyramid_reaches_position_zero_where_the_windows_alone_do_not() -> None:
    # A single scale with window 8: without the pyramid the last output would see 8 tokens back plus
    # the conv's 4; the coarser levels carry it to position 0. Full mode reaches 0 trivially.
    for length in (16, 100, 1000):
        assert _first_reached(make_mixer(seed=1, n_scales=1, window=8), length) == 0
        assert _first_reached(make_mixer(seed=1, n_scales=3, downsample=4, window=4), length) == 0


def test_the_levels_grow_with_the_length_until_the_coarsest_covers_the_context() -> None:
    mixer = make_mixer(seed=2, n_scales=2, downsample=2, window=8).eval()
    for length in (30, 200, 3000):
        with torch.no_grad():
            state = mixer(torch.randn(1, length, D), use_cache=True)[1]
        # every level with a complete token exists (log2(L) + 1 of them), and one more holding the
        # pending tokens of the coarsest (it gets its first token when they complete a window) ...
        assert state.counts == [length // 2**level for level in range(len(state.counts))]
        assert len(state.counts) == int(math.log2(length)) + 2 and state.counts[-1] == 0
        # ... the last query (level 1, index j) uses level 1 + m iff floor((j + 1) / 2^(m-1)) > 8, and
        # the coarsest one it uses holds at most 8 tokens: its window reaches position 0.
        top = length // 2
        used = [m for m in range(len(state.counts) - 1) if m == 0 or top // 2 ** (m - 1) > 8]
        assert top // 2 ** used[-1] <= 8
        # the windowed state holds at most window keys per level: O(window log L), not O(L)
        assert all(k is None or k.shape[2] <= 8 for k in state.keys)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_reach_at_16k_tokens_one_layer(aggregation: str) -> None:
    # Windowed, 1 layer, tiny width (about a second each). Changing token 0 changes the output at the
    # last of 16384 positions (by gradient: the exact dependence, not a float difference).
    torch.manual_seed(5)
    cfg = MAHAMixerConfig(n_heads=2, n_scales=3, downsample=4, window=16, aggregation=aggregation, qk_head_dim=4)
    cfg.check(8)
    mixer = MultiscaleAttention(8, cfg)
    with torch.no_grad():  # sparse aggregations: make sure the pyramid scale is in the support there
        mixer.scores.bias.copy_(torch.tensor([0.0, 0.0, 3.0]))
    h = torch.randn(1, 16384, 8, requires_grad=True)
    y, _, _, weights = mixer.forward_with_weights(h)
    assert weights[0, -1, 2].item() > 0
    y[0, -1].sum().backward()
    assert h.grad[0, 0].abs().sum().item() > 0
    with torch.no_grad():
        h2 = h.detach().clone()
        h2[0, 0] += 1.0
        assert (mixer(h2)[0][0, -1] - y[0, -1]).abs().max().item() > 0


def test_windowed_with_a_large_window_equals_full_attention() -> None:
    full = make_mixer(attention="full")
    windowed = make_mixer(attention="windowed", window=128)
    windowed.load_state_dict(full.state_dict())
    h = torch.randn(2, 100, D)
    with torch.no_grad():
        torch.testing.assert_close(windowed(h)[0], full(h)[0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------- aggregation
def _problem(mixer: MultiscaleAttention, h: torch.Tensor):
    with torch.no_grad():
        outputs, mask, u, v, _ = mixer.candidates(h)
        weights, problem = mixer.aggregate(outputs, mask, u, v)
    return outputs, mask, u, v, weights, problem


def test_convex_weights_solve_the_qp_over_the_scale_outputs() -> None:
    mixer = make_mixer(seed=5, aggregation="convex")
    h = torch.randn(2, 40, D)
    outputs, mask, u, v, weights, p = _problem(mixer, h)
    residual = mixture_qp_kkt_residual(weights, p["outputs"], p["target"], p["scores"], p["ridge"], mask)
    assert residual.max().item() < 1e-5
    assert (weights[:, :1, 1:] == 0).all() and (weights[:, 1:3, 2] == 0).all()  # unfinished scales
    # The same weights from the default (host-reading) solver and, in float64, from the cvxpy oracle.
    lam = float(p["ridge"])
    torch.testing.assert_close(
        mixture_qp_weights(p["outputs"], p["target"], p["scores"], lam, mask), weights, atol=1e-5, rtol=0
    )
    pytest.importorskip("cvxpy")
    rows = (slice(None), slice(3, 13))
    oracle = mixture_qp_reference_cvxpy(
        p["outputs"][rows].double().numpy(), p["target"][rows].double().numpy(), p["scores"][rows].double().numpy(), lam
    )
    np.testing.assert_allclose(weights[rows].numpy(), oracle, atol=1e-5, rtol=0)


def test_convex_weights_depend_on_the_scale_outputs() -> None:
    # The defect: sparsemax(Linear(u)) never looks at the outputs. Here changing one scale's
    # output alone (scores and target fixed) changes the weights of the tokens that use that scale.
    mixer = make_mixer(seed=6, aggregation="convex")
    outputs, mask, u, v, weights, _ = _problem(mixer, torch.randn(2, 40, D))
    changed = outputs.clone()
    changed[..., 1, :] = changed[..., 1, :] * 3.0 + 0.5
    with torch.no_grad():
        again, _ = mixer.aggregate(changed, mask, u, v)
    moved = (again - weights).abs().amax(-1)
    uses = (weights[..., 1] > 0) | (again[..., 1] > 0)  # tokens where scale 1 is in the support
    assert uses.sum().item() > 20 and moved[uses].min().item() > 0 and moved.max().item() > 0.05
    # and the target (the token's own value) matters too
    with torch.no_grad():
        mixer.target_gain.mul_(-1.0)
        flipped, _ = mixer.aggregate(outputs, mask, u, v)
    assert (flipped - weights).abs().max().item() > 0.05


def test_nash_weights_are_a_certified_equilibrium_and_move_from_the_prior() -> None:
    """How far the game moves the weights from the prior sparsemax(relevance / crowding), the
    equilibrium without interaction (gamma = 0), per token, mean over tokens of ||w - prior||_1:

    * untrained (here: d_model 32, torch's default init, 2 x 64 tokens): mean 0.155 (largest change of
      a single weight 0.25);
    * at init in the 2-layer width-64 LM of the probe below: 0.25 / 0.19 (layers 1 / 2), max 0.32;
    * trained 600 AdamW steps on Austen (d_model 64, 2 layers, 16 x 256 bytes, lr 3e-3, val loss
      5.56 -> 1.65 nats): 0.082 / 0.074, max 0.22 / 0.25; gamma stays ~0.48, tau ~1.02; gap <= 1e-5.

    So training sharpens the relevances and the game's correction shrinks by about 3x but stays
    (up to 0.25 on single weights); the weights are never one-hot the way the seed's were."""
    mixer = make_mixer(seed=7, aggregation="nash")
    h = torch.randn(2, 64, D)
    outputs, mask, u, v, weights, p = _problem(mixer, h)
    gap = redundancy_game_nash_gap(weights, outputs, p["scores"], p["redundancy"], p["crowding"], mask)
    assert gap.max().item() <= 1e-4 and p["gap"].max().item() <= 1e-4
    prior = sparsemax(p["scores"] / p["crowding"], mask)
    moved = (weights - prior).abs()
    assert moved.sum(-1).mean().item() > 0.1 and moved.max().item() > 0.2


def test_softmax_is_plain_gating_of_the_same_scores() -> None:
    mixer = make_mixer(seed=8, aggregation="softmax")
    outputs, mask, u, v, weights, p = _problem(mixer, torch.randn(2, 40, D))
    expected = torch.softmax(p["scores"].masked_fill(~mask, float("-inf")), -1)
    torch.testing.assert_close(weights, expected, atol=0, rtol=0)
    # the same attention and scores as convex / nash at the same seed: only the aggregation differs
    convex = make_mixer(seed=8, aggregation="convex")
    assert {n for n, _ in convex.named_parameters()} - {n for n, _ in mixer.named_parameters()} == {
        "target_gain",
        "ridge",
    }
    assert torch.equal(convex.qk.weight, mixer.qk.weight) and torch.equal(convex.scores.weight, mixer.scores.weight)


def test_strengths_are_learned_within_their_constraints() -> None:
    mixer = make_mixer(aggregation="nash", nash_redundancy=0.3, nash_crowding=2.0)
    gamma, tau = mixer.game_strengths()
    assert gamma.item() == pytest.approx(0.3, rel=1e-5) and tau.item() == pytest.approx(2.0, rel=1e-5)
    for raw in (-30.0, 0.0, 30.0):  # any parameter value keeps 0 <= gamma < tau (a unique equilibrium)
        with torch.no_grad():
            mixer.redundancy.fill_(raw)
            mixer.crowding.fill_(-raw)
        gamma, tau = mixer.game_strengths()
        assert 0 <= gamma.item() < tau.item() and tau.item() >= 1e-3
    convex = make_mixer(aggregation="convex", convex_ridge=0.25)
    assert convex.ridge_value().item() == pytest.approx(0.25, rel=1e-5)
    fixed = make_mixer(aggregation="nash", learn_strengths=False, nash_redundancy=0.9, nash_crowding=1.0)
    assert fixed.game_strengths() == (0.9, 1.0) and not hasattr(fixed, "redundancy")


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_aux_is_the_load_balancing_term_only_when_asked(aggregation: str) -> None:
    mixer = make_mixer(seed=8, aggregation=aggregation)
    h = torch.randn(2, 40, D)
    y, state, aux = mixer(h)
    assert aux is None and state is None
    y2, _, aux, weights = mixer.forward_with_weights(h, need_aux=True)
    torch.testing.assert_close(y2, y, atol=0, rtol=0)
    usage = weights.mean(dim=(0, 1))
    torch.testing.assert_close(aux, 3 * usage.pow(2).sum() - 1.0)
    assert 0.0 < aux.item() < 3 - 1
    aux.backward()
    assert mixer.scores.weight.grad is not None and mixer.scores.weight.grad.abs().sum() > 0
    if aggregation != "softmax":  # the optimisation couples the weights to the attention outputs
        assert mixer.value.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("attention", "aggregation"), MODES)
def test_forward_backward_and_decoding_read_nothing_back_from_the_device(attention: str, aggregation: str) -> None:
    # Meta tensors hold no values: an .item(), a bool(tensor), a data-dependent shape (nonzero) or a
    # host-side check would raise. The whole forward, backward and cached decoding run on them, so on
    # an accelerator the mixer never waits for the device (the solvers run their sync-free mode).
    cfg = small_cfg(attention=attention, aggregation=aggregation)
    with torch.device("meta"):
        mixer = MultiscaleAttention(D, cfg)
        h = torch.randn(2, 90, D, requires_grad=True)
        step = torch.randn(2, 1, D)
    y, _, aux = mixer(h, need_aux=True)
    (y.sum() + aux).backward()
    assert h.grad.shape == h.shape and mixer.scores.weight.grad is not None
    _, state, _ = mixer(h[:, :37].detach(), use_cache=True)
    for _ in range(3):
        y, state, _ = mixer(step, state)
    assert y.shape == (2, 1, D) and state.length == 40


# ---------------------------------------------------------------------------------- decoding state
@pytest.mark.parametrize(("attention", "aggregation"), MODES)
def test_cached_decoding_equals_full_forward(attention: str, aggregation: str) -> None:
    """Prefill, single tokens and chunks crossing window, scale and pyramid-level boundaries: the same
    outputs as one full forward; a given state is advanced in place and returned."""
    mixer = make_mixer(seed=9, attention=attention, aggregation=aggregation).eval()
    h = torch.randn(2, 80, D)
    with torch.no_grad():
        full = mixer(h)[0]
        for segments in ((5,) + (1,) * 35 + (13,) + (1,) * 27, (1, 70, 1, 1, 7), (3, 17, 1, 3, 17, 39)):
            state, pieces, start = None, [], 0
            for i, size in enumerate(segments):
                y, returned, _ = mixer(h[:, start : start + size], state, use_cache=i == 0)
                assert isinstance(returned, MAHAState)
                assert state is None or returned is state
                state, start = returned, start + size
                assert state.length == start
                pieces.append(y)
            torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)
            levels = [80, 40, 20, 10, 5, 2, 1, 0] if attention == "windowed" else [80, 40, 20]
            assert state.counts == levels


@pytest.mark.parametrize("attention", ["windowed", "full"])
def test_state_size_bounds_the_state_and_windowed_state_grows_like_log(attention: str) -> None:
    """``state_size`` counts the keys exactly, plus at most r - 1 pending rows of D per level and the
    newest output per scale; ``num_floats`` counts what is held, also after a ``state_dict`` round
    trip. Windowed: at most window keys per level, log2(T) + 1 levels."""
    mixer = make_mixer(seed=10, window=8, attention=attention)
    S, r = 3, 2
    keys_width = mixer.n_heads * mixer.qk_dim + D
    with torch.no_grad():
        state = mixer(torch.randn(2, 3, D), use_cache=True)[1]
        for t in range(3, 150):
            mixer(torch.randn(2, 1, D), state)
            floats = state.num_floats() // 2
            keys = sum(0 if k is None else k.shape[2] for k in state.keys)
            assert keys * keys_width <= floats <= mixer.state_size(t + 1), f"t={t}"
            assert mixer.state_size(t + 1) - floats <= D * (r * len(state.counts) + S + mixer.conv.state_len)
            assert all(p is None or p.shape[1] < r for p in state.pending)
            if attention == "windowed":
                assert all(k is None or k.shape[2] <= 8 for k in state.keys)
    restored = LayerState.from_state_dict(state.state_dict())
    assert isinstance(restored, MAHAState) and restored.num_floats() == state.num_floats()
    if attention == "windowed":
        # O(window D log T): 100x the context costs log2(100) ~ 7 more levels of at most 8 keys each.
        growth = mixer.state_size(15_000) - mixer.state_size(150)
        assert 0 < growth <= 7 * (8 * keys_width + D * r)
    else:
        assert [k.shape[2] for k in state.keys] == [150, 75, 37]
        assert mixer.state_size(10_000) > 50 * mixer.state_size(150) / 1.5


def test_only_full_attention_refuses_tbptt() -> None:
    assert make_mixer(attention="windowed").tbptt_refusal() is None
    assert "full" in make_mixer(attention="full").tbptt_refusal()


def test_encoder_variant_refuses_a_state_and_sees_both_ways_through_the_pyramid() -> None:
    encoder = make_mixer(seed=11, causal=False, n_scales=2, window=4)
    h = torch.randn(1, 200, D, requires_grad=True)
    y = encoder(h)[0]
    assert y.shape == h.shape
    y[0, 100].sum().backward()
    reached = (h.grad[0].abs().sum(-1) > 0).nonzero()
    assert reached.min().item() == 0 and reached.max().item() == 199  # the whole sequence, both sides
    with pytest.raises(ValueError, match="state"):
        encoder(h, state=MAHAState.empty(2))
    with pytest.raises(ValueError, match="state"):
        encoder(h, use_cache=True)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_scales", 0),
        ("n_scales", 9),
        ("downsample", 1),
        ("attention", "sparse"),
        ("window", 0),
        ("aggregation", "mean"),
        ("qk_head_dim", 3),
        ("qk_head_dim", -2),
        ("nash_redundancy", -0.1),
        ("nash_redundancy", 1.0),
        ("nash_crowding", 0.0),
        ("convex_ridge", 0.0),
        ("per_scale_qk", 1),
        ("conv_dilation", 0),
        ("attn_dropout", 1.0),
        ("n_heads", 3),
    ],
)
def test_config_check_names_field_and_value(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        MAHAMixerConfig(**{"n_heads": 2, field: value}).check(D)
    with pytest.raises(ValueError, match="conv_kernel=4"):
        MAHAMixerConfig(n_heads=2, conv_kernel=4, causal=False).check(D)
    with pytest.raises(ValueError, match="window=2: must be >= downsample - 1 = 3"):
        MAHAMixerConfig(n_heads=2, window=2, downsample=4).check(D)
    MAHAMixerConfig(n_heads=2, window=2, downsample=4, attention="full").check(D)  # no pyramid there
    # a width at which no query/key head fits the budget automatically: the error says what to set
    with pytest.raises(ValueError, match="qk_head_dim=0.*set qk_head_dim explicitly"):
        MAHAMixerConfig(n_heads=4, n_scales=8).check(8)
