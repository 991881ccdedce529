"""Pure pieces of tree attention: tree depth, node summaries (against direct pooling, values and
gradients), and attention_with_lse against plain softmax attention (values, log-sum-exp and gradients,
masked and merged over disjoint key sets)."""

from __future__ import annotations

import pytest
import torch

from hierseq.ops.tree_attention import (
    attention_with_lse,
    causal_bias,
    leaf_summaries,
    merge_summaries,
    summary_pyramid,
    tree_levels,
)


@pytest.mark.parametrize("n_leaves, levels", [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (512, 9), (513, 10)])
def test_tree_levels(n_leaves: int, levels: int) -> None:
    assert tree_levels(n_leaves) == levels


def test_tree_levels_is_the_bit_length_of_the_largest_leaf_index() -> None:
    for n in range(1, 300):
        # every leaf index j < n has at most tree_levels(n) bits, and some index needs all of them
        assert max(j.bit_length() for j in range(n)) == tree_levels(n)


def test_summary_pyramid_matches_direct_pooling() -> None:
    torch.manual_seed(0)
    keys = torch.randn(2, 3, 7, 8, 4)  # [B, H, n_leaves, leaf, Dh]
    pyramid = summary_pyramid(leaf_summaries(keys, 2), tree_levels(7))
    assert [p.shape[2] for p in pyramid] == [7, 4, 2]
    flat = keys.flatten(2, 3)  # [B, H, 56, Dh]
    # level 2, node 0 covers leaves 0-3 (32 tokens): two segments of 16 tokens each.
    direct = flat[:, :, :32].unflatten(2, (2, 16)).mean(dim=3)
    assert torch.allclose(pyramid[2][:, :, 0], direct, atol=1e-6)
    # merging two summaries = pooling their union
    assert torch.allclose(merge_summaries(pyramid[0][:, :, 4], pyramid[0][:, :, 5]), pyramid[1][:, :, 2], atol=0)


def test_every_complete_pyramid_node_is_direct_pooling_in_values_and_gradients() -> None:
    """Every node at level l whose 2**l leaves all exist equals the mean pooling of its tokens into
    n_summary segments, computed directly; the same holds for the gradients (upstream random)."""
    gen = torch.Generator().manual_seed(1)
    n_leaves, leaf, S = 11, 8, 4
    keys = torch.randn(2, 3, n_leaves, leaf, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    pyramid = summary_pyramid(leaf_summaries(keys, S), tree_levels(n_leaves))
    assert len(pyramid) == tree_levels(n_leaves) == 4
    flat = keys.flatten(2, 3)
    got, expected = [], []
    for level, nodes in enumerate(pyramid):
        size = leaf << level
        assert nodes.shape == (2, 3, -(-n_leaves // (1 << level)), S, 5)
        for node in range(n_leaves >> level):  # complete nodes only (a padded node is never read)
            got.append(nodes[:, :, node])
            expected.append(flat[:, :, node * size : (node + 1) * size].unflatten(2, (S, size // S)).mean(dim=3))
    got_t, expected_t = torch.stack(got), torch.stack(expected)
    torch.testing.assert_close(got_t, expected_t, atol=1e-12, rtol=0)
    upstream = torch.randn(got_t.shape, generator=gen, dtype=torch.float64)
    (g,) = torch.autograd.grad(got_t, keys, upstream)
    (g_ref,) = torch.autograd.grad(expected_t, keys, upstream)
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=0)


def test_causal_bias_values() -> None:
    bias = causal_bias(4, torch.float32, torch.device("cpu"))
    expected = torch.zeros(4, 4).masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), float("-inf"))
    assert torch.equal(bias, expected)
    assert causal_bias(3, torch.float16, torch.device("cpu")).dtype == torch.float16
    assert torch.equal(causal_bias(1, torch.float32, torch.device("cpu")), torch.zeros(1, 1))


def reference_attention(q, k, v, bias=None):
    """softmax(q k^T / sqrt(Dh) + bias) v and the log-sum-exp of the logits, written out directly."""
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if bias is not None:
        logits = logits + bias
    return logits.softmax(-1) @ v, logits.logsumexp(-1)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_with_lse_matches_softmax_attention_in_values_and_gradients(masked: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 3, 9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, 9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = causal_bias(9, torch.float64, torch.device("cpu")) if masked else None
    out, lse = attention_with_lse(q, k, v, bias)
    out_ref, lse_ref = reference_attention(q, k, v, bias)
    torch.testing.assert_close(out, out_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(lse.double(), lse_ref, atol=1e-5, rtol=0)
    g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    g_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((out * g_out).sum() + (lse.double() * g_lse).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((out_ref * g_out).sum() + (lse_ref * g_lse).sum(), (q, k, v))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=0)


def test_attention_over_disjoint_key_sets_merges_exactly_through_the_lse() -> None:
    """Attention over keys A and over keys B, weighted by softmax of their log-sum-exps, is attention over
    A u B: the identity the exact tree levels rely on."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 6, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, 20, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 2, 20, 8, generator=gen, dtype=torch.float64)
    out_a, lse_a = attention_with_lse(q, k[:, :, :13], v[:, :, :13])
    out_b, lse_b = attention_with_lse(q, k[:, :, 13:], v[:, :, 13:])
    weights = torch.softmax(torch.stack((lse_a, lse_b)), dim=0).double().unsqueeze(-1)
    merged = weights[0] * out_a + weights[1] * out_b
    out_ref, lse_ref = reference_attention(q, k, v)
    torch.testing.assert_close(merged, out_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.logaddexp(lse_a, lse_b), lse_ref.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_with_lse_in_half_precision_is_finite_and_close(dtype: torch.dtype) -> None:
    """Softmax statistics in fp32: a -inf causal mask gives no NaN in fp16/bf16, the log-sum-exp comes back
    in fp32, and the result stays close to the fp64 reference."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 8, 16, generator=gen) for _ in range(3))
    bias = causal_bias(8, torch.float32, torch.device("cpu"))
    out, lse = attention_with_lse(q.to(dtype), k.to(dtype), v.to(dtype), bias)
    out_ref, lse_ref = reference_attention(q.double(), k.double(), v.double(), bias.double())
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    assert (out.double() - out_ref).abs().max() < tol
    assert (lse.double() - lse_ref).abs().max() < tol * 4
