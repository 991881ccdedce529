"""Causal tree attention: leaf-local causal attention plus one left sibling per level of a binary tree.

Structure
---------
The sequence (positions 0 .. L-1) is cut into leaves of ``leaf_size`` tokens; leaf ``j`` holds positions
``j*leaf .. (j+1)*leaf - 1``. A node at level ``l`` covers ``2**l`` consecutive leaves; node ``a`` at level
``l`` is a *right child* when ``a`` is odd, and its *left sibling* is node ``a - 1``. A token in leaf ``j``
attends to

* the tokens of its own leaf at positions ``<=`` its own (causal), and
* for every level ``l`` where its ancestor ``a = j >> l`` is a right child (bit ``l`` of ``j`` is set), the
  whole left sibling ``a - 1``, which lies entirely in the past.

These left siblings are the binary decomposition of the prefix ``[0, j*leaf)``, so every past token is
reachable exactly once and no future token ever is. The right child keeps its own content (its leaf
attention and the block's residual), unlike the seed, which replaced it with the cross-attention output.

One softmax over all pieces
---------------------------
All pieces a token sees (its leaf and its left siblings) share one softmax, in the manner of
H-Transformer-1D, instead of being separate attentions whose outputs are summed. This makes the two
modes comparable:

* ``exact``: a left sibling is represented by all of its keys/values. The union of the pieces is the
  whole causal prefix, so the result equals dense causal attention (tested), computed level by level:
  the leaf piece and each tree level are one batched call each (sibling pairs reshaped into the batch
  dimension) and the pieces are merged through their log-sum-exp. Cost O(L^2) like dense attention;
  kept as the faithful form of the seed and as a reference.
* ``summary``: a left sibling of ``s`` tokens is represented by ``n_summary`` tokens, each the mean of
  the keys/values of ``g = s / n_summary`` consecutive tokens, and its logit gets ``+ log g`` so a
  summary token stands for the ``g`` tokens it averages (exact when those keys are equal; summary mode
  with ``n_summary == leaf_size`` is exact at the lowest level). Summaries of every node are built
  bottom-up by pairwise averaging (one batched op per level, O(L) in total); each leaf then gathers the
  ``<= levels * n_summary`` sibling summaries it needs and runs one batched attention call over
  ``leaf + levels * n_summary`` keys per query: O(L log L) time and memory overall.

Padding and numerics
--------------------
A length that is not a multiple of ``leaf_size`` is padded at the end. Pad tokens only ever sit after
every real token, and real tokens only see their past, so no real token attends to a pad (and every
left sibling of a real token is made of real tokens only). Every query, pad or real, sees at least
itself, so there are no fully masked rows: masks use ``-inf`` (safe in fp16/bf16, unlike the seed's
``-1e9``) and no NaN can appear.

Positions are rotary (relative, any length). A summary key is the mean of already-rotated keys, so it
stays a linear combination of relative-position keys.

Cached decoding (:class:`TreeAttentionCache`)
---------------------------------------------
After ``j`` completed leaves the state is a binary counter: for every set bit ``l`` of ``j`` a slot holds
the left sibling the next tokens need at level ``l`` (its summary, or in exact mode its raw keys), plus
the raw keys/values of the current unfinished leaf. Completing a leaf adds a level-0 node and carries
like binary addition (two siblings merge into their parent). A new token attends to
``<= leaf + levels * n_summary`` keys in summary mode, so per-token cost and cache memory grow as
O(log L), not O(L). In exact mode the slots hold raw keys, so per-token cost grows linearly with the
context, as for any exact attention.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import check_choice, config_error
from ..modules.positional import RotaryEmbedding
from ..modules.state import LayerState
from ..ops.tree_attention import (
    attention_with_lse,
    causal_bias,
    leaf_summaries,
    merge_summaries,
    summary_pyramid,
    tree_levels,
)
from .attention import RotaryHeadsConfig
from .base import Mixer, register_mixer

SIBLING_MODES = ("exact", "summary")


@dataclasses.dataclass
class TreeAttentionCache(LayerState):
    """Decoding state of one :class:`TreeAttention` layer (see the module docstring).

    ``leaf_k``, ``leaf_v``: [B, H, r, Dh] rotated keys / values of the unfinished leaf (``r < leaf``).
    ``slots[l]``: None, or (keys, values) [B, H, S_l, Dh] of the completed level-``l`` node that is the
    left sibling of everything until the next level-``l`` node completes; slot ``l`` is filled exactly
    when bit ``l`` of the number of completed leaves is set. ``S_l`` is ``n_summary`` in summary mode
    and ``leaf * 2**l`` raw tokens in exact mode.
    """

    length: int = 0
    leaf_k: torch.Tensor | None = None
    leaf_v: torch.Tensor | None = None
    slots: list[tuple[torch.Tensor, torch.Tensor] | None] = dataclasses.field(default_factory=list)

    def push_node(self, level: int, keys: torch.Tensor, values: torch.Tensor, exact: bool) -> None:
        """Add a completed node at ``level``, carrying like binary addition: while the slot is taken,
        the stored left sibling and the new node merge into their parent one level up."""
        while level < len(self.slots) and self.slots[level] is not None:
            left_k, left_v = self.slots[level]
            self.slots[level] = None
            if exact:
                keys, values = torch.cat((left_k, keys), dim=2), torch.cat((left_v, values), dim=2)
            else:
                keys, values = merge_summaries(left_k, keys), merge_summaries(left_v, values)
            level += 1
        while len(self.slots) <= level:
            self.slots.append(None)
        self.slots[level] = (keys, values)

    def num_cached_keys(self) -> int:
        """Keys a new token would attend to besides itself (for tests of the O(log L) claim)."""
        leaf = 0 if self.leaf_k is None else self.leaf_k.shape[2]
        return leaf + sum(s[0].shape[2] for s in self.slots if s is not None)


@dataclasses.dataclass
class TreeMixerConfig(RotaryHeadsConfig):
    """n_heads: heads (even head width, RoPE). leaf_size: tokens per leaf (causal attention inside it);
    the number of levels follows from the input length. sibling_mode: "summary" (O(L log L)) or "exact"
    (every left-sibling token, O(L^2)). n_summary: summary tokens per left sibling; must divide leaf_size
    (checked in exact mode too, so switching modes cannot make an invalid config)."""

    leaf_size: int = 32
    sibling_mode: str = "summary"
    n_summary: int = 8

    positive_ints = ("leaf_size", "n_summary")

    def check(self, d_model: int) -> None:
        super().check(d_model)
        check_choice("sibling_mode", self.sibling_mode, SIBLING_MODES)
        if self.leaf_size % self.n_summary:
            raise config_error("n_summary", self.n_summary, f"must divide leaf_size={self.leaf_size}")


@register_mixer("tree", config=TreeMixerConfig)
class TreeAttention(Mixer):
    """Multi-head causal tree attention. x: [B, L, D] -> [B, L, D].

    ``sibling_mode`` is "exact" or "summary" (module docstring). An empty state is filled by the batched
    forward (prefill); a non-empty one is extended token by token or chunk by chunk, with rotary
    positions continuing from ``state.length``.
    """

    def __init__(self, d_model: int, cfg: TreeMixerConfig) -> None:
        super().__init__(d_model, cfg)
        self.n_heads = cfg.n_heads
        self.head_dim = d_model // cfg.n_heads
        self.leaf_size = cfg.leaf_size
        self.sibling_mode = cfg.sibling_mode
        self.n_summary = cfg.n_summary
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.rotary = RotaryEmbedding(self.head_dim, cfg.rope_base)

    def tbptt_refusal(self) -> str | None:
        if self.exact:
            return "sibling_mode='exact' keeps every past key, so its state grows without bound; use 'summary'"
        return None

    def state_size(self, seq_len: int) -> int:
        n_leaves, rest = divmod(seq_len, self.leaf_size)
        if self.exact:
            return 2 * seq_len * self.d_model
        return 2 * self.d_model * (rest + self.n_summary * bin(n_leaves).count("1"))

    @property
    def exact(self) -> bool:
        return self.sibling_mode == "exact"

    def summary_log_count(self, level: int) -> float:
        """Logit offset of a level-``level`` summary token: log of the tokens it averages."""
        return math.log((self.leaf_size << level) // self.n_summary)

    # ------------------------------------------------------------------------------------ forward
    def forward(
        self, x: torch.Tensor, state: TreeAttentionCache | None = None, use_cache: bool = False, need_aux: bool = False
    ) -> tuple[torch.Tensor, TreeAttentionCache | None, None]:
        B, L, D = x.shape
        if state is None and use_cache:
            state = TreeAttentionCache()
        qkv = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, Dh]
        q, k = self.rotary(q, k, state.length if state is not None else 0)
        if state is not None and state.length > 0:
            y = self._extend_cache(q, k, v, state)
        else:
            y = self._full(q, k, v)
            if state is not None:
                self._fill_cache(k, v, state)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, D)), state, None

    def _full(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Batched attention for positions 0 .. L-1. q, k, v: [B, H, L, Dh] -> [B, H, L, Dh]."""
        L = q.shape[2]
        n_leaves = -(-L // self.leaf_size)
        pad = n_leaves * self.leaf_size - L
        if pad:  # pads go at the end, after every real token (module docstring)
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        if self.exact:
            y = self._exact_levels(q, k, v, n_leaves)
        else:
            y = self._summary_gathered(q, k, v, n_leaves)
        return y[:, :, :L]

    def _summary_gathered(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_leaves: int) -> torch.Tensor:
        """Summary mode, padded inputs [B, H, n_leaves*leaf, Dh] -> [B, H, n_leaves*leaf, Dh].

        Every leaf gathers the summaries of its left siblings (one per set bit of its index, a zero
        placeholder masked with -inf elsewhere) ahead of its own keys; then a single attention call
        runs over all leaves with the batch and leaf dimensions merged.
        """
        B, H, _, dh = q.shape
        leaf, S = self.leaf_size, self.n_summary
        n_levels = tree_levels(n_leaves)
        q_leaves, k_leaves, v_leaves = (t.view(B, H, n_leaves, leaf, dh) for t in (q, k, v))
        key_pieces: list[torch.Tensor] = []
        value_pieces: list[torch.Tensor] = []
        bias_pieces: list[torch.Tensor] = []
        if n_levels:
            k_pyramid = summary_pyramid(leaf_summaries(k_leaves, S), n_levels)
            v_pyramid = summary_pyramid(leaf_summaries(v_leaves, S), n_levels)
            leaf_index = torch.arange(n_leaves, device=q.device)
            for level in range(n_levels):
                ancestor = leaf_index >> level
                is_right_child = (ancestor & 1).bool()
                # Index 0 is a zero placeholder; left sibling (ancestor - 1) sits at index ancestor.
                gather = torch.where(is_right_child, ancestor, torch.zeros_like(ancestor))
                k_nodes = F.pad(k_pyramid[level], (0, 0, 0, 0, 1, 0))
                v_nodes = F.pad(v_pyramid[level], (0, 0, 0, 0, 1, 0))
                key_pieces.append(k_nodes.index_select(2, gather))  # [B, H, n_leaves, S, Dh]
                value_pieces.append(v_nodes.index_select(2, gather))
                level_bias = torch.full((n_leaves,), float("-inf"), device=q.device)
                level_bias = level_bias.masked_fill(is_right_child, self.summary_log_count(level))
                bias_pieces.append(level_bias.view(n_leaves, 1, 1).expand(n_leaves, leaf, S))
        key_pieces.append(k_leaves)
        value_pieces.append(v_leaves)
        bias_pieces.append(causal_bias(leaf, torch.float32, q.device).expand(n_leaves, leaf, leaf))
        keys = torch.cat(key_pieces, dim=3)  # [B, H, n_leaves, n_levels*S + leaf, Dh]
        values = torch.cat(value_pieces, dim=3)
        bias = torch.cat(bias_pieces, dim=2).to(q.dtype)  # [n_leaves, leaf, n_levels*S + leaf]
        n_keys = keys.shape[3]
        # [B, H, n_leaves, ...] is contiguous, so merging (H, n_leaves) into one batch dim is a view.
        y = F.scaled_dot_product_attention(
            q_leaves.reshape(B, H * n_leaves, leaf, dh),
            keys.reshape(B, H * n_leaves, n_keys, dh),
            values.reshape(B, H * n_leaves, n_keys, dh),
            attn_mask=bias.unsqueeze(0).expand(H, -1, -1, -1).reshape(1, H * n_leaves, leaf, n_keys),
        )
        return y.view(B, H, n_leaves * leaf, dh)

    def _exact_levels(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_leaves: int) -> torch.Tensor:
        """Exact mode, padded inputs [B, H, n_leaves*leaf, Dh] -> [B, H, n_leaves*leaf, Dh].

        One batched call for the leaves and one per level (each right child's queries against its whole
        left sibling, pairs in the batch dimension); the pieces are merged through their log-sum-exp,
        which equals one softmax over their union, i.e. dense causal attention.
        """
        B, H, Lp, dh = q.shape
        leaf = self.leaf_size
        leaf_view = (B, H, n_leaves, leaf, dh)
        out, lse = attention_with_lse(
            q.view(leaf_view), k.view(leaf_view), v.view(leaf_view), causal_bias(leaf, torch.float32, q.device)
        )
        outs, lses = [out.view(B, H, Lp, dh)], [lse.view(B, H, Lp)]
        for level in range(tree_levels(n_leaves)):
            size = leaf << level  # tokens per node at this level
            # Pairs whose right child starts inside the sequence; the last one may stick out (padded).
            n_pairs = -(-(n_leaves - (1 << level)) // (2 << level))
            span = n_pairs * 2 * size
            pairs = [(F.pad(t, (0, 0, 0, span - Lp)) if span > Lp else t[:, :, :span]) for t in (q, k, v)]
            q_pairs, k_pairs, v_pairs = (t.view(B, H, n_pairs, 2, size, dh) for t in pairs)
            right_out, right_lse = self._checkpointed(q_pairs[:, :, :, 1], k_pairs[:, :, :, 0], v_pairs[:, :, :, 0])
            # Left children get nothing at this level: output 0 with log-weight -inf.
            level_out = torch.stack((torch.zeros_like(right_out), right_out), dim=3).view(B, H, span, dh)
            level_lse = torch.stack((torch.full_like(right_lse, float("-inf")), right_lse), dim=3).view(B, H, span)
            if span >= Lp:
                level_out, level_lse = level_out[:, :, :Lp], level_lse[:, :, :Lp]
            else:
                level_out = F.pad(level_out, (0, 0, 0, Lp - span))
                level_lse = F.pad(level_lse, (0, Lp - span), value=float("-inf"))
            outs.append(level_out)
            lses.append(level_lse)
        lse_all = torch.stack(lses)  # [P, B, H, Lp]; the leaf piece keeps every row finite
        weights = torch.softmax(lse_all, dim=0).to(q.dtype)
        return (weights.unsqueeze(-1) * torch.stack(outs)).sum(dim=0)

    @staticmethod
    def _checkpointed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`attention_with_lse` for one exact tree level. Its [s, s] score and probability blocks
        would otherwise all be stored for backward (about L^2 floats per head over the levels, 13 GB at
        8k tokens for the benchmark model); recomputing them in backward keeps only one level's
        blocks alive at a time, for about a third more compute."""
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return checkpoint(attention_with_lse, q, k, v, use_reentrant=False)
        return attention_with_lse(q, k, v)

    # ----------------------------------------------------------------------------------- caching
    def _leaf_summary(self, keys: torch.Tensor) -> torch.Tensor:
        """A completed leaf's representation as a left sibling. keys: [B, H, leaf, Dh]."""
        if self.exact:
            return keys
        return leaf_summaries(keys.unsqueeze(2), self.n_summary).squeeze(2)

    def _fill_cache(self, k: torch.Tensor, v: torch.Tensor, cache: TreeAttentionCache) -> None:
        """State after a prefill of positions 0 .. L-1 (k, v: [B, H, L, Dh], rotated).

        Every stored tensor is a copy, not a view: a view would keep the whole prefill's projections
        alive and make the cache O(L) in memory."""
        B, H, L, dh = k.shape
        leaf = self.leaf_size
        n_complete = L // leaf
        cache.length = L
        cache.leaf_k = k[:, :, n_complete * leaf :].clone()
        cache.leaf_v = v[:, :, n_complete * leaf :].clone()
        cache.slots = [None] * n_complete.bit_length()
        if not n_complete:
            return
        if self.exact:
            for level in range(n_complete.bit_length()):
                if n_complete >> level & 1:
                    node = (n_complete >> level) - 1
                    span = slice(node * (leaf << level), (node + 1) * (leaf << level))
                    cache.slots[level] = (k[:, :, span].clone(), v[:, :, span].clone())
            return
        # Same pyramid arithmetic as the batched forward, so prefill and full forward agree exactly.
        whole = (B, H, n_complete, leaf, dh)
        k_pyramid = summary_pyramid(
            leaf_summaries(k[:, :, : n_complete * leaf].reshape(whole), self.n_summary), n_complete.bit_length()
        )
        v_pyramid = summary_pyramid(
            leaf_summaries(v[:, :, : n_complete * leaf].reshape(whole), self.n_summary), n_complete.bit_length()
        )
        for level in range(n_complete.bit_length()):
            if n_complete >> level & 1:
                node = (n_complete >> level) - 1
                cache.slots[level] = (k_pyramid[level][:, :, node].clone(), v_pyramid[level][:, :, node].clone())

    def _extend_cache(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: TreeAttentionCache
    ) -> torch.Tensor:
        """New tokens after a non-empty cache. q, k, v: [B, H, T, Dh] -> [B, H, T, Dh].

        The chunk is split at leaf boundaries (one piece for single-token steps, ceil(T / leaf) + 1 at
        most for a chunk); each piece attends to the occupied slots and the unfinished leaf in one call,
        and a piece that completes its leaf pushes the leaf into the binary counter of slots.
        """
        T = q.shape[2]
        leaf = self.leaf_size
        outputs = []
        start = 0
        while start < T:
            filled = cache.length % leaf
            stop = start + min(leaf - filled, T - start)
            piece = slice(start, stop)
            outputs.append(self._attend_piece(q[:, :, piece], k[:, :, piece], v[:, :, piece], cache))
            cache.leaf_k = torch.cat((cache.leaf_k, k[:, :, piece]), dim=2)
            cache.leaf_v = torch.cat((cache.leaf_v, v[:, :, piece]), dim=2)
            cache.length += stop - start
            if cache.leaf_k.shape[2] == leaf:
                cache.push_node(0, self._leaf_summary(cache.leaf_k), self._leaf_summary(cache.leaf_v), self.exact)
                cache.leaf_k = k.new_empty(k.shape[0], k.shape[1], 0, k.shape[3])
                cache.leaf_v = v.new_empty(v.shape[0], v.shape[1], 0, v.shape[3])
            start = stop
        return torch.cat(outputs, dim=2)

    def _attend_piece(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: TreeAttentionCache
    ) -> torch.Tensor:
        """Tokens of one leaf, following ``cache.leaf_k`` in that leaf. q, k, v: [B, H, T, Dh].

        Keys, in the order of the batched forward: the occupied slots by level, then the leaf so far,
        then the piece itself under a causal mask.
        """
        T = q.shape[2]
        key_pieces, value_pieces, bias_pieces = [], [], []
        for level, slot in enumerate(cache.slots):
            if slot is None:
                continue
            key_pieces.append(slot[0])
            value_pieces.append(slot[1])
            offset = 0.0 if self.exact else self.summary_log_count(level)
            bias_pieces.append(torch.full((T, slot[0].shape[2]), offset, device=q.device))
        key_pieces += [cache.leaf_k, k]
        value_pieces += [cache.leaf_v, v]
        bias_pieces += [
            torch.zeros(T, cache.leaf_k.shape[2], device=q.device),
            causal_bias(T, torch.float32, q.device),
        ]
        bias = torch.cat(bias_pieces, dim=1).to(q.dtype)
        return F.scaled_dot_product_attention(
            q, torch.cat(key_pieces, dim=2), torch.cat(value_pieces, dim=2), attn_mask=bias
        )
