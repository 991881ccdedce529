"""CausalSelfAttention, KVCache and causal_mask_with_offset."""

from __future__ import annotations

import math

import pytest
import torch

from hierseq.mixers.attention import CausalSelfAttention, KVCache, causal_mask_with_offset

ATOL = 1e-5


def make_attention(d_model=16, n_heads=4, rotary=True, seed=0):
    torch.manual_seed(seed)
    return CausalSelfAttention(d_model, n_heads, rotary=rotary).eval()


def random_input(batch=2, length=10, d_model=16, seed=1):
    return torch.randn(batch, length, d_model, generator=torch.Generator().manual_seed(seed))


def reference_attention(attn: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(Dh) + causal mask) V, written out by hand. x: [B, L, D] -> [B, L, D]."""
    batch, length, d_model = x.shape
    heads, head_dim = attn.n_heads, attn.head_dim
    q, k, v = (x @ attn.qkv.weight.T).split(d_model, dim=-1)

    def split_heads(t):  # [B, L, D] -> [B, H, L, Dh]
        return t.reshape(batch, length, heads, head_dim).transpose(1, 2)

    q, k, v = split_heads(q), split_heads(k), split_heads(v)
    if attn.rotary is not None:
        q, k = attn.rotary(q, k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    future = torch.ones(length, length, dtype=torch.bool).triu(diagonal=1)
    weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    y = (weights @ v).transpose(1, 2).reshape(batch, length, d_model)
    return y @ attn.out.weight.T


@pytest.mark.parametrize("rotary", [True, False])
def test_matches_hand_written_masked_softmax(rotary):
    attn = make_attention(rotary=rotary)
    x = random_input()
    with torch.no_grad():
        y = attn(x)
        assert y.shape == x.shape
        torch.testing.assert_close(y, reference_attention(attn, x), atol=ATOL, rtol=1e-5)


def test_causal_perturbing_later_tokens_leaves_earlier_outputs_unchanged():
    attn = make_attention()
    x = random_input(length=12)
    t = 6
    perturbed = x.clone()
    perturbed[:, t:] = torch.randn(2, 12 - t, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        y, y_perturbed = attn(x), attn(perturbed)
    torch.testing.assert_close(y_perturbed[:, :t], y[:, :t], atol=1e-6, rtol=0)
    assert (y_perturbed[:, t:] - y[:, t:]).abs().max() > 1e-2


def test_kv_cache_prefill_then_single_steps_then_chunk_equals_full_forward():
    attn = make_attention()
    x = random_input(length=20)
    with torch.no_grad():
        full = attn(x)
        cache = KVCache()
        pieces = [attn(x[:, :5], cache=cache)]  # prefill
        for t in range(5, 9):  # single-token steps
            pieces.append(attn(x[:, t : t + 1], cache=cache))
        pieces.append(attn(x[:, 9:15], cache=cache))  # multi-token chunk after a cache
        for t in range(15, 20):
            pieces.append(attn(x[:, t : t + 1], cache=cache))
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)


def test_kv_cache_grows_past_initial_capacity():
    attn = make_attention()
    x = random_input(batch=1, length=150)
    with torch.no_grad():
        full = attn(x)
        cache = KVCache()
        pieces = [attn(x[:, :60], cache=cache)]
        for t in range(60, 70):  # crosses the initial capacity of 64
            pieces.append(attn(x[:, t : t + 1], cache=cache))
        pieces.append(attn(x[:, 70:150], cache=cache))  # needs a second growth in one append
    assert cache.length == 150
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)


def test_kv_cache_append_returns_everything_so_far_and_reorders_rows():
    gen = torch.Generator().manual_seed(0)
    cache = KVCache()
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
    torch.manual_seed(0)
    attn = CausalSelfAttention(16, 4, dropout=0.5).eval()
    x = random_input()
    with torch.no_grad():
        torch.testing.assert_close(attn(x), reference_attention(attn, x), atol=ATOL, rtol=1e-5)


def test_d_model_not_divisible_by_n_heads_raises():
    with pytest.raises(ValueError, match="d_model=10"):
        CausalSelfAttention(10, 4)


def test_backward_through_several_cached_calls_matches_full_forward_gradients():
    # Regression: in-place writes into the cache buffer used to break backward after a second cached call.
    attn = make_attention()
    x = random_input(length=9)
    upstream = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(5))

    x_full = x.clone().requires_grad_(True)
    (attn(x_full) * upstream).sum().backward()
    grad_full = x_full.grad.clone()
    weight_grad_full = attn.qkv.weight.grad.clone()
    attn.zero_grad()

    x_cached = x.clone().requires_grad_(True)
    cache = KVCache()
    outputs = [attn(x_cached[:, :4], cache=cache), attn(x_cached[:, 4:5], cache=cache), attn(x_cached[:, 5:], cache)]
    (torch.cat(outputs, dim=1) * upstream).sum().backward()
    torch.testing.assert_close(x_cached.grad, grad_full, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(attn.qkv.weight.grad, weight_grad_full, atol=ATOL, rtol=1e-5)
