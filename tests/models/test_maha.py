"""MAHA (the LM and the seed's API): the conformance checks in the modes the registry suite does not run,
regression tests for the seed's defects at the model level (constant aux loss; saturating Nash; unused
parameters; more parameters than a standard block), the LM's decoding state, the parameter budget per
block against the transformer (and what ``hierseq info`` shows), and the seed API
(``hierseq.compat.maha``: MAHATransformer, MAHABlock, the encoder variant).

The registry suite (tests/conformance) runs maha and its ``conformance_variants``: nash, softmax, full
attention (convex and nash) and per-scale Q/K. The mixer alone (causality at every scale, the reach
pyramid, the aggregations, its cache) is tested in tests/mixers/test_maha_mixer.py; the solvers in
tests/ops/test_simplex_qp_op.py and tests/ops/test_redundancy_game_op.py."""

from __future__ import annotations

import gc
import socket
from pathlib import Path

import pytest
import torch
from tests.conformance import checks

import hierseq
from hierseq.cli import main
from hierseq.compat.maha import MAHABlock, MAHAEncoderConfig, MAHATransformer
from hierseq.mixers.attention import Attention, AttentionMixerConfig
from hierseq.mixers.maha import MAHAState, MultiscaleAttention, parameter_report
from hierseq.models.causal_lms import MAHALM, MAHAConfig
from hierseq.modules.block import Block
from hierseq.modules.mlp import make_mlp
from hierseq.modules.norms import make_norm
from hierseq.modules.state import DecodingState

V = 32
AGGREGATIONS = ("convex", "nash", "softmax")


def small_config(**overrides: object) -> MAHAConfig:
    return MAHAConfig(**{**MAHAConfig.small_overrides(), "vocab_size": V, **overrides})


def small_lm(seed: int = 0, **overrides: object) -> MAHALM:
    torch.manual_seed(seed)
    return MAHALM(small_config(**overrides)).eval()


# ------------------------------------------------------------------- conformance in the other modes
@pytest.mark.parametrize(
    "overrides",
    [{"attention": "full", "aggregation": "softmax"}, {"per_scale_qk": True, "aggregation": "nash", "n_scales": 2}],
)
def test_conformance_checks_in_the_modes_the_suite_does_not_run(overrides: dict) -> None:
    model = small_lm(**overrides)
    checks.assert_causal_by_perturbation(model, V, length=45)
    checks.assert_causal_by_gradient(model, V, length=45, positions=[0, 3, 4, 7, 8, 15, 16, 31, 44])
    checks.assert_cached_decoding_matches(model, V, segments=(5,) + (1,) * 35 + (13,) + (1,) * 27)
    checks.assert_cached_decoding_matches(model, V, segments=checks.prefill_then_steps(19, (1, 3, 17), 90))
    checks.assert_detach_keeps_values_and_cuts_graph(model, V)
    checks.assert_state_round_trips(model, V)
    checks.assert_batch_independent(model, V)
    checks.assert_loss_consistent(model, V)
    checks.assert_gradients_reach_all_parameters(model, V, min_nonzero_fraction=1.0)


def test_iid_floor_full_attention_nash() -> None:
    # The registry suite runs this for every variant at its defaults; this is the full-attention game
    # with fixed strengths (no learned gamma / tau), a path of its own.
    checks.assert_iid_floor(lambda: small_lm(attention="full", aggregation="nash", learn_strengths=False), vocab=V)


# ------------------------------------------------------------------------- the LM's modes and state
def test_windowed_with_a_large_window_equals_full_attention() -> None:
    full = small_lm(attention="full")
    windowed = small_lm(attention="windowed", window=128)
    ids = checks.random_ids(2, 100, V)
    torch.testing.assert_close(checks.logits_of(windowed, ids), checks.logits_of(full, ids), atol=1e-5, rtol=0)


def test_windowed_decoding_state_grows_like_log_of_the_context() -> None:
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
        assert all(k is None or k.shape[2] <= 8 for k in layer.keys)  # a window per level, whatever the context
        assert all(p is None or p.shape[1] < 2 for p in layer.pending)
        assert layer.counts == [150, 75, 37, 18, 9, 4, 2, 1, 0]
    # the LM's state_floats is the sum of the layers' state_size; it grows like log(T), not like T:
    # 1000x the context adds log2(1000) ~ 10 levels of at most a window of keys (+ r - 1 pending) each
    assert model.state_floats(150) == sum(m.state_size(150) for m in model.mixers)
    mixer = model.mixers[0]
    per_level = 8 * (mixer.n_heads * mixer.qk_dim + 32) + 32
    growth = model.state_floats(150_000) - model.state_floats(150)
    assert 0 < growth <= 2 * 10 * per_level
    assert model.state_floats(150_000) < 0.01 * 2 * 2 * 32 * 150_000  # vs a KV cache: 2 D per token per layer
    assert model.tbptt_refusal() is None
    assert "attention='full'" in small_lm(attention="full").tbptt_refusal()


# --------------------------------------------------------------------------- aggregation / aux loss
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_aux_loss_has_a_nonzero_gradient(aggregation: str) -> None:
    model = small_lm(aggregation=aggregation).train()
    out = model(checks.random_ids(2, 40, V), labels=checks.random_ids(2, 40, V, seed=1))
    assert 0.0 < out.aux_loss.item() < model.config.n_scales - 1
    out.aux_loss.backward()
    scores = model.blocks[0].mixer.scores.weight.grad
    assert scores is not None and scores.abs().sum().item() > 0
    if aggregation != "softmax":  # the optimisation couples the weights to the attention outputs
        assert model.blocks[0].mixer.value.weight.grad.abs().sum().item() > 0
    torch.testing.assert_close(out.loss, out.lm_loss + model.config.aux_loss_weight * out.aux_loss)


def test_nash_weights_not_one_hot_at_init_for_long_sequences() -> None:
    # The seed's Frobenius error over the whole sequence grows like sqrt(N * D): one-hot after one step.
    # Here the weights are a certified equilibrium per token, at the shell's init, over 4096 tokens.
    torch.manual_seed(6)
    model = MAHATransformer(256, 4096, 64, 4, 4, "nash", num_layers=1, downsample=2, window=16)
    ids = torch.randint(0, 256, (1, 4096))
    mixer = model.blocks[0].mixer
    with torch.no_grad():
        outputs, mask, u, v, _ = mixer.candidates(model.blocks[0].mixer_norm(model.embed(ids)))
        weights, problem = mixer.aggregate(outputs, mask, u, v)
    assert problem["gap"].max().item() <= 1e-4
    settled = weights[0, 8:]  # every scale has a finished token from position 7 on
    # Measured: largest weight 0.87, mean top weight 0.47, 3.5 of 4 scales used on average (the game
    # drops a redundant scale at times), mean entropy 1.10 of ln 4 = 1.39; no token one-hot.
    assert settled.max().item() < 0.95 and settled.amax(-1).mean().item() < 0.6
    assert (settled > 0).sum(-1).float().mean().item() > 3.0
    entropy = -(settled * settled.clamp(min=1e-12).log()).sum(-1)
    assert entropy.mean().item() > 0.7 * torch.log(torch.tensor(4.0)).item()


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
        for attention, aggregation in (("windowed", "convex"), ("full", "nash"), ("windowed", "softmax")):
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


def _block_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.blocks[0].parameters())


#: exact parameters of one block (norms + mixer + SwiGLU MLP), n_heads 4, n_layers 4, default MLP:
#: transformer, and maha at its defaults (S = 3, r = 4, window 64, query/key head width D / 4 - 2).
BLOCK_PARAMETERS = {
    256: {"transformer": 803_328, "convex": 802_052, "nash": 801_797, "softmax": 801_795},
    128: {"transformer": 200_960, "convex": 200_324, "nash": 200_197, "softmax": 200_195},
}


@pytest.mark.parametrize("d_model", [256, 128])
def test_a_block_has_no_more_parameters_than_a_standard_block(d_model: int) -> None:
    # d_model 128 and n_layers 4 is the LM benchmark's width; 256 the library default.
    with torch.device("meta"):
        transformer = hierseq.build_model("transformer", d_model=d_model, n_layers=4, n_heads=4)
        models = {
            a: hierseq.build_model("maha", d_model=d_model, n_layers=4, n_heads=4, aggregation=a) for a in AGGREGATIONS
        }
    standard = _block_parameters(transformer)
    assert standard == BLOCK_PARAMETERS[d_model]["transformer"]
    total = hierseq.count_parameters(transformer)
    for aggregation, model in models.items():
        block = _block_parameters(model)
        assert block == BLOCK_PARAMETERS[d_model][aggregation] and block <= standard
        assert hierseq.count_parameters(model) <= total  # the whole model too (same embedding and norms)
        report = parameter_report(model.blocks[0].mixer.cfg, d_model)
        assert report["within_budget"] and block - standard == report["difference"]
        assert report["qk_head_dim"] == d_model // 4 - 2
        # the per-part accounting is the module's real count
        mixer = sum(p.numel() for p in model.blocks[0].mixer.parameters())
        assert mixer == report["maha"] == report["parts"]["total"]
    # the three aggregations share the attention exactly: their blocks differ only in the aggregation
    # parameters (convex: target gain D + ridge 1; nash: redundancy, crowding; softmax: none)
    counts = BLOCK_PARAMETERS[d_model]
    assert counts["convex"] - counts["softmax"] == d_model + 1 and counts["nash"] - counts["softmax"] == 2


def test_the_maha_block_is_the_seed_block_and_the_standard_block_is_the_transformer_block() -> None:
    cfg = MAHAEncoderConfig(d_model=256, n_heads=4)
    maha = sum(p.numel() for p in MAHABlock(config=cfg).parameters())
    attention = Attention(256, AttentionMixerConfig(n_heads=4))
    mlp = make_mlp(cfg.mlp, 256, cfg.mlp_hidden or None, cfg.dropout)
    standard = sum(p.numel() for p in Block(attention, mlp, lambda: make_norm(cfg.norm, 256), cfg.dropout).parameters())
    assert (standard, maha) == (BLOCK_PARAMETERS[256]["transformer"], BLOCK_PARAMETERS[256]["convex"])


@pytest.mark.parametrize(
    ("overrides", "within", "why"),
    [
        ({"per_scale_qk": True}, True, None),  # per-scale Q/K at the width that fits: low-rank per scale
        ({"qk_head_dim": 64}, False, "qk_head_dim=64"),
        ({"per_scale_qk": True, "qk_head_dim": 64}, False, "qk_head_dim=64, per_scale_qk=True"),
    ],
)
def test_a_flag_may_exceed_the_budget_and_says_so(overrides: dict, within: bool, why: str | None) -> None:
    with torch.device("meta"):
        model = hierseq.build_model("maha", d_model=256, n_heads=4, **overrides)
    block = _block_parameters(model)
    report = parameter_report(model.blocks[0].mixer.cfg, 256)
    assert report["within_budget"] is within and (block <= BLOCK_PARAMETERS[256]["transformer"]) is within
    assert block - BLOCK_PARAMETERS[256]["transformer"] == report["difference"]
    lines = model.config.describe()
    if within:
        assert "within the budget" in lines[0]
    else:
        assert f"EXCEEDS a standard transformer block by {report['difference']:,} parameters" in lines[0]
        assert report["why"] == why and why in lines[0]
    # the seed's full-width per-scale Q/K costs 2 D^2 (S - 1) more: +50% of the attention at S = 3
    if overrides.get("qk_head_dim") and overrides.get("per_scale_qk"):
        assert report["parts"]["query_key"] == 3 * 2 * 256 * 256


def test_info_shows_no_more_parameters_than_the_transformer(capsys: pytest.CaptureFixture) -> None:
    # `hierseq info` at the same width, depth and MLP (what the issue checks by hand).
    counts = {}
    for name in ("maha", "transformer"):
        assert main(["info", name, "--set", "d_model=128", "--set", "n_layers=4"]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("parameters:"))
        counts[name] = int(line.split(":")[1].replace(",", ""))
    assert counts["maha"] <= counts["transformer"]
    assert counts["transformer"] - counts["maha"] == 4 * (200_960 - 200_324)
    lines = hierseq.build_config("maha", d_model=128, n_layers=4).describe()
    assert "within the budget (-636)" in lines[0] and "query/key head width 30 of 32" in lines[1]


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
    for strategy in ("nash", "softmax"):
        other = MAHATransformer(300, 64, 64, 4, 2, strategy)
        assert other.config.aggregation == strategy and other(torch.randint(0, 300, (1, 10)))[0].shape == (1, 10, 64)
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
    assert state.length == 23 and state.counts == [23, 11, 5, 2, 1, 0]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_scales", 0),
        ("n_scales", 9),
        ("downsample", 1),
        ("attention", "sparse"),
        ("window", 0),
        ("aggregation", "mean"),
        ("qk_head_dim", 5),
        ("nash_redundancy", 1.0),
        ("nash_crowding", -1.0),
        ("convex_ridge", 0),
        ("learn_strengths", "yes"),
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
    for aggregation in AGGREGATIONS:
        overrides = {**MAHAConfig.small_overrides(), "vocab_size": V, "aggregation": aggregation}
        model = hierseq.build_model("maha", **overrides).eval()
        assert isinstance(model, MAHALM) and all(isinstance(m, MultiscaleAttention) for m in model.mixers)
        loaded = checks.assert_save_load_roundtrip(model, tmp_path / aggregation, V)
        assert loaded.config.aggregation == aggregation
