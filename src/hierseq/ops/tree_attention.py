"""Pure pieces of causal tree attention (``mixers/tree.py``): tree depth, node summaries, and softmax
attention that returns its log-sum-exp so attention over disjoint key sets merges exactly."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["attention_with_lse", "causal_bias", "leaf_summaries", "merge_summaries", "summary_pyramid", "tree_levels"]


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
