"""The MAHA mixer (MultiscaleAttention): causality at every scale alone, the reach of the coarse scales,
the dilated conv it uses, the convex / Nash aggregation weights, the aux term, cached decoding == the
full forward in every mode (state advanced in place), ``state_size``, and the TBPTT refusal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hierseq.mixers.attention import KVState
from hierseq.mixers.maha import MAHAMixerConfig, MAHAState, MultiscaleAttention
from hierseq.modules.state import LayerState
from hierseq.ops.simplex import simplex_kkt_residual

D = 32
MODES = [(a, g) for a in ("windowed", "full") for g in ("convex", "nash")]


def small_cfg(**fields: object) -> MAHAMixerConfig:
    """The LM's small settings (tests/conformance): window 8 and r = 2, so 33-80 tokens cross many
    windows at every scale and reach the coarsest scale (needs r^(S-1) = 4 tokens)."""
    cfg = MAHAMixerConfig(**{"n_heads": 2, "n_scales": 3, "downsample": 2, "window": 8, **fields})
    cfg.check(D)
    return cfg


def make_mixer(seed: int = 0, **fields: object) -> MultiscaleAttention:
    torch.manual_seed(seed)
    return MultiscaleAttention(D, small_cfg(**fields))


def test_the_conv_is_the_configured_dilated_depthwise_conv() -> None:
    mixer = make_mixer(conv_kernel=5, conv_dilation=3)
    assert (mixer.conv.kernel_size, mixer.conv.dilation, mixer.conv.channels) == (5, 3, D)
    assert mixer.conv.state_len == 12
    assert not mixer.conv.bias.any()  # unbiased at construction, as the seed's conv


def test_mixer_gradient_is_causal_at_every_scale_alone() -> None:
    # One mixer, forced to a single scale via sparsemax scores: the output at t must not depend on h > t.
    mixer = make_mixer(seed=3, window=4)
    h = torch.randn(1, 32, D, requires_grad=True)
    for scale in range(3):
        with torch.no_grad():
            mixer.scores.weight.zero_()
            mixer.scores.bias.fill_(-100.0)
            mixer.scores.bias[scale] = 100.0  # sparsemax puts all weight on this scale once available
        for t in (3, 8, 17, 31):
            h.grad = None
            y, state, _aux, weights = mixer.forward_with_weights(h)
            assert state is None
            assert weights[0, t, scale].item() == 1.0
            y[0, t].sum().backward()
            future = h.grad[0, t + 1 :].abs().sum().item()
            assert future == 0.0, f"scale {scale}: output at {t} depends on later inputs"
            assert h.grad[0, : t + 1].abs().sum().item() > 0


def test_coarse_scales_reach_beyond_the_fine_window() -> None:
    # Windowed mode: scale 0 sees the last `window` positions (+ conv context); coarse scales see
    # window * r^s. A single scale cannot reach position t - 40 with window 8; three scales can.
    torch.manual_seed(4)
    h = torch.randn(1, 64, D, requires_grad=True)
    reach = {}
    for n_scales in (1, 3):
        mixer = MultiscaleAttention(D, small_cfg(n_scales=n_scales, downsample=4, window=8))
        h.grad = None
        mixer(h)[0][0, 63].sum().backward()
        reach[n_scales] = int((h.grad[0].abs().sum(-1) > 0).nonzero().min())
    assert reach[1] >= 63 - 8 - 4  # window + dilated conv context
    assert reach[3] <= 63 - 40


def test_windowed_with_a_large_window_equals_full_attention() -> None:
    full = make_mixer(attention="full")
    windowed = make_mixer(attention="windowed", window=128)
    windowed.load_state_dict(full.state_dict())
    h = torch.randn(2, 100, D)
    with torch.no_grad():
        torch.testing.assert_close(windowed(h)[0], full(h)[0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- aggregation / aux
def test_convex_weights_are_the_simplex_projection_of_the_scores() -> None:
    mixer = make_mixer(seed=5, aggregation="convex")
    with torch.no_grad():
        mixer.scores.weight.mul_(50)
    # Inputs from tiny (scores ~ the bias: dense weights) to unit size (scores spread by ~30: sparse).
    h = torch.randn(2, 40, D) * torch.logspace(-3, 0, 40).view(1, 40, 1)
    with torch.no_grad():
        weights = mixer.forward_with_weights(h)[3]
        scores = mixer.scores(h + F.silu(mixer.conv(h)))
    available = slice(3, None)  # all three scales have a finished token from position 3 on
    residual = simplex_kkt_residual(weights[:, available].double(), scores[:, available].double())
    assert residual.max().item() < 1e-5
    assert (weights[:, :1, 1:] == 0).all() and (weights[:, 1:3, 2] == 0).all()  # unfinished scales
    support = (weights[:, available] > 0).sum(-1)
    assert support.min().item() < 3 and support.max().item() > 1, support


def test_nash_in_mixer_is_at_its_fixed_point() -> None:
    mixer = make_mixer(seed=7, aggregation="nash", nash_iters=6)
    h = torch.randn(1, 40, D)
    with torch.no_grad():
        weights = mixer.forward_with_weights(h)[3]
        more = []
        for iters in (6, 30):
            mixer.cfg.nash_iters = iters
            more.append(mixer.forward_with_weights(h)[3])
    mixer.cfg.nash_iters = 6
    torch.testing.assert_close(more[0], weights)
    # Six contraction steps already sit within 2^-6 of the equilibrium; 30 more change next to nothing.
    assert (more[1] - weights).abs().max().item() < 2**-6


@pytest.mark.parametrize("aggregation", ["convex", "nash"])
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
    if aggregation == "nash":  # the game couples the weights to the attention outputs
        assert mixer.value.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------- decoding state
@pytest.mark.parametrize(("attention", "aggregation"), MODES)
def test_cached_decoding_equals_full_forward(attention: str, aggregation: str) -> None:
    """Prefill, single tokens and chunks crossing window and scale boundaries: the same outputs as one
    full forward; a given state is advanced in place and returned."""
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
            assert state.counts == [80, 40, 20]


@pytest.mark.parametrize("attention", ["windowed", "full"])
def test_state_size_bounds_the_state_and_windowed_state_is_bounded(attention: str) -> None:
    """``state_size`` counts the keys exactly, plus at most r rows of D per scale for the pending finer
    tokens and the newest coarse output; ``num_floats`` counts only the keys held (not a KV buffer's spare
    capacity), also after a ``state_dict`` round trip. Windowed: window - 1 keys per scale at most."""
    mixer = make_mixer(seed=10, window=8, attention=attention)
    S, r = 3, 2
    with torch.no_grad():
        state = mixer(torch.randn(2, 3, D), use_cache=True)[1]
        for t in range(3, 150):
            mixer(torch.randn(2, 1, D), state)
            floats = state.num_floats() // 2
            assert mixer.state_size(t + 1) - D * S * r <= floats <= mixer.state_size(t + 1), f"t={t}"
            assert all(p is None or p.shape[1] < r for p in state.pending)
            if attention == "windowed":
                assert all(k.shape[2] <= 7 for k in state.keys)
    restored = LayerState.from_state_dict(state.state_dict())
    assert isinstance(restored, MAHAState) and restored.num_floats() == state.num_floats()
    if attention == "windowed":
        assert mixer.state_size(150) == mixer.state_size(10_000)  # does not grow with context
    else:
        assert all(isinstance(k, KVState) and k.length == n for k, n in zip(state.keys, (150, 75, 37)))
        assert mixer.state_size(10_000) > mixer.state_size(150)


def test_only_full_attention_refuses_tbptt() -> None:
    assert make_mixer(attention="windowed").tbptt_refusal() is None
    assert "full" in make_mixer(attention="full").tbptt_refusal()


def test_encoder_variant_refuses_a_state() -> None:
    encoder = make_mixer(causal=False)
    h = torch.randn(1, 10, D)
    assert encoder(h)[0].shape == h.shape
    with pytest.raises(ValueError, match="state"):
        encoder(h, state=MAHAState.empty(3))
    with pytest.raises(ValueError, match="state"):
        encoder(h, use_cache=True)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_scales", 0),
        ("downsample", 1),
        ("attention", "sparse"),
        ("window", 0),
        ("aggregation", "mean"),
        ("nash_temperature", 0.5),
        ("nash_iters", 0),
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
