"""The HAMT mixer (holographic slot memory): the mixer signature, its recurrent step against the chunked
parallel path, carried state (TBPTT), O(1) state size, the retention loss, its special init, config checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from mixer_checks import assert_carried_state_then_detach, assert_causal_by_perturbation, run_in_segments

from hierseq.mixers.hamt import HAMTMixerConfig, HolographicMemoryMixer
from hierseq.modules.state import RecurrentState
from hierseq.ops.delta_rule import gated_delta_rule_step
from hierseq.ops.vsa import bind, identity_key, unbind

D = 16
CONFIGS = [
    {},
    {"binding": "circular"},
    {"binding": "circular", "key_type": "unitary"},
    {"key_type": "l2", "use_gating": False},
    {"write": "delta"},
    {"write": "delta", "binding": "circular", "key_type": "unitary"},
    {"write": "delta", "use_gating": False},
    {"write": "delta", "binding_init": 0.3, "num_slots": 4},
]
IDS = [
    "elementwise-bipolar",
    "circular-bipolar",
    "circular-unitary",
    "elementwise-l2-nogate",
    "delta-elementwise-bipolar",
    "delta-circular-unitary",
    "delta-nogate",
    "delta-half-bound",
]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops: one thread is faster than two on a shared, loaded CPU. Restored after every test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_mixer(seed: int = 0, **fields) -> HolographicMemoryMixer:
    """A small mixer with the special init the LM shell applies (decay rates, write gate, conv). Without
    fields: the additive write with holographic keys from the start (the tests of that write)."""
    torch.manual_seed(seed)
    base = {"hcm_dim": 32, "num_slots": 2, "chunk_size": 8, "write": "additive", "binding_init": 1.0}
    cfg = HAMTMixerConfig(**{**base, **fields})
    cfg.check(D)
    mixer = HolographicMemoryMixer(D, cfg)
    mixer.reset_special_parameters()
    return mixer.eval()


def random_input(batch: int = 2, length: int = 30, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, length, D, generator=torch.Generator().manual_seed(seed))


def test_signature_state_and_aux() -> None:
    mixer = make_mixer()
    x = random_input()
    with torch.no_grad():
        y, state, aux = mixer(x)
        assert y.shape == x.shape and state is None and aux is None
        y_cached, state, aux = mixer(x, use_cache=True)
        torch.testing.assert_close(y_cached, y, rtol=0, atol=0)
        assert isinstance(state, RecurrentState) and aux is None
        assert state.memory.shape == (2, 2, 32) and state.conv.shape == (2, 3 * 32, 3)
        _, no_state, aux = mixer(x, need_aux=True)
        assert no_state is None and aux.shape == () and torch.isfinite(aux)
        # a given state is continued (and a state returned) without use_cache
        _, continued, _ = mixer(x[:, :3], state)
        assert isinstance(continued, RecurrentState)


def test_hcm_dim_zero_means_the_width() -> None:
    mixer = make_mixer(hcm_dim=0)
    assert mixer.memory_dim == D and mixer.out_proj.in_features == D


@pytest.mark.parametrize("fields", CONFIGS, ids=IDS)
def test_recurrent_step_equals_parallel_path_token_by_token(fields: dict) -> None:
    mixer = make_mixer(**fields)
    x = random_input(length=30)
    with torch.no_grad():
        full, full_state, _ = mixer(x, use_cache=True)
        steps, state = run_in_segments(mixer, x, [1] * x.shape[1])
    # 30 fp32 recurrent steps against one parallel pass; circular (FFT) binding rounds differently per
    # shape, which on AMD EPYC reached 1.5e-5 on one element of 960 (outputs ~0.03).
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=3e-5)
    torch.testing.assert_close(state.memory, full_state.memory, rtol=1e-4, atol=3e-5)
    torch.testing.assert_close(state.conv, full_state.conv, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fields", CONFIGS, ids=IDS)
def test_prefill_steps_and_chunks_equal_one_pass(fields: dict) -> None:
    # segments that start and end inside chunks (chunk 8) and one longer than the conv window
    mixer = make_mixer(**fields)
    x = random_input(length=40)
    with torch.no_grad():
        full = mixer(x)[0]
        segmented, _ = run_in_segments(mixer, x, (5, 1, 1, 13, 1, 2, 17))
    torch.testing.assert_close(segmented, full, rtol=1e-4, atol=1e-5)


def test_causal_by_perturbation() -> None:
    assert_causal_by_perturbation(make_mixer(), random_input(length=24), t=13)


def test_carried_state_with_gradients_then_detach() -> None:
    assert_carried_state_then_detach(make_mixer(), random_input(length=40), split=23)


def test_state_does_not_grow_with_context() -> None:
    mixer = make_mixer()
    with torch.no_grad():
        short = mixer(random_input(batch=1, length=10), use_cache=True)[1]
        long = mixer(random_input(batch=1, length=300), use_cache=True)[1]
        stepped = mixer(random_input(batch=1, length=1), long)[1]
    # memory S * M plus the conv window 3M * (K - 1), whatever the length
    expected = 2 * 32 + 3 * 32 * 3
    assert short.num_floats() == long.num_floats() == stepped.num_floats() == expected
    assert mixer.state_size(10) == mixer.state_size(300) == expected
    assert mixer.tbptt_refusal() is None


def test_eval_is_deterministic() -> None:
    # Seed defect 2: keys were redrawn on every call, so two eval passes differed.
    mixer = make_mixer()
    x = random_input()
    with torch.no_grad():
        assert torch.equal(mixer(x)[0], mixer(x)[0])
        assert torch.equal(mixer(x, need_aux=True)[2], mixer(x, need_aux=True)[2])


def test_retention_loss_penalises_forgetting() -> None:
    mixer = make_mixer()
    x = random_input(length=48)
    with torch.no_grad():
        aux = mixer(x, need_aux=True)[2]
        assert 0.0 < aux.item() < 2.0
        mixer.decay_bias.fill_(30.0)  # forget everything at every step: the chunk-end state keeps 1 token
        forgetful = mixer(x, need_aux=True)[2]
    assert forgetful.item() > aux.item() + 0.1


def test_retention_loss_on_the_step_path_matches_the_parallel_path() -> None:
    # With chunk_size 1 every token's chunk ends at the token itself, so the parallel path's loss is
    # the mean over tokens of the loss the recurrent step reports for that token.
    mixer = make_mixer(chunk_size=1)
    x = random_input(length=12)
    with torch.no_grad():
        parallel = mixer(x, need_aux=True)[2]
        state, per_token = None, []
        for t in range(x.shape[1]):
            _, state, aux = mixer(x[:, t : t + 1], state, use_cache=True, need_aux=True)
            per_token.append(aux)
    assert 0.0 < parallel.item() < 2.0
    torch.testing.assert_close(torch.stack(per_token).mean(), parallel, rtol=1e-4, atol=1e-5)


def test_special_init() -> None:
    mixer = make_mixer(num_slots=3, decay_rate=0.9)
    forget = torch.nn.functional.softplus(mixer.decay_bias.detach())
    torch.testing.assert_close(forget, -math.log(0.9) * torch.tensor([1.0, 0.5, 0.25]))
    assert mixer.gate_proj.bias[-1].item() == 2.0
    assert torch.equal(mixer.conv.bias.detach(), torch.zeros_like(mixer.conv.bias))
    # without gating, slot s keeps decay_rate ** (2 ** -s) per token, whatever the input
    ungated = make_mixer(num_slots=3, decay_rate=0.9, use_gating=False)
    _, _, _, write, log_decay, _ = ungated._features(torch.randn(1, 4, 3 * 32), torch.randn(1, 4, D))
    torch.testing.assert_close(log_decay.exp(), (0.9 ** torch.tensor([1.0, 0.5, 0.25])).expand(1, 4, 3))
    torch.testing.assert_close(write.sum(-1), torch.ones(1, 4))  # always write, routed over the slots


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("decay_rate", 1.0),
        ("decay_rate", 0.0),
        ("decay_rate", "0.5"),
        ("binding", "fft"),
        ("key_type", "gauss"),
        ("chunk_size", 0),
        ("hcm_dim", -4),
        ("num_slots", 0),
        ("conv_kernel", 0),
        ("use_gating", "yes"),
    ],
)
def test_config_errors_name_field_and_value(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        HAMTMixerConfig(**{field: value}).check(D)


# ------------------------------------------------------------------------------------- delta write
def delta_write_reference(mixer: HolographicMemoryMixer, x: torch.Tensor) -> torch.Tensor:
    """The delta write from its definition, a loop over tokens: with unit routes r (write) and c (read),
    M_t = a_t (M_{t-1} - beta_t r_t r_t^T M_{t-1}) + beta_t r_t bind(k_t, v_t)^T and
    y_t = out(unbind(c_t^T M_t, q_t)). x: [B, L, D] -> y [B, L, D]."""
    qkv = mixer.conv(mixer.in_proj(x))
    query, key, value, route, read, beta, log_decay = mixer._features(qkv, x)
    route, read = F.normalize(route, dim=-1), F.normalize(read, dim=-1)
    memory = x.new_zeros(x.shape[0], mixer.num_slots, mixer.memory_dim)
    outputs = []
    for t in range(x.shape[1]):
        r, b = route[:, t, :, None], beta[:, t, :, None]
        memory = log_decay[:, t, :, None].exp() * (memory - b * r * (r.transpose(1, 2) @ memory))
        memory = memory + b * r * bind(key[:, t], value[:, t], mixer.cfg.binding)[:, None]
        outputs.append(torch.einsum("bs,bsm->bm", read[:, t], memory))
    return mixer._output(torch.stack(outputs, dim=1), query, x)


@pytest.mark.parametrize("fields", [{}, {"binding": "circular", "key_type": "unitary"}], ids=["map", "hrr"])
def test_delta_write_equals_its_definition(fields: dict) -> None:
    mixer = make_mixer(write="delta", **fields)
    x = random_input(length=29)
    with torch.no_grad():
        torch.testing.assert_close(mixer(x)[0], delta_write_reference(mixer, x), rtol=1e-4, atol=1e-5)


def test_delta_write_replaces_the_value_stored_under_a_route_and_additive_write_superposes() -> None:
    # Write (k, v1) then (k, v2) under one route with full strength and no decay, read with k: the
    # delta write returns v2, the additive write v1 + v2.
    torch.manual_seed(5)
    key = torch.randn(1, 1, 32).sign()
    v1, v2 = torch.randn(1, 1, 32), torch.randn(1, 1, 32)
    route = F.normalize(torch.randn(1, 1, 2), dim=-1)
    one, zero = torch.ones(1, 1), torch.zeros(1, 1)
    memory = None
    for value in (v1, v2):
        read, memory = gated_delta_rule_step(route, route, bind(key, value), one, zero, memory)
    torch.testing.assert_close(unbind(read, key)[0], v2[0], rtol=1e-5, atol=1e-5)
    additive = bind(key, v1) + bind(key, v2)
    torch.testing.assert_close(unbind(additive, key), v1 + v2, rtol=1e-5, atol=1e-5)


def test_defaults_are_the_delta_write_with_binding_learned_from_zero() -> None:
    cfg = HAMTMixerConfig()
    assert (cfg.write, cfg.binding_init, cfg.num_slots, cfg.hcm_dim) == ("delta", 0.0, 16, 0)


def test_delta_write_changes_the_output() -> None:
    # The same routers, keys and values with the additive write give another function.
    delta = make_mixer(write="delta")
    additive = make_mixer(write="additive")
    shared = {k: v for k, v in delta.state_dict().items() if not k.startswith(("gate_proj", "decay_bias"))}
    additive.load_state_dict(shared, strict=False)
    x = random_input(length=30)
    with torch.no_grad():
        assert (delta(x)[0] - additive(x)[0]).abs().max() > 1e-2


def test_delta_retention_loss_penalises_forgetting() -> None:
    # 16 slots hold 8 writes with little interference; forgetting loses all but the last.
    mixer = make_mixer(write="delta", num_slots=16)
    x = random_input(length=8)
    with torch.no_grad():
        aux = mixer(x, need_aux=True)[2]
        assert 0.0 < aux.item() < 2.0
        mixer.decay_bias.fill_(30.0)  # the final memory keeps only the last token
        forgetful = mixer(x, need_aux=True)[2]
    assert forgetful.item() > aux.item() + 0.1


@pytest.mark.parametrize("binding", ["elementwise", "circular"])
def test_binding_init_zero_starts_unbound_and_learns_to_bind(binding: str) -> None:
    # Strength 0: queries and keys are the identity key, so the memory stores values as they are; the
    # strength still gets a gradient, so training can turn binding on.
    mixer = make_mixer(binding_init=0.0, binding=binding).train()
    x = random_input(length=20)
    qkv = mixer.conv(mixer.in_proj(x))
    query, key = mixer._features(qkv, x)[:2]
    identity = identity_key(mixer.memory_dim, binding).expand_as(query)
    torch.testing.assert_close(query, identity)
    torch.testing.assert_close(key, identity)
    mixer(x)[0].square().sum().backward()
    assert mixer.bind_strength.grad is not None and mixer.bind_strength.grad.abs() > 0
    with pytest.raises(ValueError, match="binding_init"):
        HAMTMixerConfig(binding_init=1.5).check(D)
