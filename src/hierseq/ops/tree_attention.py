"""Pure pieces of causal tree attention (``mixers/tree.py``): tree depth, node summaries, and softmax
attention that returns its log-sum-exp so attention over disjoint key sets merges exactly."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "attention_with_lse",
    "causal_bias",
    "group_sums",
    "leaf_summaries",
    "merge_summaries",
    "moment_keys",
    "moment_queries",
    "summary_pyramid",
    "tree_levels",
]


def tree_levels(n_leaves: int) -> int:
    """Number of sibling levels a sequence of ``n_leaves`` leaves needs: the bits of the largest leaf
    index (0 for a single leaf, ceil(log2(n_leaves)) in general)."""
    return max(n_leaves - 1, 0).bit_length()


def leaf_summaries(keys: torch.Tensor, n_summary: int) -> torch.Tensor:
    """Mean-pool each leaf into ``n_summary`` segments.

    keys: [B, H, n_leaves, leaf, Dh] -> [B, H, n_leaves, n_summary, Dh]. ``leaf`` must be divisible by
    ``n_summary``.
    """
    B, H, n, leaf, dh = keys.shape
    return keys.view(B, H, n, n_summary, leaf // n_summary, dh).mean(dim=4)


def merge_summaries(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Summary of a parent node from its two children's summaries: the children's segments laid side
    by side ([..., 2 S, Dh]) and averaged in adjacent pairs, giving S segments twice as long.

    left, right: [..., S, Dh] -> [..., S, Dh]. Used by both the full forward and the cache, so both
    compute bit-for-bit the same arithmetic.
    """
    both = torch.cat((left, right), dim=-2)
    return both.unflatten(-2, (left.shape[-2], 2)).mean(dim=-2)


def summary_pyramid(leaf_level: torch.Tensor, n_levels: int) -> list[torch.Tensor]:
    """Summaries of every node at levels 0 .. n_levels-1.

    leaf_level: [B, H, n_leaves, S, Dh] (level 0, one entry per leaf). Returns a list whose entry ``l``
    is [B, H, n_l, S, Dh] with ``n_l = ceil(n_leaves / 2**l)``. An odd node count is padded with a zero
    node before pairing; that padded parent is never anybody's left sibling, so it is never read.
    """
    levels = [leaf_level]
    for _ in range(1, n_levels):
        below = levels[-1]
        if below.shape[2] % 2:
            below = F.pad(below, (0, 0, 0, 0, 0, 1))
        levels.append(merge_summaries(below[:, :, 0::2], below[:, :, 1::2]))
    return levels


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the log-sum-exp of each query's logits, so that attention
    over disjoint key sets can be merged exactly afterwards.

    q: [..., Tq, Dh]; k, v: [..., Tk, Dh]; bias: additive, broadcastable to [..., Tq, Tk] (``-inf`` =
    masked; every row must keep at least one key). Returns (out [..., Tq, Dh], lse [..., Tq] fp32).
    Scores and statistics are kept in fp32 so fp16/bf16 inputs do not overflow.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * (q.shape[-1] ** -0.5)
    if bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1)).to(v.dtype)
    return torch.matmul(probs, v), lse


def causal_bias(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[size, size] additive mask: 0 where key <= query, -inf above the diagonal."""
    upper = torch.ones(size, size, dtype=torch.bool, device=device).triu(1)
    return torch.zeros(size, size, dtype=dtype, device=device).masked_fill(upper, float("-inf"))


def group_sums(x: torch.Tensor, n_groups: int, group_size: int) -> torch.Tensor:
    """Sums of consecutive groups of ``group_size`` rows, the first ``n_groups`` groups (rows past the
    end count as zeros). x: [..., N, Dh] with N <= n_groups * group_size -> [..., n_groups, Dh]. The
    running form of :func:`leaf_summaries` for a node that is still being filled."""
    n = x.shape[-2]
    if n > n_groups * group_size:
        raise ValueError(f"x: {n} rows: more than n_groups * group_size = {n_groups * group_size}")
    padded = F.pad(x, (0, 0, 0, n_groups * group_size - n))
    return padded.unflatten(-2, (n_groups, group_size)).sum(dim=-2)


# The "moment" summary score. A summary token standing for g keys k_1..k_g should carry their softmax
# mass sum_i exp(q.k_i / sqrt(d)). Scoring it q.mean(k) / sqrt(d) + log g is, by Jensen, a lower bound
# of that mass, so pooled blocks are under-weighted against exact keys. Expanding log-mean-exp to second
# order (exact for Gaussian keys) adds 1/2 sum_d q_d^2 var_d / d, with var_d the per-dimension variance
# of the pooled keys. Both terms are dot products, so they fit in one attention call as [q, c q^2] .
# [mean, var] with the scale 1/sqrt(d) and c = 1 / (2 sqrt(d)); exact keys get var = 0.


def moment_queries(q: torch.Tensor) -> torch.Tensor:
    """q: [..., Dh] -> [..., 2 Dh] for attention with ``scale = Dh ** -0.5`` against :func:`moment_keys`."""
    return torch.cat((q, q * q * (0.5 * q.shape[-1] ** -0.5)), dim=-1)


def moment_keys(mean: torch.Tensor, mean_sq: torch.Tensor | None) -> torch.Tensor:
    """mean, mean_sq: [..., Dh] (pooled keys and pooled squared keys; None: exact keys, variance 0)
    -> [..., 2 Dh]."""
    var = torch.zeros_like(mean) if mean_sq is None else (mean_sq - mean * mean).clamp_min(0)
    return torch.cat((mean, var), dim=-1)
