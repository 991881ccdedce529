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

Levelwise
---------
``level_mode="levelwise"`` is the seed's tree rather than one joint softmax. After the causal leaf
attention, the representations h^(0) are updated level by level: at level ``l`` every right child's tokens
cross-attend to their left sibling and add the result (a residual), h^(l+1) = h^(l) + cross(h^(l)), and left
children pass unchanged. A token thus reads an earlier leaf through siblings whose tokens were themselves
updated at the levels below. Each level is one batched call (sibling pairs in the batch dimension) with
its own RMS norm and one query / key-value / output projection shared by all levels, so any depth works.

* ``exact``: the left sibling's keys / values are projected from every one of its tokens' h^(l).
* ``summary``: the left sibling is first coarsened, then projected: its ``n_summary`` groups of
  ``g = size / n_summary`` consecutive tokens are averaged in h^(l), normed, and each mean gets a key and a
  value, rotated at the position of the group's last token (a summary stands where its group ends, so
  every summary is strictly in the past of the right child). Pooling before the projection, in the manner
  of Hourglass's shortening, is what makes a level cheap: the key / value projection runs on
  ``n_summary`` tokens per node instead of on every left-sibling token, so a level costs the query and
  output projections of the right children plus O(L / g) more. (Averaging the projected keys instead, the
  joint mode's pooling, needs the projection of every token; the two differ by the norm and the rotation.)

Cached levelwise decoding (:class:`LevelwiseTreeCache`) keeps, per level, the stored left sibling and the
node being filled: its tokens' h^(l) summed per summary group (or, in exact mode, their keys / values).
A new token adds itself to one group per level and cross-attends where its ancestor is a right child, so
its cost and the state grow with the number of levels, O(log L).

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
from typing import ClassVar

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
    group_sums,
    leaf_summaries,
    merge_summaries,
    moment_keys,
    moment_queries,
    summary_pyramid,
    tree_levels,
)
from .attention import RotaryHeadsConfig
from .base import Mixer, register_mixer

SIBLING_MODES = ("exact", "summary")
LEVEL_MODES = ("joint", "levelwise")
SUMMARY_SCORES = ("mean", "moment")


@dataclasses.dataclass
class TreeAttentionCache(LayerState):
    """Decoding state of one :class:`TreeAttention` layer (see the module docstring).

    ``leaf_k``, ``leaf_v``: [B, H, r, Dh] rotated keys / values of the unfinished leaf (``r < leaf``).
    ``slots[l]``: None, or (keys, values[, squared keys]) [B, H, S_l, Dh] of the completed level-``l`` node
    that is the left sibling of everything until the next level-``l`` node completes; slot ``l`` is
    filled exactly when bit ``l`` of the number of completed leaves is set. ``S_l`` is ``n_summary`` in
    summary mode and ``leaf * 2**l`` raw tokens in exact mode; the pooled squared keys are kept only
    for ``summary_scores="moment"``.
    """

    length: int = 0
    leaf_k: torch.Tensor | None = None
    leaf_v: torch.Tensor | None = None
    slots: list[tuple[torch.Tensor, ...] | None] = dataclasses.field(default_factory=list)

    def push_node(self, level: int, node: tuple[torch.Tensor, ...], exact: bool) -> None:
        """Add a completed node (its tensors as in ``slots``) at ``level``, carrying like binary
        addition: while the slot is taken, the stored left sibling and the new node merge into their
        parent one level up."""
        while level < len(self.slots) and self.slots[level] is not None:
            left = self.slots[level]
            self.slots[level] = None
            merge = (lambda a, b: torch.cat((a, b), dim=2)) if exact else merge_summaries
            node = tuple(merge(a, b) for a, b in zip(left, node))
            level += 1
        while len(self.slots) <= level:
            self.slots.append(None)
        self.slots[level] = node

    def num_cached_keys(self) -> int:
        """Keys a new token would attend to besides itself (for tests of the O(log L) claim)."""
        leaf = 0 if self.leaf_k is None else self.leaf_k.shape[2]
        return leaf + sum(s[0].shape[2] for s in self.slots if s is not None)


@dataclasses.dataclass
class LevelwiseTreeCache(LayerState):
    """Decoding state of a levelwise :class:`TreeAttention` layer (see "Levelwise" in the module docstring).

    ``leaf_k``, ``leaf_v``: [B, H, r, Dh] the unfinished leaf, as in :class:`TreeAttentionCache`.
    ``slots[l]``: None, or the (keys, values) of the level-``l`` left sibling, computed from the
    representations h^(l) of its tokens: [B, H, S, Dh] from the group means (summary) or
    [B, H, leaf * 2**l, Dh] per token (exact).
    ``partial[l]``: the level-``l`` node being filled: its tokens' h^(l) summed per summary group
    (a one-tuple of [B, S, D]), or their raw keys / values so far (exact mode). Levels 0 ..
    bit_length(current leaf).
    """

    length: int = 0
    leaf_k: torch.Tensor | None = None
    leaf_v: torch.Tensor | None = None
    slots: list[tuple[torch.Tensor, torch.Tensor] | None] = dataclasses.field(default_factory=list)
    partial: list[tuple[torch.Tensor, ...]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class TreeMixerConfig(RotaryHeadsConfig):
    """n_heads: heads (even head width, RoPE). leaf_size: tokens per leaf (causal attention inside it);
    the number of levels follows from the input length. sibling_mode: "summary" (O(L log L)) or "exact"
    (every left-sibling token, O(L^2)). n_summary: summary tokens per left sibling; must divide leaf_size
    (checked in exact mode too, so switching modes cannot make an invalid config). level_mode: "joint"
    (one softmax over the leaf and every left sibling, H-Transformer-1D style) or "levelwise" (the
    seed's tree: level by level, right siblings cross-attend to their left sibling, with a residual).
    summary_scores: "mean" (a pooled key scores q.mean(k) + log g) or "moment" (plus the keys' variance
    term, which removes Jensen's under-weighting; joint summary mode only)."""

    leaf_size: int = 32
    sibling_mode: str = "summary"
    n_summary: int = 8
    level_mode: str = "joint"
    summary_scores: str = "mean"

    positive_ints = ("leaf_size", "n_summary")
    #: the other modes, each run through the whole conformance suite like a model of its own.
    conformance_variants: ClassVar[tuple[dict[str, str], ...]] = (
        {"sibling_mode": "exact"},
        {"summary_scores": "moment"},
        {"level_mode": "levelwise"},
        {"level_mode": "levelwise", "sibling_mode": "exact"},
    )

    def check(self, d_model: int) -> None:
        super().check(d_model)
        check_choice("sibling_mode", self.sibling_mode, SIBLING_MODES)
        check_choice("level_mode", self.level_mode, LEVEL_MODES)
        check_choice("summary_scores", self.summary_scores, SUMMARY_SCORES)
        if self.leaf_size % self.n_summary:
            raise config_error("n_summary", self.n_summary, f"must divide leaf_size={self.leaf_size}")
        if self.summary_scores == "moment" and (self.sibling_mode, self.level_mode) != ("summary", "joint"):
            raise config_error(
                "summary_scores", self.summary_scores, "'moment' needs sibling_mode='summary' and level_mode='joint'"
            )


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
        self.levelwise = cfg.level_mode == "levelwise"
        self.moment = cfg.summary_scores == "moment"
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        if self.levelwise:  # one cross-attention shared by every level, so any depth works
            self.level_q = nn.Linear(d_model, d_model, bias=False)
            self.level_kv = nn.Linear(d_model, 2 * d_model, bias=False)
            self.level_out = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.rotary = RotaryEmbedding(self.head_dim, cfg.rope_base)

    def tbptt_refusal(self) -> str | None:
        if self.exact:
            return "sibling_mode='exact' keeps every past key, so its state grows without bound; use 'summary'"
        return None

    def state_size(self, seq_len: int) -> int:
        n_leaves, rest = divmod(seq_len, self.leaf_size)
        if self.exact and self.levelwise:  # raw slots (n_leaves * leaf tokens) + every level's node so far
            levels = range(n_leaves.bit_length() + 1)
            filling = sum(seq_len - (n_leaves >> j << j) * self.leaf_size for j in levels)
            return 2 * self.d_model * (rest + n_leaves * self.leaf_size + filling)
        if self.exact:
            return 2 * seq_len * self.d_model
        if self.levelwise:  # filled slots (keys + values), plus one node's group sums per level 0 .. bit_length
            filled, filling = bin(n_leaves).count("1"), n_leaves.bit_length() + 1
            return self.d_model * (2 * rest + self.n_summary * (2 * filled + filling))
        per_token = 3 if self.moment else 2  # pooled squared keys for the moment scores
        return self.d_model * (2 * rest + per_token * self.n_summary * bin(n_leaves).count("1"))

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
            state = LevelwiseTreeCache() if self.levelwise else TreeAttentionCache()
        qkv = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, Dh]
        q, k = self.rotary(q, k, state.length if state is not None else 0)
        if self.levelwise:
            if state is not None and state.length > 0:
                return self.out_proj(self._levelwise_extend(x, q, k, v, state)), state, None
            return self.out_proj(self._levelwise_full(x, q, k, v, state)), state, None
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
            sources = (k_leaves, v_leaves, k_leaves * k_leaves) if self.moment else (k_leaves, v_leaves)
            pyramids = [summary_pyramid(leaf_summaries(t, S), n_levels) for t in sources]
            leaf_index = torch.arange(n_leaves, device=q.device)
            for level in range(n_levels):
                ancestor = leaf_index >> level
                is_right_child = (ancestor & 1).bool()
                # Index 0 is a zero placeholder; left sibling (ancestor - 1) sits at index ancestor.
                gather = torch.where(is_right_child, ancestor, torch.zeros_like(ancestor))
                nodes = [F.pad(p[level], (0, 0, 0, 0, 1, 0)).index_select(2, gather) for p in pyramids]
                key_pieces.append(moment_keys(nodes[0], nodes[2]) if self.moment else nodes[0])  # [B, H, n, S, Dh]
                value_pieces.append(nodes[1])
                level_bias = torch.full((n_leaves,), float("-inf"), device=q.device)
                level_bias = level_bias.masked_fill(is_right_child, self.summary_log_count(level))
                bias_pieces.append(level_bias.view(n_leaves, 1, 1).expand(n_leaves, leaf, S))
        key_pieces.append(moment_keys(k_leaves, None) if self.moment else k_leaves)
        value_pieces.append(v_leaves)
        bias_pieces.append(causal_bias(leaf, torch.float32, q.device).expand(n_leaves, leaf, leaf))
        keys = torch.cat(key_pieces, dim=3)  # [B, H, n_leaves, n_levels*S + leaf, Dh (x2 for moment)]
        values = torch.cat(value_pieces, dim=3)
        bias = torch.cat(bias_pieces, dim=2).to(q.dtype)  # [n_leaves, leaf, n_levels*S + leaf]
        n_keys, dk = keys.shape[3], keys.shape[4]
        if self.moment:
            q_leaves = moment_queries(q_leaves)
        # [B, H, n_leaves, ...] is contiguous, so merging (H, n_leaves) into one batch dim is a view.
        y = F.scaled_dot_product_attention(
            q_leaves.reshape(B, H * n_leaves, leaf, dk),
            keys.reshape(B, H * n_leaves, n_keys, dk),
            values.reshape(B, H * n_leaves, n_keys, dh),
            attn_mask=bias.unsqueeze(0).expand(H, -1, -1, -1).reshape(1, H * n_leaves, leaf, n_keys),
            scale=dh**-0.5,
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
    def _node_slot(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A completed node as a left sibling (the tensors of a cache slot): raw in exact mode, else pooled
        to n_summary tokens as the batched forward pools it. keys, values: [B, H, node size, Dh]."""
        if self.exact:
            return keys, values
        sources = (keys, values, keys * keys) if self.moment else (keys, values)
        return tuple(leaf_summaries(t.unsqueeze(2), self.n_summary).squeeze(2) for t in sources)

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
        k_done, v_done = (t[:, :, : n_complete * leaf].reshape(whole) for t in (k, v))
        sources = (k_done, v_done, k_done * k_done) if self.moment else (k_done, v_done)
        pyramids = [summary_pyramid(leaf_summaries(t, self.n_summary), n_complete.bit_length()) for t in sources]
        for level in range(n_complete.bit_length()):
            if n_complete >> level & 1:
                node = (n_complete >> level) - 1
                cache.slots[level] = tuple(p[level][:, :, node].clone() for p in pyramids)

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
                cache.push_node(0, self._node_slot(cache.leaf_k, cache.leaf_v), self.exact)
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
        T, dh = q.shape[2], q.shape[3]
        key_pieces, value_pieces, bias_pieces = [], [], []
        for level, slot in enumerate(cache.slots):
            if slot is None:
                continue
            key_pieces.append(moment_keys(slot[0], slot[2]) if self.moment else slot[0])
            value_pieces.append(slot[1])
            offset = 0.0 if self.exact else self.summary_log_count(level)
            bias_pieces.append(torch.full((T, slot[0].shape[2]), offset, device=q.device))
        leaf_keys = torch.cat((cache.leaf_k, k), dim=2)
        key_pieces.append(moment_keys(leaf_keys, None) if self.moment else leaf_keys)
        value_pieces += [cache.leaf_v, v]
        bias_pieces += [
            torch.zeros(T, cache.leaf_k.shape[2], device=q.device),
            causal_bias(T, torch.float32, q.device),
        ]
        bias = torch.cat(bias_pieces, dim=1).to(q.dtype)
        return F.scaled_dot_product_attention(
            moment_queries(q) if self.moment else q,
            torch.cat(key_pieces, dim=2),
            torch.cat(value_pieces, dim=2),
            attn_mask=bias,
            scale=dh**-0.5,
        )

    # --------------------------------------------------------------------------------- levelwise
    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, *G, N, H * Dh] -> [B, H, *G, N, Dh]."""
        return t.unflatten(-1, (self.n_heads, self.head_dim)).movedim(-2, 1)

    def _level_kv_of(self, z: torch.Tensor, positions: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (rotated) and values of representations z: [B, *G, N, D] at positions [*G, N] (all
        < ``end``) -> each [B, H, *G, N, Dh]."""
        keys, values = self.level_kv(F.rms_norm(z, z.shape[-1:])).chunk(2, dim=-1)
        return self.rotary.rotate(self._heads(keys), positions, end), self._heads(values)

    def _level_cross(
        self, z: torch.Tensor, positions: torch.Tensor, end: int, keys: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        """The residual update of right-sibling tokens z: [B, *G, N, D] at positions [*G, N] (all < ``end``)
        from their left sibling's keys / values [B, H, *G, S, Dh] (no mask: the left sibling is all past)."""
        q = self.rotary.rotate(self._heads(self.level_q(F.rms_norm(z, z.shape[-1:]))), positions, end)
        y = F.scaled_dot_product_attention(q.flatten(1, -3), keys.flatten(1, -3), values.flatten(1, -3))
        return self.level_out(y.view(q.shape).movedim(1, -2).flatten(-2))

    def _level_groups(self, level: int) -> int:
        """Tokens per summary group of a level-``level`` node."""
        return (self.leaf_size << level) // self.n_summary

    def _group_means(self, tokens: torch.Tensor) -> torch.Tensor:
        """A complete node's tokens [..., size, D] -> the means of its n_summary groups [..., S, D]."""
        return tokens.unflatten(-2, (self.n_summary, -1)).mean(dim=-2)

    def _pooled_kv(
        self, means: torch.Tensor, node_starts: torch.Tensor | int, level: int, end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summary keys / values of level-``level`` nodes from their group means of h^(level): means:
        [B, *G, S, D] of nodes starting at positions ``node_starts`` ([*G] or an int; all groups end before
        ``end``) -> each [B, H, *G, S, Dh], keys rotated at each group's last position."""
        g = self._level_groups(level)
        group_ends = torch.arange(1, self.n_summary + 1, device=means.device) * g - 1
        starts = node_starts.unsqueeze(-1) if isinstance(node_starts, torch.Tensor) else node_starts
        return self._level_kv_of(means, starts + group_ends, end)

    def _levelwise_full(
        self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: LevelwiseTreeCache | None
    ) -> torch.Tensor:
        """Levelwise mode for positions 0 .. L-1: x: [B, L, D]; q, k, v: [B, H, L, Dh] (rotated, for the
        leaf attention) -> the mixer's update z - x: [B, L, D], before ``out_proj``. Fills ``state``."""
        B, L, D = x.shape
        P, H, dh = self.leaf_size, self.n_heads, self.head_dim
        n_leaves = -(-L // P)
        pad = n_leaves * P - L
        if pad:  # pads go at the end, after every real token (module docstring)
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        leaf_view = (B, H * n_leaves, P, dh)
        y = F.scaled_dot_product_attention(
            q.reshape(leaf_view), k.reshape(leaf_view), v.reshape(leaf_view), is_causal=True
        )
        x_padded = F.pad(x, (0, 0, 0, pad))
        z = x_padded + y.view(B, H, n_leaves * P, dh).transpose(1, 2).reshape(B, n_leaves * P, D)
        levels = tree_levels(n_leaves)
        top = (L // P).bit_length()  # the levels a cache tracks after L tokens: 0 .. top
        for level in range(levels):
            if state is not None:
                self._capture_level(state, level, z[:, :L])
            z = self._level_step(z, level, n_leaves)
        if state is not None:
            for level in range(levels, top + 1):  # nodes above the tree so far: every token is final
                self._capture_level(state, level, z[:, :L])
            start = (L // P) * P
            state.length = L
            state.leaf_k, state.leaf_v = k[:, :, start:L].clone(), v[:, :, start:L].clone()
        return (z - x_padded)[:, :L]

    def _level_step(self, z: torch.Tensor, level: int, n_leaves: int) -> torch.Tensor:
        """One level in one batched call: z: [B, Lp, D] = h^(level) -> h^(level + 1). Sibling pairs go
        into the batch dimension; every right child's tokens cross-attend to their left sibling (pooled
        to n_summary tokens, or all of it) and add the result; left children pass unchanged."""
        B, Lp, D = z.shape
        size = self.leaf_size << level
        n_pairs = -(-(n_leaves - (1 << level)) // (2 << level))  # pairs whose right child has begun
        span = n_pairs * 2 * size
        pairs = (F.pad(z, (0, 0, 0, span - Lp)) if span > Lp else z[:, :span]).view(B, n_pairs, 2, size, D)
        positions = torch.arange(span, device=z.device).view(n_pairs, 2, size)
        left, right = pairs[:, :, 0], pairs[:, :, 1]
        if self.exact:
            keys, values = self._level_kv_of(left, positions[:, 0], span)  # [B, H, n_pairs, size, Dh]
        else:  # coarsen, then project: n_summary keys per left sibling (module docstring, "Levelwise")
            keys, values = self._pooled_kv(self._group_means(left), positions[:, 0, 0], level, span)
        right = right + self._level_cross(right, positions[:, 1], span, keys, values)
        merged = torch.stack((left, right), dim=2).view(B, span, D)
        return merged[:, :Lp] if span >= Lp else torch.cat((merged, z[:, span:]), dim=1)

    def _capture_level(self, state: LevelwiseTreeCache, level: int, z: torch.Tensor) -> None:
        """Level ``level`` of the cache after a prefill, from the representations z = h^(level): [B, L, D]
        of the real tokens: the left sibling of the current node (if it is a right child) and the
        current node's tokens so far. Every stored tensor is a copy, so the cache keeps no view of the
        whole prefill alive."""
        L = z.shape[1]
        size = self.leaf_size << level
        node = (L // self.leaf_size) >> level
        start = node * size
        while len(state.slots) <= level:
            state.slots.append(None)
            state.partial.append(())
        state.slots[level] = None
        if node & 1:
            left = z[:, start - size : start]
            if self.exact:
                slot = self._level_kv_of(left, torch.arange(start - size, start, device=z.device), L)
            else:
                slot = self._pooled_kv(self._group_means(left), start - size, level, L)
            state.slots[level] = tuple(t.clone() for t in slot)
        own = z[:, start:]
        if self.exact:
            own_kv = self._level_kv_of(own, torch.arange(start, L, device=z.device), L)
            state.partial[level] = tuple(t.clone() for t in own_kv)
        else:
            state.partial[level] = (group_sums(own, self.n_summary, self._level_groups(level)),)

    def _levelwise_extend(
        self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: LevelwiseTreeCache
    ) -> torch.Tensor:
        """New tokens after a non-empty levelwise cache, split at leaf boundaries. x: [B, T, D];
        q, k, v: [B, H, T, Dh] -> z - x: [B, T, D]."""
        outputs = []
        start, T = 0, x.shape[1]
        while start < T:
            stop = start + min(self.leaf_size - state.length % self.leaf_size, T - start)
            piece = slice(start, stop)
            outputs.append(self._levelwise_piece(x[:, piece], q[:, :, piece], k[:, :, piece], v[:, :, piece], state))
            start = stop
        return torch.cat(outputs, dim=1)

    def _levelwise_piece(
        self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: LevelwiseTreeCache
    ) -> torch.Tensor:
        """Tokens of one leaf: the leaf attention over the leaf so far, then, level by level, each
        token's contribution to the node being filled (from h^(level)) and, where its ancestor is a right
        child, the cross-attention to the stored left sibling."""
        B, T, D = x.shape
        first = state.length
        leaf_index = first // self.leaf_size
        positions = torch.arange(first, first + T, device=x.device)
        leaf_k, leaf_v = torch.cat((state.leaf_k, k), dim=2), torch.cat((state.leaf_v, v), dim=2)
        bias = torch.cat(
            (torch.zeros(T, state.leaf_k.shape[2], device=x.device), causal_bias(T, torch.float32, x.device)), 1
        )
        y = F.scaled_dot_product_attention(q, leaf_k, leaf_v, attn_mask=bias.to(q.dtype))
        z = x + y.transpose(1, 2).reshape(B, T, D)
        for level in range(leaf_index.bit_length() + 1):
            if self.exact:
                keys, values = self._level_kv_of(z, positions, first + T)
                part_k, part_v = state.partial[level]
                state.partial[level] = (torch.cat((part_k, keys), dim=2), torch.cat((part_v, values), dim=2))
            else:  # one group sum per level: the projection waits until the node is complete
                node_start = (leaf_index >> level) * (self.leaf_size << level)
                group = (positions - node_start) // self._level_groups(level)
                state.partial[level] = (state.partial[level][0].index_add(1, group, z),)
            if leaf_index >> level & 1:
                z = z + self._level_cross(z, positions, first + T, *state.slots[level])
        state.leaf_k, state.leaf_v = leaf_k, leaf_v
        state.length = first + T
        if state.length % self.leaf_size == 0:
            self._complete_leaf(state, leaf_index)
            state.leaf_k, state.leaf_v = leaf_k[:, :, :0], leaf_v[:, :, :0]
        return z - x

    def _complete_leaf(self, state: LevelwiseTreeCache, leaf_index: int) -> None:
        """Leaf ``leaf_index`` is complete: every level-j node that ends with it becomes the level-j slot
        (a left child) or is dropped (a right child: nobody reads it), and its partial restarts. When the
        leaf count reaches 2**M, node 0 of level M + 1 starts out holding every token so far."""
        top = leaf_index.bit_length()
        ending = ((leaf_index + 1) & -(leaf_index + 1)).bit_length() - 1  # trailing zeros of leaf_index + 1
        end = (leaf_index + 1) * self.leaf_size
        for level in range(ending + 1):
            done = state.partial[level]
            if level == top:
                state.slots.append(None)
                state.partial.append(self._grown_partial(done))
            if (leaf_index >> level) & 1:
                state.slots[level] = None
            elif self.exact:
                state.slots[level] = done
            else:
                node_start = (leaf_index >> level) * (self.leaf_size << level)
                means = done[0] / self._level_groups(level)
                state.slots[level] = self._pooled_kv(means, node_start, level, end)
            state.partial[level] = tuple(t[:, :, :0] for t in done) if self.exact else (torch.zeros_like(done[0]),)

    def _grown_partial(self, done: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The partial of node 0 one level up from a complete node 0's partial: the same tokens with the
        same representations (a left child passes its level unchanged); summary groups twice as long,
        so adjacent group sums add up."""
        if self.exact:
            return done
        (sums,) = done  # [B, S, D]
        S = self.n_summary
        pairs = F.pad(sums, (0, 0, 0, S % 2)).unflatten(1, (-1, 2)).sum(dim=2)
        return (F.pad(pairs, (0, 0, 0, S - pairs.shape[1])),)
