"""The Mamba-2 mixer: the mixer signature, the reference initialisation (and its restoration after the
shell's generic init), the O(1) step and multi-token continuation against one pass, causality, carried
state (TBPTT), the state size and its formula, the state protocol, the gated norm, the reference
kernel against the chunked one, config checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mixer_checks import assert_carried_state_then_detach, assert_causal_by_perturbation, run_in_segments

from hierseq.mixers.mamba2 import Mamba2, Mamba2MixerConfig, Mamba2State, _GatedNormOutFn
from hierseq.modules.state import LayerState

D = 16


def make_mixer(seed: int = 0, d_model: int = D, **fields) -> Mamba2:
    torch.manual_seed(seed)
    cfg = Mamba2MixerConfig(**{"d_state": 4, "headdim": 8, "chunk_size": 8, **fields})
    cfg.check(d_model)
    return Mamba2(d_model, cfg).eval()


def random_input(batch: int = 2, length: int = 30, seed: int = 1, d_model: int = D) -> torch.Tensor:
    return torch.randn(batch, length, d_model, generator=torch.Generator().manual_seed(seed))


def test_signature_and_state() -> None:
    mixer = make_mixer(ngroups=2)
    x = random_input(length=21)
    with torch.no_grad():
        y, state, aux = mixer(x)
        assert y.shape == x.shape and state is None and aux is None
        y_cached, state, aux = mixer(x, use_cache=True, need_aux=True)
    torch.testing.assert_close(y_cached, y, rtol=0, atol=0)
    assert isinstance(state, Mamba2State) and aux is None
    # d_inner 32 = 4 heads x 8; conv over x, B, C: 32 + 2 groups x 2 x 4 = 48 channels, K - 1 = 3 taps
    assert state.conv.shape == (2, 48, 3) and state.ssm.shape == (2, 4, 8, 4)
    assert mixer.in_proj.out_features == 32 + 48 + 4
    with pytest.raises(ValueError, match="x: shape"):
        mixer(torch.zeros(2, 5, D + 1))


def check_reference_init(mixer: Mamba2) -> None:
    cfg = mixer.cfg
    A = -torch.exp(mixer.A_log)
    assert A.shape == (mixer.n_heads,) and (A <= -cfg.a_min).all() and (A >= -cfg.a_max).all()
    dt = F.softplus(mixer.dt_bias)
    assert dt.min() >= cfg.dt_min * (1 - 1e-5) and dt.max() <= cfg.dt_max * (1 + 1e-5)
    torch.testing.assert_close(mixer.D, torch.ones(mixer.n_heads))
    torch.testing.assert_close(mixer.norm_weight, torch.ones(mixer.d_inner))
    bound = mixer.in_proj.in_features**-0.5  # torch's default: uniform within 1 / sqrt(fan_in)
    assert mixer.in_proj.weight.abs().max() <= bound and mixer.in_proj.weight.std() > bound / 4


def test_reference_initialisation() -> None:
    torch.manual_seed(0)
    mixer = Mamba2(64, Mamba2MixerConfig(d_state=8, headdim=16))
    assert (mixer.d_inner, mixer.n_heads, mixer.headdim) == (128, 8, 16)
    check_reference_init(mixer)
    assert len(set(mixer.A_log.tolist())) == 8  # drawn per head, a spread of time scales
    assert Mamba2(128).cfg == Mamba2MixerConfig()  # the default config: 4 heads of 64, N = 64


def test_reset_special_parameters_restores_the_reference_init() -> None:
    # The LM shell first draws every Linear ~ N(0, init_std) with zero biases; the mixer then restores the
    # SSM's own init and torch's default for in_proj.
    mixer = make_mixer()
    with torch.no_grad():
        for p in mixer.parameters():
            p.fill_(0.5)
    mixer.reset_special_parameters()
    check_reference_init(mixer)
    assert (mixer.out_proj.weight == 0.5).all()  # the residual projection is the shell's to scale
    assert (mixer.conv.weight == 0.5).all()  # the conv keeps what the shell gave it (its own init)


@pytest.mark.parametrize(
    "fields", [{}, {"ngroups": 2}, {"kernel": "reference"}, {"d_conv": 1}], ids=["default", "groups", "ref", "no-conv"]
)
def test_steps_equal_the_full_forward_and_the_state_is_constant(fields: dict) -> None:
    mixer = make_mixer(**fields)
    x = random_input(length=27)

    def check(given: Mamba2State | None, returned: Mamba2State, seen: int) -> None:
        assert returned.num_floats() == 2 * mixer.state_size(seen)  # per batch row, from the first token

    with torch.no_grad():
        full, full_state, _ = mixer(x, use_cache=True)
        steps, state = run_in_segments(mixer, x, [1] * 27, on_step=check)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state.ssm, full_state.ssm, rtol=1e-4, atol=1e-5)
    # The conv window holds input projections, computed by a [B, 1, D] matmul per step and a [B, L, D] one
    # in the full pass; the CPU's GEMM may round those shapes differently (seen on AMD EPYC), so not atol=0.
    torch.testing.assert_close(state.conv, full_state.conv, rtol=1e-5, atol=1e-6)
    assert full_state.num_floats() == 2 * mixer.state_size(27)


def test_step_from_no_state_is_a_step_from_the_initial_state() -> None:
    mixer = make_mixer()
    x = random_input(length=1)[:, 0]
    with torch.no_grad():
        zero = mixer.initial_state(2)
        assert zero.num_floats() == 2 * mixer.state_size(0) and not zero.ssm.any() and not zero.conv.any()
        y_none, s_none = mixer.step(x, None)
        y_zero, s_zero = mixer.step(x, zero)
    assert torch.equal(y_none, y_zero) and torch.equal(s_none.ssm, s_zero.ssm)


@pytest.mark.parametrize("ngroups", [1, 2])
def test_prefill_steps_and_chunks_equal_one_pass(ngroups: int) -> None:
    mixer = make_mixer(ngroups=ngroups)
    x = random_input(length=90)
    with torch.no_grad():
        full = mixer(x)[0]
        for sizes in ((5, 1, 1, 13, 1, 2, 17, 50), (19, 1, 3, 17, 1, 3, 17, 29), (1, 70, 19), (64, 26), (2, 88)):
            segmented, state = run_in_segments(mixer, x, sizes)
            torch.testing.assert_close(segmented, full, rtol=1e-4, atol=1e-5)
            assert state.num_floats() == 2 * mixer.state_size(90)


def test_causal_by_perturbation() -> None:
    assert_causal_by_perturbation(make_mixer(), random_input(length=40), t=21)


def test_carried_state_with_gradients_then_detach() -> None:
    assert_carried_state_then_detach(make_mixer(), random_input(length=45), split=19)


def test_state_round_trips_and_reorders() -> None:
    mixer = make_mixer()
    x = random_input(batch=3, length=37)
    with torch.no_grad():
        _, state, _ = mixer(x[:, :21], use_cache=True)
        restored = LayerState.from_state_dict(state.state_dict())
        assert isinstance(restored, Mamba2State)
        expected = mixer(x[:, 21:], state.clone())[0]
        assert torch.equal(mixer(x[:, 21:], restored)[0], expected)
        index = torch.tensor([2, 0])
        reordered = state.clone()
        reordered.reorder(index)
        torch.testing.assert_close(mixer(x[index, 21:], reordered)[0], expected[index], rtol=0, atol=1e-6)


def test_state_size_formula() -> None:
    mixer = make_mixer(d_model=64, d_state=16, headdim=32, ngroups=2, d_conv=4)
    # 4 heads x 32 x 16 SSM state + conv window ((128 + 2 groups x 2 x 16) channels x 3 taps)
    assert mixer.state_size(1) == mixer.state_size(16384) == 4 * 32 * 16 + (128 + 64) * 3
    assert mixer.tbptt_refusal() is None


@pytest.mark.parametrize("ngroups", [1, 2])
def test_reference_kernel_equals_the_chunked_one_in_values_and_gradients(ngroups: int) -> None:
    chunked, reference = make_mixer(ngroups=ngroups), make_mixer(ngroups=ngroups, kernel="reference")
    reference.load_state_dict(chunked.state_dict())
    x = random_input(length=37).requires_grad_()
    results = []
    for mixer in (chunked, reference):
        y, state, _ = mixer(x, use_cache=True)
        loss = (y * torch.cos(y)).sum() + state.ssm.square().sum()
        grads = torch.autograd.grad(loss, [x, *mixer.parameters()])
        results.append((y, state.ssm, *grads))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gated_norm_and_out_proj_normalise_each_group_and_have_exact_gradients() -> None:
    gen = torch.Generator().manual_seed(0)
    y, z = (torch.randn(2, 5, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weight = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    out_weight = torch.randn(7, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    gated = y * F.silu(z)
    normed = gated * torch.rsqrt(gated.square().mean(-1, keepdim=True) + 1e-5) * weight
    torch.testing.assert_close(_GatedNormOutFn.apply(y, z, weight, out_weight), normed.flatten(-2) @ out_weight.T)
    assert torch.autograd.gradcheck(_GatedNormOutFn.apply, (y, z, weight, out_weight))


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [("d_state", 0, "d_state=0"), ("d_conv", 0, "d_conv=0"), ("expand", 1.5, "expand=1.5"),
     ("headdim", 5, "d_inner=32: must be divisible by headdim=5"), ("headdim", 0, "headdim=0"),
     ("ngroups", 3, "n_heads=4: must be divisible by ngroups=3"), ("ngroups", 0, "ngroups=0"),
     ("chunk_size", 0, "chunk_size=0"), ("dt_min", 0.5, "dt_min=0.5: must be <= dt_max"),
     ("dt_max", -1.0, "dt_max=-1.0"), ("dt_init_floor", 0, "dt_init_floor=0"), ("a_min", 0.0, "a_min=0.0"),
     ("a_max", 0.5, "a_min=1.0: must be <= a_max=0.5"), ("kernel", "naive", "kernel='naive'")],
)  # fmt: skip
def test_config_errors(field: str, value: object, match: str) -> None:
    cfg = Mamba2MixerConfig(**{"headdim": 8, field: value})
    with pytest.raises(ValueError, match=match):
        cfg.check(D)
    with pytest.raises(ValueError, match=match):
        Mamba2(D, cfg)
