"""The attention mixer, its KVState (incl. the bounded, re-based TBPTT window) and causal_mask_with_offset."""

from __future__ import annotations

import math

import pytest
import torch

from hierseq.mixers.attention import Attention, AttentionMixerConfig, KVState, causal_mask_with_offset
from hierseq.modules.positional import RotaryEmbedding

ATOL = 1e-5


def make_attention(d_model=16, n_heads=4, seed=0, **fields):
    torch.manual_seed(seed)
    return Attention(d_model, AttentionMixerConfig(n_heads=n_heads, **fields)).eval()


def run(attn, x, state=None, use_cache=False):
    y, state, aux = attn(x, state, use_cache)
    assert aux is None
    return y, state


def random_input(batch=2, length=10, d_model=16, seed=1):
    return torch.randn(batch, length, d_model, generator=torch.Generator().manual_seed(seed))


def reference_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(Dh) + causal mask) V, written out by hand. x: [B, L, D] -> [B, L, D]."""
    batch, length, d_model = x.shape
    heads, head_dim = attn.n_heads, attn.head_dim
    q, k, v = (x @ attn.qkv.weight.T).split(d_model, dim=-1)

    def split_heads(t):  # [B, L, D] -> [B, H, L, Dh]
        return t.reshape(batch, length, heads, head_dim).transpose(1, 2)

    q, k, v = split_heads(q), split_heads(k), split_heads(v)
    q, k = attn.rotary(q, k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    future = torch.ones(length, length, dtype=torch.bool).triu(diagonal=1)
    weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    y = (weights @ v).transpose(1, 2).reshape(batch, length, d_model)
    return y @ attn.out_proj.weight.T


def test_matches_hand_written_masked_softmax():
    attn = make_attention()
    x = random_input()
    with torch.no_grad():
        y, state = run(attn, x)
        assert state is None
        assert y.shape == x.shape
        torch.testing.assert_close(y, reference_attention(attn, x), atol=ATOL, rtol=1e-5)


def test_causal_perturbing_later_tokens_leaves_earlier_outputs_unchanged():
    attn = make_attention()
    x = random_input(length=12)
    t = 6
    perturbed = x.clone()
    perturbed[:, t:] = torch.randn(2, 12 - t, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        y, y_perturbed = run(attn, x)[0], run(attn, perturbed)[0]
    torch.testing.assert_close(y_perturbed[:, :t], y[:, :t], atol=1e-6, rtol=0)
    assert (y_perturbed[:, t:] - y[:, t:]).abs().max() > 1e-2


def test_kv_cache_prefill_then_single_steps_then_chunk_equals_full_forward():
    attn = make_attention()
    x = random_input(length=20)
    with torch.no_grad():
        full = run(attn, x)[0]
        first, cache = run(attn, x[:, :5], use_cache=True)  # prefill
        pieces = [first]
        for t in range(5, 9):  # single-token steps
            pieces.append(run(attn, x[:, t : t + 1], cache)[0])
        pieces.append(run(attn, x[:, 9:15], cache)[0])  # multi-token chunk after a cache
        for t in range(15, 20):
            pieces.append(run(attn, x[:, t : t + 1], cache)[0])
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)


def test_kv_cache_grows_past_initial_capacity():
    attn = make_attention()
    x = random_input(batch=1, length=150)
    with torch.no_grad():
        full = run(attn, x)[0]
        first, cache = run(attn, x[:, :60], use_cache=True)
        pieces = [first]
        for t in range(60, 70):  # crosses the initial capacity of 64
            pieces.append(run(attn, x[:, t : t + 1], cache)[0])
        pieces.append(run(attn, x[:, 70:150], cache)[0])  # needs a second growth in one append
    assert cache.length == 150
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)


def test_kv_cache_append_returns_everything_so_far_and_reorders_rows():
    gen = torch.Generator().manual_seed(0)
    cache = KVState()
    keys, values = [], []
    for length in (3, 1, 70, 1, 100):
        k = torch.randn(3, 2, length, 4, generator=gen)
        v = torch.randn(3, 2, length, 4, generator=gen)
        keys.append(k)
        values.append(v)
        all_k, all_v = cache.append(k, v)
        assert torch.equal(all_k, torch.cat(keys, dim=2))
        assert torch.equal(all_v, torch.cat(values, dim=2))
    assert cache.length == 175
    index = torch.tensor([2, 0])
    cache.reorder(index)
    k = torch.randn(2, 2, 1, 4, generator=gen)
    all_k, all_v = cache.append(k, k)
    assert torch.equal(all_k[:, :, :175], torch.cat(keys, dim=2)[index])
    assert torch.equal(all_v[:, :, :175], torch.cat(values, dim=2)[index])
    assert torch.equal(all_k[:, :, 175:], k)


def test_causal_mask_with_offset_values():
    mask = causal_mask_with_offset(2, 5, torch.device("cpu"))
    # Queries are positions 3 and 4 of 5 keys.
    expected = torch.tensor([[True, True, True, True, False], [True, True, True, True, True]])
    assert torch.equal(mask, expected)
    square = causal_mask_with_offset(4, 4, torch.device("cpu"))
    assert torch.equal(square, torch.ones(4, 4, dtype=torch.bool).tril())
    assert causal_mask_with_offset(1, 3, torch.device("cpu")).all()


def test_dropout_is_inactive_in_eval_mode():
    attn = make_attention(attn_dropout=0.5)
    x = random_input()
    with torch.no_grad():
        torch.testing.assert_close(run(attn, x)[0], reference_attention(attn, x), atol=ATOL, rtol=1e-5)
    attn.train()
    with torch.no_grad():
        assert not torch.allclose(run(attn, x)[0], reference_attention(attn, x), atol=1e-3)


@pytest.mark.parametrize(("d_model", "n_heads", "rule"), [(10, 4, "d_model=10"), (12, 4, "n_heads=4: head dim")])
def test_bad_head_counts_raise(d_model, n_heads, rule):
    with pytest.raises(ValueError, match=rule):
        AttentionMixerConfig(n_heads=n_heads).check(d_model)


def test_backward_through_several_cached_calls_matches_full_forward_gradients():
    # Regression: in-place writes into the cache buffer used to break backward after a second cached call.
    attn = make_attention()
    x = random_input(length=9)
    upstream = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(5))

    x_full = x.clone().requires_grad_(True)
    (run(attn, x_full)[0] * upstream).sum().backward()
    grad_full = x_full.grad.clone()
    weight_grad_full = attn.qkv.weight.grad.clone()
    attn.zero_grad()

    x_cached = x.clone().requires_grad_(True)
    first, cache = run(attn, x_cached[:, :4], use_cache=True)
    outputs = [first, run(attn, x_cached[:, 4:5], cache)[0], run(attn, x_cached[:, 5:], cache)[0]]
    (torch.cat(outputs, dim=1) * upstream).sum().backward()
    torch.testing.assert_close(x_cached.grad, grad_full, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(attn.qkv.weight.grad, weight_grad_full, atol=ATOL, rtol=1e-5)


def test_rotary_shift_moves_rotated_vectors_by_whole_positions():
    rotary = RotaryEmbedding(8)
    x = torch.randn(1, 1, 30, 8, generator=torch.Generator().manual_seed(2))
    at_zero, _ = rotary(x, x, 0)
    at_1000, _ = rotary(x, x, 1000)
    torch.testing.assert_close(RotaryEmbedding.shift(at_1000, -1000), at_zero, atol=1e-4, rtol=0)
    torch.testing.assert_close(RotaryEmbedding.shift(at_zero, 1000), at_1000, atol=1e-4, rtol=0)


def test_detach_keeps_a_bounded_window_rebased_to_position_zero():
    """Transformer-XL-style TBPTT: after detach the state holds the last ``memory`` keys (no graph) at
    positions 0 .. memory-1, and a query then scores them exactly as a model that only ever saw those
    tokens would (RoPE is relative)."""
    memory = 6
    attn = make_attention(tbptt_memory=memory)
    x = random_input(length=20)
    with torch.no_grad():
        _, state = run(attn, x[:, :14], use_cache=True)
        state.detach()
        assert (state.length, state.position) == (memory, memory)
        y_next = run(attn, x[:, 14:16], state)[0]
        # The same continuation from a fresh model that saw only the kept tokens 8 .. 13.
        _, fresh = run(attn, x[:, 14 - memory : 14], use_cache=True)
        y_fresh = run(attn, x[:, 14:16], fresh)[0]
    torch.testing.assert_close(y_next, y_fresh, atol=1e-5, rtol=0)
    assert state.length == memory + 2


def test_detach_cuts_the_graph_and_keeps_short_states_whole():
    attn = make_attention(tbptt_memory=64)
    x = random_input(length=10).requires_grad_(True)
    _, state = run(attn, x, use_cache=True)
    assert state.k.requires_grad
    before = state.k[:, :, : state.length].clone()
    state.detach()
    assert not state.k.requires_grad and not state.v.requires_grad
    assert state.length == 10 and torch.equal(state.k[:, :, :10], before)
