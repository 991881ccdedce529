"""The Gated DeltaNet mixer: the mixer signature, its recurrent step and segmented calls against one
chunked pass, the chunked kernel against the reference loop (values and gradients), carried state
(TBPTT), constant state size and its formula, the gated output doing something, config checks."""

from __future__ import annotations

import pytest
import torch
from mixer_checks import assert_carried_state_then_detach, assert_causal_by_perturbation, run_in_segments

from hierseq.mixers.gated_deltanet import GatedDeltaNet, GatedDeltaNetMixerConfig
from hierseq.modules.state import RecurrentState

D = 16


def make_mixer(seed: int = 0, d_model: int = D, **fields) -> GatedDeltaNet:
    torch.manual_seed(seed)
    cfg = GatedDeltaNetMixerConfig(**{"n_heads": 2, "chunk_size": 8, **fields})
    cfg.check(d_model)
    return GatedDeltaNet(d_model, cfg).eval()


def random_input(batch: int = 2, length: int = 30, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, length, D, generator=torch.Generator().manual_seed(seed))


def test_signature_and_state() -> None:
    mixer = make_mixer()
    x = random_input()
    with torch.no_grad():
        y, state, aux = mixer(x)
        assert y.shape == x.shape and state is None and aux is None
        y_cached, state, aux = mixer(x, use_cache=True, need_aux=True)
    torch.testing.assert_close(y_cached, y, rtol=0, atol=0)
    assert isinstance(state, RecurrentState) and aux is None
    # memory [B, H, dk, dv]; conv window [B, 2 H dk + D, K - 1]
    assert state.memory.shape == (2, 2, 8, 8) and state.conv.shape == (2, 2 * 16 + 16, 3)


@pytest.mark.parametrize("fields", [{}, {"key_dim": 5}, {"conv_kernel": 1}], ids=["default", "key_dim", "no-conv"])
def test_step_equals_full_forward_and_state_is_constant(fields: dict) -> None:
    mixer = make_mixer(**fields)
    x = random_input(length=40)

    def check(given: object, returned: RecurrentState, seen: int) -> None:
        assert returned.num_floats() == 2 * mixer.state_size(seen)  # per batch row, from the first token

    with torch.no_grad():
        full, full_state, _ = mixer(x, use_cache=True)
        steps, state = run_in_segments(mixer, x, [1] * 40, on_step=check)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state.memory, full_state.memory, rtol=1e-4, atol=1e-5)


def test_prefill_steps_and_chunks_equal_one_pass() -> None:
    mixer = make_mixer()
    x = random_input(length=40)
    with torch.no_grad():
        full = mixer(x)[0]
        segmented, _ = run_in_segments(mixer, x, (5, 1, 1, 13, 1, 2, 17))
    torch.testing.assert_close(segmented, full, rtol=1e-4, atol=1e-5)


def test_chunked_kernel_equals_the_reference_loop_in_values_and_gradients() -> None:
    fast, slow = make_mixer().train(), make_mixer(kernel="reference").train()
    slow.load_state_dict(fast.state_dict())
    x = random_input(length=27).requires_grad_()
    y_fast, y_slow = fast(x)[0], slow(x)[0]
    torch.testing.assert_close(y_fast, y_slow, rtol=1e-5, atol=1e-5)
    grads_fast = torch.autograd.grad(y_fast.square().sum(), [x, *fast.parameters()])
    grads_slow = torch.autograd.grad(y_slow.square().sum(), [x, *slow.parameters()])
    for a, b in zip(grads_fast, grads_slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_causal_by_perturbation() -> None:
    assert_causal_by_perturbation(make_mixer(), random_input(length=24), t=13)


def test_carried_state_with_gradients_then_detach() -> None:
    assert_carried_state_then_detach(make_mixer(), random_input(length=30), split=17)


def test_output_gate_and_write_strength_change_the_output() -> None:
    mixer = make_mixer()
    x = random_input()
    with torch.no_grad():
        y = mixer(x)[0]
        gate_rows = slice(mixer.in_proj.out_features - D, None)  # the output gate's logits
        mixer.in_proj.weight[gate_rows] *= 3.0
        assert (mixer(x)[0] - y).abs().max() > 1e-3
        mixer.in_proj.weight[gate_rows] /= 3.0
        beta_rows = slice(mixer.conv.channels, mixer.conv.channels + mixer.heads)
        mixer.in_proj.weight[beta_rows] += 2.0
        assert (mixer(x)[0] - y).abs().max() > 1e-3


def test_state_size_formula() -> None:
    mixer = make_mixer(d_model=64, n_heads=1, key_dim=64, conv_kernel=4)
    # 1 head x 64 keys x 64 values + conv window (64 + 64 + 64 channels x 3 taps)
    assert mixer.state_size(1) == mixer.state_size(1000) == 64 * 64 + 192 * 3
    assert mixer.tbptt_refusal() is None


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [("n_heads", 3, "d_model=16"), ("n_heads", 0, "n_heads=0"), ("key_dim", -1, "key_dim=-1"),
     ("conv_kernel", 0, "conv_kernel=0"), ("chunk_size", 0, "chunk_size=0"), ("kernel", "fast", "kernel='fast'")],
)  # fmt: skip
def test_config_errors(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GatedDeltaNetMixerConfig(**{field: value}).check(D)


def test_decay_rate_init_range() -> None:
    """A is drawn from [a_min, a_max] ([1, 16] by default, as in Mamba-2), survives the shell's generic
    init, and a bad range is refused."""
    import hierseq

    mixer = make_mixer(n_heads=8, d_model=32)
    rates = mixer.A_log.exp()
    assert ((rates >= 1.0) & (rates <= 16.0)).all() and rates.std() > 0
    assert torch.allclose(make_mixer(a_min=4.0, a_max=4.0).A_log.exp(), torch.full((2,), 4.0))
    model = hierseq.build_model("gated_deltanet", d_model=32, n_layers=2, n_heads=4, vocab_size=64)
    for block in model.blocks:  # the LM shell re-applies the mixer's own init after its generic one
        assert ((block.mixer.A_log.exp() >= 1.0) & (block.mixer.A_log.exp() <= 16.0)).all()
    with pytest.raises(ValueError, match="a_min"):
        GatedDeltaNetMixerConfig(a_min=20.0).check(D)
    with pytest.raises(ValueError, match="a_max"):
        GatedDeltaNetMixerConfig(a_max=0.0).check(D)
