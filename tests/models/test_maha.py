"""MAHA: conformance in every attention mode x aggregation, regression tests for the seed's defects
(causality of conv, attention and upsampling each alone; constant aux loss; saturating Nash; unused
parameters), exactness of the banded attention and the cache, parameter budget, and the seed API."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hierseq
from hierseq.models.maha import (
    MAHALM,
    DilatedConv,
    MAHABlock,
    MAHAConfig,
    MAHATransformer,
    MultiscaleAttention,
    banded_attention,
    causal_source_index,
    extra_parameters_over_standard_block,
    upsample_causal,
)
from hierseq.models.transformer import TransformerBlock, TransformerConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared conformance checks
from conformance import checks  # noqa: E402

V = 32
MODES = [(a, g) for a in ("windowed", "full") for g in ("convex", "nash")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: with two intra-op threads on a shared 2-core machine, thread hand-offs
    cost 10-100x the arithmetic. One thread for this module, restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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
    checks.assert_batch_independent(model, V)
    checks.assert_loss_consistent(model, V)
    checks.assert_gradients_reach_all_parameters(model, V, min_nonzero_fraction=1.0)


def test_iid_floor_full_attention_nash() -> None:
    # The registry suite runs this for the default (windowed, convex); full attention is the other mask
    # path and Nash couples the scales through the game.
    checks.assert_iid_floor(lambda: small_lm(attention="full", aggregation="nash"), vocab=V, steps=40)


# ------------------------------------------------------------------------ causality, part by part
def test_dilated_conv_alone_is_causal_and_the_encoder_conv_is_not() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 20, 8, requires_grad=True)
    causal = DilatedConv(8, kernel_size=3, dilation=2, causal=True)
    y, _ = causal(x)
    y[0, 10].sum().backward()
    touched = (x.grad[0].abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert touched == [6, 8, 10]  # t - 4, t - 2, t: dilation 2, nothing after t
    x.grad = None
    centred = DilatedConv(8, kernel_size=3, dilation=2, causal=False)
    centred(x)[0][0, 10].sum().backward()
    assert (x.grad[0].abs().sum(-1) > 0).nonzero().flatten().tolist() == [8, 10, 12]


def test_dilated_conv_state_continues_exactly() -> None:
    torch.manual_seed(1)
    conv = DilatedConv(4, kernel_size=3, dilation=2, causal=True)
    x = torch.randn(2, 11, 4)
    full, _ = conv(x)
    first, state = conv(x[:, :3])
    rest = []
    for t in range(3, 11):
        y, state = conv(x[:, t : t + 1], state)
        rest.append(y)
    torch.testing.assert_close(torch.cat([first, *rest], 1), full)


def dense_window_reference(q, k, v, window: int, n_prefix: int, causal: bool) -> torch.Tensor:
    """Plain masked softmax attention over all keys; query i sits at key position n_prefix + i."""
    M, N = q.shape[2], k.shape[2]
    qpos = torch.arange(n_prefix, n_prefix + M).unsqueeze(1)
    kpos = torch.arange(N).unsqueeze(0)
    offset = kpos - qpos
    allowed = ((offset <= 0) & (offset > -window)) if causal else offset.abs() < window
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize(
    ("length", "window", "n_prefix", "causal"),
    [(37, 8, 0, True), (8, 8, 0, True), (5, 16, 0, True), (29, 8, 7, True), (1, 8, 5, True), (37, 8, 0, False)],
)
def test_banded_attention_matches_dense_masked_reference(length: int, window: int, n_prefix: int, causal: bool) -> None:
    gen = torch.Generator().manual_seed(length + window)
    q = torch.randn(2, 3, length, 4, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 3, n_prefix + length, 4, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 3, n_prefix + length, 4, generator=gen, dtype=torch.float64)
    got = banded_attention(q, k, v, window, n_prefix, causal)
    torch.testing.assert_close(got, dense_window_reference(q, k, v, window, n_prefix, causal), atol=1e-12, rtol=0)


def test_banded_attention_alone_is_causal() -> None:
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 40, 4, generator=gen) for _ in range(3))
    base = banded_attention(q, k, v, window=8)
    for j in (0, 7, 8, 20, 39):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, j] += 1.0
        v2[:, :, j] += 1.0
        changed = (banded_attention(q, k2, v2, window=8) - base).abs().amax(dim=(0, 1, 3)) > 0
        # Key j is seen by queries j .. j + 7 exactly: never earlier, and not beyond the window.
        assert changed.nonzero().flatten().tolist() == list(range(j, min(j + 8, 40)))


def test_causal_upsampling_alone_reads_only_finished_windows() -> None:
    positions = torch.arange(0, 50)
    for stride in (1, 2, 4, 8):
        source = causal_source_index(positions, stride)
        ended = (source + 1) * stride - 1  # last base position covered by the token read
        read = source >= 0
        assert (ended[read] <= positions[read]).all(), "a position read a coarse token covering its future"
        # ... and it is the newest finished one: the next token's window has not ended yet.
        assert ((source + 2) * stride - 1 > positions).all()
        # The seed's nearest upsampling (t // R) would read unfinished windows whenever R > 1.
        if stride > 1:
            assert (((positions // stride) + 1) * stride - 1 > positions).any()
    # Values: row 0 of the table is "before the first token"; coarse token j sits in row j + 1.
    table = torch.arange(6.0).view(1, 6, 1)  # tokens 0..4 in rows 1..5
    got = upsample_causal(table, torch.arange(0, 11), stride=2, first=0)[0, :, 0]
    assert got.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    # Continuing a cache: 3 tokens already made (row 0 = token 2), positions 6..9 read tokens 2, 3, 3, 4.
    got = upsample_causal(table[:, 3:], torch.arange(6, 10), stride=2, first=3)[0, :, 0]
    assert got.tolist() == [3, 4, 4, 5]


def test_mixer_gradient_is_causal_at_every_scale_alone() -> None:
    # One mixer, forced to a single scale via sparsemax scores: the output at t must not depend on h > t.
    torch.manual_seed(3)
    cfg = small_config(n_scales=3, downsample=2, window=4)
    mixer = MultiscaleAttention(cfg)
    h = torch.randn(1, 32, cfg.d_model, requires_grad=True)
    for scale in range(3):
        with torch.no_grad():
            mixer.scores.weight.zero_()
            mixer.scores.bias.fill_(-100.0)
            mixer.scores.bias[scale] = 100.0  # sparsemax puts all weight on this scale once available
        for t in (3, 8, 17, 31):
            h.grad = None
            y, _aux, weights = mixer(h, return_weights=True)
            assert weights[0, t, scale].item() == 1.0
            y[0, t].sum().backward()
            future = h.grad[0, t + 1 :].abs().sum().item()
            assert future == 0.0, f"scale {scale}: output at {t} depends on later inputs"
            assert h.grad[0, : t + 1].abs().sum().item() > 0


def test_coarse_scales_reach_beyond_the_fine_window() -> None:
    # Windowed mode: scale 0 sees the last `window` positions (+ conv context); coarse scales see
    # window * r^s. A single scale cannot reach position t - 40 with window 8; three scales can.
    torch.manual_seed(4)
    h = torch.randn(1, 64, 32, requires_grad=True)
    reach = {}
    for n_scales in (1, 3):
        mixer = MultiscaleAttention(small_config(n_scales=n_scales, downsample=4, window=8))
        h.grad = None
        mixer(h)[0][0, 63].sum().backward()
        reach[n_scales] = int((h.grad[0].abs().sum(-1) > 0).nonzero().min())
    assert reach[1] >= 63 - 8 - 4  # window + dilated conv context
    assert reach[3] <= 63 - 40


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
    for layer in out.cache.layers:
        assert all(k.shape[2] <= 7 for k in layer.keys)  # window - 1 keys per scale, whatever the context
        assert all(p is None or p.shape[1] < 2 for p in layer.pending)
        assert layer.counts == [150, 75, 37]


# --------------------------------------------------------------------------- aggregation / aux loss
@pytest.mark.parametrize("aggregation", ["convex", "nash"])
def test_aux_loss_has_a_nonzero_gradient(aggregation: str) -> None:
    model = small_lm(aggregation=aggregation).train()
    out = model(checks.random_ids(2, 40, V), labels=checks.random_ids(2, 40, V, seed=1))
    assert 0.0 < out.aux_loss.item() < model.config.n_scales - 1
    out.aux_loss.backward()
    scores = model.model.blocks[0].attn.scores.weight.grad
    assert scores is not None and scores.abs().sum().item() > 0
    if aggregation == "nash":  # the game couples the weights to the attention outputs
        assert model.model.blocks[0].attn.value.weight.grad.abs().sum().item() > 0
    torch.testing.assert_close(out.loss, out.lm_loss + model.config.aux_loss_weight * out.aux_loss)


def test_convex_weights_are_the_simplex_projection_of_the_scores() -> None:
    from hierseq.ops.simplex import simplex_kkt_residual

    torch.manual_seed(5)
    cfg = small_config(aggregation="convex")
    mixer = MultiscaleAttention(cfg)
    with torch.no_grad():
        mixer.scores.weight.mul_(50)  # make some tokens sparse, some dense
    h = torch.randn(2, 40, cfg.d_model)
    _, _, weights = mixer(h, return_weights=True)
    scores = mixer.scores(h + F.silu(mixer.conv(h)[0]))
    available = slice(3, None)  # all three scales have a finished token from position 3 on
    residual = simplex_kkt_residual(weights[:, available].double(), scores[:, available].double())
    assert residual.max().item() < 1e-5
    assert (weights[:, :1, 1:] == 0).all() and (weights[:, 1:3, 2] == 0).all()  # unfinished scales
    support = (weights[:, available] > 0).sum(-1)
    assert support.min().item() < 3 and support.max().item() > 1


def test_nash_weights_not_one_hot_at_init_for_long_sequences() -> None:
    # The seed's Frobenius error over the whole sequence grows like sqrt(N * D): one-hot after one step.
    torch.manual_seed(6)
    model = MAHATransformer(256, 4096, 64, 4, 4, "nash", num_layers=1, downsample=2, window=16)
    ids = torch.randint(0, 256, (1, 4096))
    block = model.model.blocks[0]
    with torch.no_grad():
        _, _, weights = block.attn(block.attn_norm(model.model.embed(ids)), return_weights=True)
    settled = weights[0, 8:]  # every scale has a finished token from position 7 on
    assert settled.max().item() < 0.6 and settled.min().item() > 0.1
    entropy = -(settled * settled.log()).sum(-1)
    assert entropy.min().item() > 0.9 * torch.log(torch.tensor(4.0)).item()


def test_nash_in_model_is_at_its_fixed_point() -> None:
    torch.manual_seed(7)
    cfg = small_config(aggregation="nash", nash_iters=6)
    mixer = MultiscaleAttention(cfg)
    h = torch.randn(1, 40, cfg.d_model)
    _, _, weights = mixer(h, return_weights=True)
    more = []
    for iters in (6, 30):
        mixer.cfg.nash_iters = iters
        more.append(mixer(h, return_weights=True)[2])
    mixer.cfg.nash_iters = 6
    torch.testing.assert_close(more[0], weights)
    # Six contraction steps already sit within 2^-6 of the equilibrium; 30 more change next to nothing.
    assert (more[1] - weights).abs().max().item() < 2**-6


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
        dist.destroy_process_group()


@pytest.mark.parametrize(("d_model", "n_scales", "downsample"), [(256, 3, 4), (768, 4, 2)])
def test_parameter_count_per_block(d_model: int, n_scales: int, downsample: int) -> None:
    cfg = MAHAConfig(d_model=d_model, n_heads=d_model // 64, n_scales=n_scales, downsample=downsample)
    maha = sum(p.numel() for p in MAHABlock(config=cfg).parameters())
    standard = sum(
        p.numel() for p in TransformerBlock(TransformerConfig(d_model=d_model, n_heads=d_model // 64)).parameters()
    )
    extra = extra_parameters_over_standard_block(cfg)
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
        MAHABlock(32, 2, causal=False).attn(torch.randn(1, 4, 32), state=object())


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


def test_registered_and_round_trips(tmp_path: Path) -> None:
    assert "maha" in hierseq.list_models(kind="causal_lm")
    model = hierseq.build_model("maha", **MAHAConfig.small_overrides(), vocab_size=V, aggregation="nash").eval()
    checks.assert_save_load_roundtrip(model, tmp_path / "m", V)
