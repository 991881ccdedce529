"""The log-linear attention mixer: the mixer signature, the recurrent step and multi-token continuation
against the full forward, carried state (TBPTT), the O(log L) state (its size at 1k and 16k tokens and
its formula), the state protocol (state_dict, reorder), the ungated mode, config checks."""

from __future__ import annotations

import pytest
import torch
from mixer_checks import assert_carried_state_then_detach, assert_causal_by_perturbation, run_in_segments

from hierseq.mixers.linear_attention import LinearAttention, LinearAttentionMixerConfig
from hierseq.mixers.loglinear import LogLinearAttention, LogLinearMixerConfig, LogLinearState
from hierseq.modules.state import LayerState

D = 16


def make_mixer(seed: int = 0, d_model: int = D, **fields) -> LogLinearAttention:
    torch.manual_seed(seed)
    cfg = LogLinearMixerConfig(**{"n_heads": 2, "chunk_size": 8, "n_levels": 5, **fields})
    cfg.check(d_model)
    return LogLinearAttention(d_model, cfg).eval()


def random_input(batch: int = 2, length: int = 30, seed: int = 1, d_model: int = D) -> torch.Tensor:
    return torch.randn(batch, length, d_model, generator=torch.Generator().manual_seed(seed))


def test_signature_and_state() -> None:
    mixer = make_mixer()
    x = random_input(length=45)
    with torch.no_grad():
        y, state, aux = mixer(x)
        assert y.shape == x.shape and state is None and aux is None
        y_cached, state, aux = mixer(x, use_cache=True, need_aux=True)
    torch.testing.assert_close(y_cached, y, rtol=0, atol=0)
    assert isinstance(state, LogLinearState) and aux is None and state.length == 45
    # 45 = 0b101101: slots [B, H, 6 bits, dk, dv], zeros at bits 1 and 4; conv window [B, 2 H dk + D, K - 1]
    assert state.slots.shape == (2, 2, 6, 8, 8) and state.conv.shape == (2, 2 * 16 + 16, 3)
    occupied = state.slots.abs().sum(dim=(0, 1, 3, 4)) > 0
    assert occupied.tolist() == [True, False, True, True, False, True]


@pytest.mark.parametrize(
    "fields", [{}, {"gated": False}, {"key_dim": 5}, {"conv_kernel": 1}], ids=["gated", "plain", "key_dim", "no-conv"]
)
def test_steps_equal_the_full_forward_and_the_state_counts_its_floats(fields: dict) -> None:
    mixer = make_mixer(**fields)
    x = random_input(length=40)

    def check(given: LogLinearState | None, returned: LogLinearState, seen: int) -> None:
        assert given is None or returned is given  # a given state is advanced in place
        assert returned.num_floats() == 2 * mixer.state_size(seen)  # per batch row, from the first token

    with torch.no_grad():
        full, full_state, _ = mixer(x, use_cache=True)
        steps, state = run_in_segments(mixer, x, [1] * 40, on_step=check)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state.slots, full_state.slots, rtol=1e-4, atol=1e-5)
    assert full_state.num_floats() == 2 * mixer.state_size(40)


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_prefill_steps_and_chunks_equal_one_pass(gated: bool) -> None:
    mixer = make_mixer(gated=gated)
    x = random_input(length=90)
    with torch.no_grad():
        full = mixer(x)[0]
        for sizes in ((5, 1, 1, 13, 1, 2, 17, 50), (19, 1, 3, 17, 1, 3, 17, 29), (1, 70, 19), (64, 26)):
            segmented, state = run_in_segments(mixer, x, sizes)
            torch.testing.assert_close(segmented, full, rtol=1e-4, atol=1e-5)
            assert state.length == 90 and state.num_floats() == 2 * mixer.state_size(90)


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
        assert isinstance(restored, LogLinearState) and restored.length == 21
        expected = mixer(x[:, 21:], state.clone())[0]
        assert torch.equal(mixer(x[:, 21:], restored)[0], expected)
        index = torch.tensor([2, 0])
        reordered = state.clone()
        reordered.reorder(index)
        torch.testing.assert_close(mixer(x[index, 21:], reordered)[0], expected[index], rtol=0, atol=1e-6)


def test_state_size_grows_logarithmically() -> None:
    """The decoding state after 1k and after 16k tokens, measured on real states: one [dk, dv] slot per
    head and per bit of the length, so 16x the context costs 14/10 of the slots (linear attention: 1x;
    a KV cache: 16x)."""
    mixer = make_mixer(d_model=32, chunk_size=64, n_levels=15)
    x = random_input(batch=1, length=16000, seed=2, d_model=32)
    conv = mixer.conv.channels * mixer.conv.state_len
    slot = mixer.heads * mixer.key_dim * mixer.head_dim
    with torch.no_grad():
        sizes = {n: mixer(x[:, :n], use_cache=True)[1].num_floats() for n in (1000, 16000)}
    assert sizes == {n: mixer.state_size(n) for n in (1000, 16000)}
    assert sizes[1000] == 10 * slot + conv and sizes[16000] == 14 * slot + conv  # bit lengths 10 and 14
    assert sizes[16000] < 1.5 * sizes[1000]
    linear = LinearAttention(32, LinearAttentionMixerConfig(n_heads=2))
    assert linear.state_size(16000) == linear.state_size(1000)
    assert mixer.tbptt_refusal() is None


def test_state_size_formula() -> None:
    mixer = make_mixer(d_model=64, n_heads=1, key_dim=32, conv_kernel=4)
    # bit_length(L) slots of 1 head x 32 keys x 64 values, plus the conv window (32 + 32 + 64 channels x 3)
    for length, bits in ((1, 1), (2, 2), (1023, 10), (1024, 11), (16384, 15)):
        assert mixer.state_size(length) == bits * 32 * 64 + 128 * 3


def test_ungated_mode_has_no_gate_and_lets_the_level_weights_act_alone() -> None:
    gated, plain = make_mixer(), make_mixer(gated=False)
    assert {"A_log", "dt_bias", "gate_proj.weight"} <= {n for n, _ in gated.named_parameters()}
    assert not any(n.startswith(("A_log", "dt_bias", "gate_proj")) for n, _ in plain.named_parameters())
    # at init every level weight is softplus(bias) = 1
    with torch.no_grad():
        lam = torch.nn.functional.softplus(plain.level_proj(torch.zeros(1, D)))
    torch.testing.assert_close(lam, torch.ones_like(lam))


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_reference_kernel_equals_the_chunked_one_in_values_and_gradients(gated: bool) -> None:
    """kernel="reference" (the O(L^2) masked form, for the crossover benchmark) computes the same layer."""
    chunked, reference = make_mixer(gated=gated), make_mixer(gated=gated, kernel="reference")
    reference.load_state_dict(chunked.state_dict())
    x = random_input(length=37).requires_grad_()
    outs, grads = [], []
    for mixer in (chunked, reference):
        y, state, _ = mixer(x, use_cache=True)
        (grad,) = torch.autograd.grad((y * torch.cos(y)).sum(), x)
        outs.append((y, state.slots))
        grads.append(grad)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [("n_heads", 3, "d_model=16"), ("n_heads", 0, "n_heads=0"), ("key_dim", -1, "key_dim=-1"),
     ("n_levels", 0, "n_levels=0"), ("chunk_size", 0, "chunk_size=0"),
     ("chunk_size", 24, "chunk_size=24: must be a power of two"), ("conv_kernel", 0, "conv_kernel=0"),
     ("gated", "yes", "gated='yes'"), ("kernel", "naive", "kernel='naive'")],
)  # fmt: skip
def test_config_errors(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LogLinearMixerConfig(**{field: value}).check(D)
