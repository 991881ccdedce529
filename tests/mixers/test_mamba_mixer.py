"""The Mamba mixer: reference initialisation, config checks, fast vs reference scan inside the mixer,
the O(1) recurrent step against the parallel scan, carried state (TBPTT), state size."""

from __future__ import annotations

import math

import pytest
import torch
from mixer_checks import assert_carried_state_then_detach, run_in_segments

from hierseq.mixers.mamba import Mamba, MambaMixerConfig, MambaState

D = 16


def make_mixer(seed: int = 0, **fields) -> Mamba:
    torch.manual_seed(seed)
    return Mamba(D, MambaMixerConfig(**{"d_state": 4, **fields})).eval()


def random_input(batch: int = 3, length: int = 25, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, length, D, generator=torch.Generator().manual_seed(seed))


def test_reference_initialisation() -> None:
    torch.manual_seed(0)
    mixer = Mamba(32, MambaMixerConfig(d_state=8, expand=2, dt_min=1e-3, dt_max=0.1))
    assert mixer.dt_rank == math.ceil(32 / 16) and mixer.d_inner == 64
    A = -torch.exp(mixer.A_log)
    torch.testing.assert_close(A, -torch.arange(1, 9, dtype=torch.float32).repeat(64, 1))
    torch.testing.assert_close(mixer.D, torch.ones(64))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    bound = mixer.dt_rank**-0.5
    assert mixer.dt_proj.weight.abs().max() <= bound
    constant = Mamba(32, MambaMixerConfig(dt_init="constant", dt_scale=2.0))
    torch.testing.assert_close(constant.dt_proj.weight, torch.full_like(constant.dt_proj.weight, 2.0 * bound))
    # the default config, and an explicit dt_rank
    assert Mamba(32).cfg == MambaMixerConfig() and Mamba(32, MambaMixerConfig(dt_rank=5)).dt_rank == 5


def test_reset_special_parameters_restores_the_reference_init() -> None:
    # The LM shell first draws every Linear ~ N(0, init_std) with zero biases; the mixer then restores
    # the SSM's own init (dt, A, D) and torch's defaults for in_proj / x_proj.
    mixer = make_mixer(d_state=8)
    with torch.no_grad():
        for p in mixer.parameters():
            p.fill_(0.5)
    mixer.reset_special_parameters()
    torch.testing.assert_close(-torch.exp(mixer.A_log), -torch.arange(1, 9, dtype=torch.float32).repeat(32, 1))
    torch.testing.assert_close(mixer.D, torch.ones(32))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert mixer.dt_proj.weight.abs().max() <= mixer.dt_rank**-0.5
    for layer in (mixer.in_proj, mixer.x_proj):  # torch's default: uniform within 1 / sqrt(fan_in)
        assert layer.weight.abs().max() <= layer.in_features**-0.5 and layer.weight.std() > 0
    assert (mixer.out_proj.weight == 0.5).all()  # the residual projection is the shell's to scale


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("d_state", 0, "d_state=0"),
        ("expand", 1.5, "expand=1.5"),
        ("dt_rank", -1, "dt_rank=-1"),
        ("dt_init", "zeros", "dt_init='zeros'"),
        ("scan", "cuda", "scan='cuda'"),
        ("dt_min", 0.5, "dt_min=0.5"),
        ("d_conv", 0, "d_conv=0"),
        ("dt_scale", -1.0, "dt_scale=-1.0"),
        ("bias", "no", "bias='no'"),
    ],
)
def test_config_errors_name_field_and_value(field: str, value, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MambaMixerConfig(**{field: value}).check(D)
    with pytest.raises(ValueError, match=match):
        Mamba(D, MambaMixerConfig(**{field: value}))


def test_signature_and_state() -> None:
    mixer = make_mixer()
    x = random_input()
    with torch.no_grad():
        y, state, aux = mixer(x)
        assert y.shape == x.shape and state is None and aux is None
        y_cached, state, aux = mixer(x, use_cache=True, need_aux=True)
    torch.testing.assert_close(y_cached, y, rtol=0, atol=0)
    assert isinstance(state, MambaState) and aux is None
    assert state.conv.shape == (3, 32, 3) and state.ssm.shape == (3, 32, 4)
    with pytest.raises(ValueError, match="x: shape"):
        mixer(torch.zeros(3, 5, D + 1))


def test_reference_scan_gives_the_same_output_and_state() -> None:
    fast = make_mixer(scan="fast")
    ref = make_mixer(scan="reference")
    ref.load_state_dict(fast.state_dict())
    x = random_input(length=37)
    with torch.no_grad():
        y_fast, s_fast, _ = fast(x, use_cache=True)
        y_ref, s_ref, _ = ref(x, use_cache=True)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_fast.ssm, s_ref.ssm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_fast.conv, s_ref.conv, rtol=0, atol=0)


@pytest.mark.parametrize("scan", ["fast", "reference"])
def test_token_by_token_steps_equal_the_parallel_forward(scan: str) -> None:
    mixer = make_mixer(scan=scan)
    x = random_input(length=25)
    with torch.no_grad():
        full, full_state, _ = mixer(x, use_cache=True)
        steps, state = run_in_segments(mixer, x, [1] * x.shape[1])
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.ssm, full_state.ssm, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.conv, full_state.conv, rtol=1e-5, atol=1e-6)


def test_step_from_the_initial_state() -> None:
    mixer = make_mixer()
    x = random_input(length=6)
    with torch.no_grad():
        full = mixer(x)[0]
        zero = mixer.initial_state(3)
        assert zero.num_floats() == 3 * mixer.state_size(0) and not zero.ssm.any() and not zero.conv.any()
        y0, state = mixer.step(x[:, 0], None)
        y0_zero, _ = mixer.step(x[:, 0], zero)
        steps = [y0]
        for t in range(1, 6):
            y_t, state = mixer.step(x[:, t], state)
            steps.append(y_t)
    torch.testing.assert_close(y0_zero, y0, rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_prefill_steps_and_chunks_equal_one_pass() -> None:
    mixer = make_mixer()
    x = random_input(length=40)
    with torch.no_grad():
        full = mixer(x)[0]
        segmented, _ = run_in_segments(mixer, x, (5, 1, 1, 13, 1, 2, 17))
    torch.testing.assert_close(segmented, full, rtol=1e-4, atol=1e-4)


def test_state_size_is_constant_in_sequence_length() -> None:
    mixer = make_mixer()
    sizes = []
    for length in (8, 200):
        with torch.no_grad():
            state = mixer(random_input(batch=1, length=length), use_cache=True)[1]
        sizes.append(state.num_floats())
        assert mixer.state_size(length) == state.num_floats()
    assert sizes[0] == sizes[1] == 32 * 3 + 32 * 4  # d_inner * (d_conv - 1) + d_inner * d_state
    assert mixer.tbptt_refusal() is None


def test_carried_state_with_gradients_then_detach() -> None:
    assert_carried_state_then_detach(make_mixer(), random_input(length=12), split=6)
