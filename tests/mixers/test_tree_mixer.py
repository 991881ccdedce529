"""The tree attention mixer: exact mode == dense causal attention (values and gradients), summary pooling
and its log-count offset, fp16/bf16 padding, cached decoding == the full forward, the O(log L) decode
state (and ``state_size``), and the TBPTT refusal of the exact mode."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hierseq.mixers.tree import TreeAttention, TreeAttentionCache, TreeMixerConfig
from hierseq.ops.tree_attention import tree_levels

LEAF = 8
D = 32


def make_tree(mode: str, seed: int = 0, n_summary: int = 4, **fields) -> TreeAttention:
    torch.manual_seed(seed)
    cfg = TreeMixerConfig(n_heads=2, leaf_size=LEAF, sibling_mode=mode, n_summary=n_summary, **fields)
    cfg.check(D)
    return TreeAttention(D, cfg)


def run(attn: TreeAttention, x: torch.Tensor, state=None, use_cache: bool = False):
    y, state_out, aux = attn(x, state, use_cache)
    assert aux is None
    return y, state_out


def dense_reference(attn: TreeAttention, x: torch.Tensor) -> torch.Tensor:
    """The same projections and rotary positions as ``attn``, with plain causal SDPA. x: [B, L, D]."""
    B, L, D = x.shape
    qkv = attn.qkv(x).view(B, L, 3, attn.n_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.rotary(q, k, 0)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attn.out_proj(y.transpose(1, 2).reshape(B, L, D))


@pytest.mark.parametrize("length", [1, 5, 8, 9, 33, 64, 100, 257])
def test_exact_mode_equals_dense_causal_attention(length: int) -> None:
    attn = make_tree("exact")
    x = torch.randn(2, length, D)
    with torch.no_grad():
        y, state = run(attn, x)
        assert state is None
        diff = (y - dense_reference(attn, x)).abs().max().item()
    assert diff < 1e-5


@pytest.mark.parametrize("length", [9, 45, 100])
def test_exact_mode_gradients_equal_dense_causal_attention(length: int) -> None:
    """Backward through the checkpointed tree levels gives the gradients of dense causal attention."""
    attn = make_tree("exact")
    x = torch.randn(2, length, D, requires_grad=True)
    upstream = torch.randn(2, length, D)
    params = [x, *attn.parameters()]
    grads = torch.autograd.grad((run(attn, x)[0] * upstream).sum(), params)
    grads_ref = torch.autograd.grad((dense_reference(attn, x) * upstream).sum(), params)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)


def test_summary_mode_is_a_different_approximation_that_is_exact_on_short_inputs() -> None:
    exact = make_tree("exact")
    summary = make_tree("summary")
    summary.load_state_dict(exact.state_dict())
    x = torch.randn(1, 40, D)
    with torch.no_grad():
        y_exact, y_summary = run(exact, x)[0], run(summary, x)[0]
    # Inside the first leaf nothing is summarised, so both modes agree there ...
    assert torch.allclose(y_exact[:, :LEAF], y_summary[:, :LEAF], atol=1e-6)
    # ... and from the second leaf on, pooled siblings change the result.
    assert (y_exact[:, LEAF:] - y_summary[:, LEAF:]).abs().max() > 1e-3


def test_summary_log_count_offset_makes_pooling_exact_for_equal_keys() -> None:
    """With every key equal, exact attention is the plain mean of the visible values. A summary token
    averages g values and carries + log g on its logit, so it weighs as much as the g tokens it stands
    for: summary mode then gives exactly the same mean (without the offset it would not)."""
    summary = make_tree("summary", n_summary=2)
    exact = make_tree("exact", n_summary=2)
    with torch.no_grad():
        summary.qkv.weight[D : 2 * D].zero_()  # key projection: every key is 0, every logit equal
    exact.load_state_dict(summary.state_dict())
    x = torch.randn(2, 77, D)
    with torch.no_grad():
        assert torch.allclose(run(summary, x)[0], run(exact, x)[0], atol=1e-5)
        # the offset is what makes it exact: without it the summaries are under-weighted
        for level in range(tree_levels(-(-77 // LEAF))):
            assert summary.summary_log_count(level) == math.log((LEAF << level) / 2)
        summary.summary_log_count = lambda level: 0.0
        assert not torch.allclose(run(summary, x)[0], run(exact, x)[0], atol=1e-3)


@pytest.mark.parametrize("mode", ["summary", "exact"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_padding_gives_no_nan(mode: str, dtype: torch.dtype) -> None:
    """Seed defect 4: the seed's -1e9 mask overflows in fp16 and fully masked rows gave NaN. Here every
    row, pad rows included, is finite in fp16/bf16, and real positions stay close to fp32."""
    attn = make_tree(mode)
    length = 4 * LEAF + 1  # the last leaf is one real token and LEAF - 1 pads
    x = torch.randn(2, length, D)
    B, L, _ = x.shape
    with torch.no_grad():
        qkv = attn.qkv(x).view(B, L, 3, 2, 16)
        q, k, v = (t.to(dtype) for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))
        padded = [F.pad(t, (0, 0, 0, 5 * LEAF - length)) for t in (q, k, v)]
        inner = attn._exact_levels if mode == "exact" else attn._summary_gathered
        every_row = inner(*padded, n_leaves=5)  # [B, H, 5*LEAF, Dh], pad rows included
        assert every_row.shape == (2, 2, 5 * LEAF, 16)
        assert torch.isfinite(every_row).all()
        half = run(attn.to(dtype), x.to(dtype))[0].float()
        full = run(attn.float(), x)[0]
    assert torch.isfinite(half).all()
    assert (half - full).abs().max() < (0.05 if dtype == torch.bfloat16 else 0.01)


# ----------------------------------------------------------------------------------- decoding state
@pytest.mark.parametrize("mode", ["summary", "exact"])
def test_cached_decoding_equals_full_forward(mode: str) -> None:
    """Prefill, then single tokens and chunks crossing leaf and level boundaries; a given state is
    advanced in place and returned, ``length`` counts the tokens."""
    attn = make_tree(mode).eval()
    x = torch.randn(2, 90, D)
    with torch.no_grad():
        full = run(attn, x)[0]
        for segments in ((5,) + (1,) * 30 + (13, 17, 1, 3, 21), (1, 70, 1, 1, 17), (16, 8, 8, 1, 7, 50)):
            state, pieces, start = None, [], 0
            for i, size in enumerate(segments):
                y, returned = run(attn, x[:, start : start + size], state, use_cache=i == 0)
                assert isinstance(returned, TreeAttentionCache)
                assert state is None or returned is state
                state, start = returned, start + size
                assert state.length == start
                pieces.append(y)
            torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["summary", "exact"])
def test_state_size_counts_the_floats_of_the_state(mode: str) -> None:
    attn = make_tree(mode)
    with torch.no_grad():
        for length in (1, 7, 8, 9, 40, 77, 129):
            state = run(attn, torch.randn(3, length, D), use_cache=True)[1]
            assert state.num_floats() == 3 * attn.state_size(length), f"length {length}"
            state = run(attn, torch.randn(3, 1, D), state)[1]  # and after one more token
            assert state.num_floats() == 3 * attn.state_size(length + 1), f"length {length} + 1"


def test_summary_decode_state_is_logarithmic_and_exact_state_is_linear() -> None:
    n = 160
    x = torch.randn(1, n, D, generator=torch.Generator().manual_seed(11))
    for mode in ("summary", "exact"):
        attn = make_tree(mode)
        with torch.no_grad():
            state = run(attn, x[:, :3], use_cache=True)[1]
            sizes = []
            for t in range(3, n):
                state = run(attn, x[:, t : t + 1], state)[1]
                sizes.append(state.num_cached_keys())
        if mode == "summary":
            # at most leaf - 1 raw keys plus n_summary per set bit of the number of completed leaves
            bound = max((LEAF - 1) + 4 * bin(t // LEAF).count("1") for t in range(4, n + 1))
            assert max(sizes) <= bound <= LEAF - 1 + 4 * tree_levels(n // LEAF + 1)
            assert max(sizes) < n // 4
        else:
            assert sizes == list(range(4, n + 1))  # every past token: the quadratic mode, honestly


def test_summary_cache_after_a_long_prefill_holds_only_logarithmic_memory() -> None:
    """The prefill stores copies, not views of the prompt's projections, so the state's storage is just
    the keys a new token attends to: at most leaf - 1 raw tokens plus n_summary per tree level."""
    attn = make_tree("summary")
    with torch.no_grad():
        state = run(attn, torch.randn(1, 1001, D), use_cache=True)[1]
    tensors = [state.leaf_k, state.leaf_v] + [t for slot in state.slots if slot is not None for t in slot]
    bytes_per_key = D * 4  # n_heads * head_dim = d_model = 32 floats
    assert sum(t.untyped_storage().nbytes() for t in tensors) == 2 * state.num_cached_keys() * bytes_per_key
    # 1001 = 125 leaves (0b1111101: 6 set bits) + 1 token
    assert state.num_cached_keys() == 1 + 4 * 6


def test_only_the_exact_mode_refuses_tbptt() -> None:
    assert make_tree("summary").tbptt_refusal() is None
    assert "exact" in make_tree("exact").tbptt_refusal()


@pytest.mark.parametrize(
    "d_model, fields, message",
    [
        (D, {"sibling_mode": "full"}, r"sibling_mode='full': must be one of \['exact', 'summary'\]"),
        (D, {"leaf_size": 0}, "leaf_size=0: must be a positive integer"),
        (D, {"n_summary": 3}, "n_summary=3: must divide leaf_size=8"),
        (D, {"n_summary": 0}, "n_summary=0: must be a positive integer"),
        (D, {"n_heads": 3}, "d_model=32: must be divisible by n_heads=3"),
        (20, {"n_heads": 4}, "n_heads=4: head dim d_model/n_heads=5 must be even"),
        (D, {"rope_base": 0.0}, "rope_base=0.0"),
    ],
)
def test_config_check_names_field_and_value(d_model: int, fields: dict, message: str) -> None:
    cfg = TreeMixerConfig(**{"n_heads": 2, "leaf_size": LEAF, "n_summary": 4, **fields})
    with pytest.raises(ValueError, match=message):
        cfg.check(d_model)


# ------------------------------------------------------------------------------------ levelwise
def levelwise_reference(attn: TreeAttention, x: torch.Tensor) -> torch.Tensor:
    """The seed's tree, written out plainly with loops over leaves, levels and sibling pairs and explicit
    softmaxes (no padding, no batching of pairs). x: [B, L, D] -> [B, L, D]."""
    B, L, D = x.shape
    H, dh, P = attn.n_heads, attn.head_dim, attn.leaf_size
    positions = torch.arange(L)

    def heads(t: torch.Tensor) -> torch.Tensor:  # [B, N, D] -> [B, H, N, Dh]
        return t.view(B, -1, H, dh).transpose(1, 2)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
        if causal:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, -1, D)

    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    q, k, v = attn.rotary.rotate(heads(q), positions, L), attn.rotary.rotate(heads(k), positions, L), heads(v)
    z = x.clone()
    for start in range(0, L, P):
        leaf = slice(start, min(start + P, L))
        z[:, leaf] = x[:, leaf] + attend(q[:, :, leaf], k[:, :, leaf], v[:, :, leaf], causal=True)
    n_leaves = -(-L // P)
    for level in range(tree_levels(n_leaves)):
        size = P << level
        normed = F.rms_norm(z, (D,))
        new_z = z.clone()
        for right_start in range(size, L, 2 * size):
            left = slice(right_start - size, right_start)
            right = slice(right_start, min(right_start + size, L))
            if attn.exact:
                lk, lv = attn.level_kv(normed[:, left]).chunk(2, dim=-1)
                lk, lv = attn.rotary.rotate(heads(lk), positions[left], L), heads(lv)
            else:  # the mean of each group of g = size / n_summary tokens, normed, projected, rotated at its end
                g = size // attn.n_summary
                groups = range(left.start, left.stop, g)
                means = torch.stack([z[:, i : i + g].mean(1) for i in groups], dim=1)
                lk, lv = attn.level_kv(F.rms_norm(means, (D,))).chunk(2, dim=-1)
                lk, lv = attn.rotary.rotate(heads(lk), torch.tensor([i + g - 1 for i in groups]), L), heads(lv)
            rq = attn.rotary.rotate(heads(attn.level_q(normed[:, right])), positions[right], L)
            new_z[:, right] = z[:, right] + attn.level_out(attend(rq, lk, lv, causal=False))
        z = new_z
    return attn.out_proj(z - x)


@pytest.mark.parametrize("mode", ["summary", "exact"])
@pytest.mark.parametrize("length", [1, 8, 9, 45, 64, 100])
def test_levelwise_equals_the_plain_reference(mode: str, length: int) -> None:
    """Values and gradients (inputs and every parameter) of the batched levelwise path against the
    loop-per-pair reference, fp32, 1e-5 relative."""
    attn = make_tree(mode, level_mode="levelwise")
    x = torch.randn(2, length, D, requires_grad=True)
    upstream = torch.randn(2, length, D)
    y = run(attn, x)[0]
    y_ref = levelwise_reference(attn, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    params = [x, *attn.parameters()]
    # One leaf has no levels, so the level weights get no gradient (None) in both.
    grads = torch.autograd.grad((y * upstream).sum(), params, allow_unused=True)
    grads_ref = torch.autograd.grad((y_ref * upstream).sum(), params, allow_unused=True)
    for g, g_ref in zip(grads, grads_ref):
        assert (g is None) == (g_ref is None) == (length <= LEAF and g_ref is None)
        if g is not None:
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


def test_levelwise_levels_carry_information_level_by_level() -> None:
    """The cross-level attention is the mechanism: with it switched off (level_out = 0) a token sees only
    its own leaf; with it, a token in leaf 4 (binary 100) depends on leaf 0, which it reaches only through
    the level-2 left sibling, whose representations carry level-0 and level-1 updates."""
    attn = make_tree("summary", level_mode="levelwise")
    x = torch.randn(1, 5 * LEAF, D, requires_grad=True)
    y = run(attn, x)[0]
    (grad,) = torch.autograd.grad(y[0, 4 * LEAF].sum(), x)
    assert grad[0, :LEAF].abs().sum() > 0, "leaf 4 reads leaf 0 through level 2"
    with torch.no_grad():
        attn.level_out.weight.zero_()
    y_off = run(attn, x)[0]
    (grad_off,) = torch.autograd.grad(y_off[0, 4 * LEAF].sum(), x)
    assert grad_off[0, : 4 * LEAF].abs().sum() == 0, "without the levels only the own leaf is read"
    assert (y - y_off)[:, LEAF:].abs().max() > 1e-3


def test_levelwise_summary_decode_state_is_logarithmic() -> None:
    attn = make_tree("summary", level_mode="levelwise")
    sizes = [attn.state_size(n) for n in (1024, 4096, 16384)]
    assert sizes[0] < sizes[1] < sizes[2] < 2 * sizes[0], sizes  # grows with log L, not L
    exact = make_tree("exact", level_mode="levelwise")
    assert exact.state_size(16384) >= 2 * D * 16384


def test_moment_scores_weigh_a_pooled_block_closer_to_exact_attention() -> None:
    """Jensen: q.mean(k) + log g under-weights a pooled block. On keys spread around their mean, the
    moment term brings summary attention closer to exact attention (dense causal)."""
    errors = {}
    for scores in ("mean", "moment"):
        attn = make_tree("summary", n_summary=2, summary_scores=scores)
        with torch.no_grad():
            attn.qkv.weight.mul_(3.0)  # sharper attention: logits spread, as in a trained model
            x = torch.randn(4, 128, D)
            errors[scores] = (run(attn, x)[0] - dense_reference(attn, x)).pow(2).mean().item()
    assert errors["moment"] < errors["mean"], errors
