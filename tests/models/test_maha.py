"""MAHA (the LM and the seed's API): conformance in every attention mode x aggregation, regression tests
for the seed's defects at the model level (constant aux loss; saturating Nash; unused parameters), the
LM's bounded decoding state, the parameter budget over a standard transformer block, and the seed API
(``hierseq.compat.maha``: MAHATransformer, MAHABlock, the encoder variant).

The mixer alone (causality at every scale, the coarse scales' reach, the aggregation weights, its
cache) is tested in tests/mixers/test_maha.py; the banded attention and the causal up-sampling maps in
tests/ops/test_banded_attention.py; the dilated conv in tests/modules/test_causal_conv.py."""

from __future__ import annotations

import gc
import socket
from pathlib import Path

import pytest
import torch
from tests.conformance import checks

import hierseq
from hierseq.compat.maha import MAHABlock, MAHAEncoderConfig, MAHATransformer
from hierseq.mixers.attention import Attention, AttentionMixerConfig
from hierseq.mixers.maha import MAHAState, MultiscaleAttention, extra_parameters_over_standard_block
from hierseq.models.causal_lms import MAHALM, MAHAConfig
from hierseq.modules.block import Block
from hierseq.modules.mlp import make_mlp
from hierseq.modules.norms import make_norm
from hierseq.modules.state import DecodingState

V = 32
MODES = [(a, g) for a in ("windowed", "full") for g in ("convex", "nash")]


def small_config(**overrides: object) -> MAHAConfig:
    return MAHAConfig(**{**MAHAConfig.small_overrides(), "vocab_size": V, **overrides})


def small_lm(seed: int = 0, **overrides: object) -> MAHALM:
    torch.manual_seed(seed)
    return MAHALM(small_config(**overrides)).eval()


# ------------------------------------------------------------------- conformance in every mode
@pytest.mark.parametrize(("attention", "aggregation"), MODES)
def test_conformance_checks_in_every_mode(attention: str, aggregation: str) -> None:
    # The registry suite covers the default (windowed, convex); these are the same checks for all four.
    model = small_lm(attention=attention, aggregation=aggregation)
    checks.assert_causal_by_perturbation(model, V, length=45)
    checks.assert_causal_by_gradient(model, V, length=45, positions=[0, 3, 4, 7, 8, 15, 16, 31, 44])
    checks.assert_cached_decoding_matches(model, V, segments=(5,) + (1,) * 35 + (13,) + (1,) * 27)
    checks.assert_cached_decoding_matches(model, V, segments=(1, 70, 1, 1, 1))
    checks.assert_cached_decoding_matches(model, V, segments=checks.prefill_then_steps(19, (1, 3, 17), 90))
    checks.assert_cached_decoding_matches(
        model, V, segments=checks.prefill_then_steps(7, (17, 3, 1), 60), continue_with_use_cache=False
    )
    checks.assert_detach_keeps_values_and_cuts_graph(model, V)
    checks.assert_state_round_trips(model, V)
    checks.assert_batch_independent(model, V)
    checks.assert_loss_consistent(model, V)
    checks.assert_gradients_reach_all_parameters(model, V, min_nonzero_fraction=1.0)


def test_iid_floor_full_attention_nash() -> None:
    # The registry suite runs this for the default (windowed, convex); full attention is the other mask
    # path and Nash couples the scales through the game.
    checks.assert_iid_floor(lambda: small_lm(attention="full", aggregation="nash"), vocab=V, steps=40)


# ------------------------------------------------------------------------- the LM's modes and state
def test_windowed_with_a_large_window_equals_full_attention() -> None:
    full = small_lm(attention="full")
    windowed = small_lm(attention="windowed", window=128)
    ids = checks.random_ids(2, 100, V)
    torch.testing.assert_close(checks.logits_of(windowed, ids), checks.logits_of(full, ids), atol=1e-5, rtol=0)


def test_windowed_decoding_state_does_not_grow_with_context() -> None:
    model = small_lm(attention="windowed", window=8)
    ids = checks.random_ids(1, 150, V, seed=11)
    full = checks.logits_of(model, ids)
    with torch.no_grad():
        out = model(ids[:, :1], use_cache=True)
        logits = [out.logits]
        for t in range(1, 150):
            out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True)
            logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-4, rtol=0)
    assert isinstance(out.cache, DecodingState) and out.cache.length == 150
    for layer in out.cache.layers:
        assert isinstance(layer, MAHAState) and layer.length == 150
        assert all(k.shape[2] <= 7 for k in layer.keys)  # window - 1 keys per scale, whatever the context
        assert all(p is None or p.shape[1] < 2 for p in layer.pending)
        assert layer.counts == [150, 75, 37]
    # the LM's state_floats is the sum of the layers' state_size, and it does not grow with context
    assert model.state_floats(150) == sum(m.state_size(150) for m in model.mixers)
    assert model.state_floats(150) == model.state_floats(100_000)
    assert model.tbptt_refusal() is None
    assert "attention='full'" in small_lm(attention="full").tbptt_refusal()


# --------------------------------------------------------------------------- aggregation / aux loss
@pytest.mark.parametrize("aggregation", ["convex", "nash"])
def test_aux_loss_has_a_nonzero_gradient(aggregation: str) -> None:
    model = small_lm(aggregation=aggregation).train()
    out = model(checks.random_ids(2, 40, V), labels=checks.random_ids(2, 40, V, seed=1))
    assert 0.0 < out.aux_loss.item() < model.config.n_scales - 1
    out.aux_loss.backward()
    scores = model.blocks[0].mixer.scores.weight.grad
    assert scores is not None and scores.abs().sum().item() > 0
    if aggregation == "nash":  # the game couples the weights to the attention outputs
        assert model.blocks[0].mixer.value.weight.grad.abs().sum().item() > 0
    torch.testing.assert_close(out.loss, out.lm_loss + model.config.aux_loss_weight * out.aux_loss)


def test_nash_weights_not_one_hot_at_init_for_long_sequences() -> None:
    # The seed's Frobenius error over the whole sequence grows like sqrt(N * D): one-hot after one step.
    torch.manual_seed(6)
    model = MAHATransformer(256, 4096, 64, 4, 4, "nash", num_layers=1, downsample=2, window=16)
    ids = torch.randint(0, 256, (1, 4096))
    block = model.blocks[0]
    with torch.no_grad():
        weights = block.mixer.forward_with_weights(block.mixer_norm(model.embed(ids)))[3]
    settled = weights[0, 8:]  # every scale has a finished token from position 7 on
    assert settled.max().item() < 0.6 and settled.min().item() > 0.1
    entropy = -(settled * settled.log()).sum(-1)
    assert entropy.min().item() > 0.9 * torch.log(torch.tensor(4.0)).item()


# ---------------------------------------------------------------------------------- DDP / params
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_steps_without_find_unused_parameters() -> None:
    # The seed's unused parameters made DDP fail unless find_unused_parameters=True; two steps here
    # would raise "Expected to have finished reduction in the prior iteration" if any went unused.
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    model = optimizer = None
    try:
        for attention, aggregation in (("windowed", "convex"), ("full", "nash")):
            model = torch.nn.parallel.DistributedDataParallel(
                small_lm(attention=attention, aggregation=aggregation).train(), find_unused_parameters=False
            )
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            for step in range(2):
                tokens = checks.random_ids(2, 33, V, seed=step)
                model(tokens[:, :-1], labels=tokens[:, 1:]).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
    finally:
        # The DDP reducer must release the process group before it is destroyed: dropping it afterwards
        # can deadlock gloo's shutdown against the interpreter lock (seen once on a loaded machine).
        del model, optimizer
        gc.collect()
        dist.destroy_process_group()


@pytest.mark.parametrize(("d_model", "n_scales", "downsample"), [(256, 3, 4), (768, 4, 2)])
def test_parameter_count_per_block(d_model: int, n_scales: int, downsample: int) -> None:
    cfg = MAHAEncoderConfig(d_model=d_model, n_heads=d_model // 64, n_scales=n_scales, downsample=downsample)
    maha = sum(p.numel() for p in MAHABlock(config=cfg).parameters())
    # the standard pre-norm block: the shared Block over the attention mixer, same MLP and norms ...
    attention = Attention(d_model, AttentionMixerConfig(n_heads=d_model // 64))
    mlp = make_mlp(cfg.mlp, d_model, cfg.mlp_hidden or None, cfg.dropout)
    standard_block = Block(attention, mlp, lambda: make_norm(cfg.norm, d_model), cfg.dropout)
    standard = sum(p.numel() for p in standard_block.parameters())
    # ... which is exactly a block of the registered transformer LM
    transformer = hierseq.build_model("transformer", vocab_size=V, d_model=d_model, n_heads=d_model // 64, n_layers=1)
    assert sum(p.numel() for p in transformer.blocks[0].parameters()) == standard
    # and a block of the maha LM is the seed's MAHABlock
    maha_lm = MAHALM(
        MAHAConfig(
            vocab_size=V, d_model=d_model, n_heads=d_model // 64, n_layers=1, n_scales=n_scales, downsample=downsample
        )
    )
    assert sum(p.numel() for p in maha_lm.blocks[0].parameters()) == maha
    extra = extra_parameters_over_standard_block(cfg, d_model)
    assert maha - standard == extra["total"]
    small_parts = extra["total"] - extra["per_scale_qk"]
    print(f"\nd={d_model} S={n_scales} r={downsample}: standard {standard}, maha {maha}, extra {extra}")
    # Beyond the per-scale Q/K, the conv, downsampling and aggregation add well under 1% of a block.
    assert small_parts < 0.01 * standard
    if d_model == 256:
        assert (standard, maha, small_parts) == (803_328, 1_069_827, 4_355)


# ---------------------------------------------------------------------------------------- seed API
def test_seed_quick_start_api_and_lengths_beyond_max_len() -> None:
    torch.manual_seed(8)
    model = MAHATransformer(
        vocab_size=300, max_len=64, d_model=64, num_heads=4, num_scales=4, aggregation_strategy="convex"
    )
    output, aux_loss = model(torch.randint(0, 300, (1, 64)))
    assert tuple(output.shape) == (1, 64, 64) and aux_loss.dim() == 0 and torch.isfinite(output).all()
    longer, _ = model(torch.randint(0, 300, (2, 150)))  # rotary positions: no max_len crash
    assert tuple(longer.shape) == (2, 150, 64)
    nash = MAHATransformer(300, 64, 64, 4, 2, "nash")
    assert nash.config.aggregation == "nash" and nash(torch.randint(0, 300, (1, 10)))[0].shape == (1, 10, 64)
    with pytest.raises(ValueError, match="aggregation='cvx'"):
        MAHATransformer(300, 64, 64, 4, 2, "cvx")
    with pytest.raises(ValueError, match="max_len=0"):
        MAHATransformer(300, 0, 64, 4, 2, "convex")
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.randint(0, 300, (10,)))


def test_encoder_variant_sees_both_directions() -> None:
    torch.manual_seed(9)
    encoder = MAHATransformer(50, 64, 32, 2, 3, "convex", num_layers=1, causal=False, downsample=2, window=4)
    ids = torch.randint(0, 50, (1, 30))
    base, _ = encoder(ids)
    ids2 = ids.clone()
    ids2[0, 20] = (ids2[0, 20] + 1) % 50
    diff = (encoder(ids2)[0] - base).abs().sum(-1)[0]
    assert diff[:20].max() > 0 and diff[20] > 0  # the past changes too: bidirectional
    full = MAHATransformer(50, 64, 32, 2, 3, "nash", num_layers=1, causal=False, attention="full")
    assert full(ids)[0].shape == (1, 30, 32)
    with pytest.raises(ValueError, match="causal=False"):
        MAHALM(small_config(causal=False))
    with pytest.raises(ValueError, match="state"):
        MAHABlock(32, 2, causal=False).mixer(torch.randn(1, 4, 32), state=object())
    with pytest.raises(ValueError, match="state"):
        MAHABlock(32, 2, causal=False)(torch.randn(1, 4, 32), state=MAHAState.empty(3))


def test_block_is_a_drop_in_layer() -> None:
    torch.manual_seed(10)
    block = MAHABlock(48, 4, 3, "convex")
    x = torch.randn(2, 17, 48)
    y = block(x)
    assert isinstance(y, torch.Tensor) and y.shape == x.shape
    y2, aux = block(x, return_aux=True)
    torch.testing.assert_close(y2, y)
    assert aux.dim() == 0
    with pytest.raises(ValueError, match="x: shape"):
        block(torch.randn(2, 17, 40))
    assert isinstance(block.mixer, MultiscaleAttention)


def test_block_state_continues_cached_decoding() -> None:
    torch.manual_seed(11)
    block = MAHABlock(32, 2, 3, "nash", downsample=2, window=4).eval()
    x = torch.randn(2, 23, 32)
    with torch.no_grad():
        full = block(x)
        state = MAHAState.empty(3)
        pieces = [block(x[:, :5], state)] + [block(x[:, t : t + 1], state) for t in range(5, 11)]
        pieces.append(block(x[:, 11:], state))
    assert state.length == 23 and state.counts == [23, 11, 5]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)


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
        ("aux_loss_weight", -1.0),
        ("n_heads", 3),
    ],
)
def test_config_errors_name_field_and_value(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        MAHAConfig(**{field: value})
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        MAHAEncoderConfig(**{field: value})
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        hierseq.build_model("maha", **{field: value})


def test_registered_and_round_trips(tmp_path: Path) -> None:
    assert "maha" in hierseq.list_models(kind="causal_lm")
    model = hierseq.build_model("maha", **MAHAConfig.small_overrides(), vocab_size=V, aggregation="nash").eval()
    assert isinstance(model, MAHALM) and all(isinstance(m, MultiscaleAttention) for m in model.mixers)
    loaded = checks.assert_save_load_roundtrip(model, tmp_path / "m", V)
    assert loaded.config.aggregation == "nash"
