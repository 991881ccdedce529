"""Log-linear attention (Guo et al., "Log-Linear Attention", ICLR 2026): linear attention whose prefix is
cut Fenwick-tree style into O(log L) buckets, each bucket weighted by its own data-dependent level weight.

Definition (0-indexed positions; per batch row and head)::

    level(t, s) = bit_length(t XOR s)          # 0 for s == t; the bucket of 2**(l-1) tokens for l >= 1
    o_t = sum_{s <= t} lam_t[min(level(t, s), n_levels - 1)] * decay(s, t) * (q_t . k_s) * v_s
    decay(s, t) = prod_{r = s+1 .. t} alpha_r = exp(sum_{r = s+1 .. t} log_decay_r)   (1 without gating)

Level ``l >= 1`` of query ``t`` is the left sibling, at tree level ``l - 1``, of t's ancestor: the tokens
that agree with t on every bit above bit ``l - 1`` and have a 0 where t has a 1. These buckets partition
the prefix; levels from ``n_levels - 1`` on share the last weight, so any length works. There is no
normaliser: the mixer normalises each head's output (RMS) instead.

Shapes everywhere: q, k [B, H, L, dk]; v [B, H, L, dv]; level_weights [B, H, L, n_levels];
log_decay [B, H, L] (every entry <= 0) or None.

* :func:`loglinear_attention_reference` builds the [L, L] level index and mask: the definition, the
  oracle of the tests, O(L^2).
* :func:`loglinear_attention_chunked` is the training path, O(L log L): a masked [C, C] block inside each
  chunk of C tokens (C a power of two, so levels inside a chunk are the XOR of the offsets), then the
  chunk tree: chunk states merged pairwise into a pyramid of node states; at chunk-tree level j the right
  child of every pair reads its left sibling's state at level ``log2(C) + 1 + j``, all pairs in one
  batched matmul. Every decay exponent is a sum of ``log_decay`` over a span (<= 0), taken from local
  cumulative sums (inside a chunk, inside a node), never the exp of a cumulative sum over the sequence.
* The decoding state after p tokens is ``slots`` [B, H, bit_length(p), dk, dv]: slot m holds the state
  (sum of k_s v_s^T, decayed to the last token seen) of the level-m node that the next query reads at
  level m + 1, zero where bit m of p is 0. Adding a node carries like binary addition (two siblings
  merge into their parent). :func:`loglinear_state` fills it from a sequence and :func:`loglinear_continue`
  advances it by T tokens: one token in O(log L) (the decoding step), more through aligned blocks of the
  chunked path; all equal to the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "fenwick_levels",
    "loglinear_attention_chunked",
    "loglinear_attention_reference",
    "loglinear_continue",
    "loglinear_state",
]


def fenwick_levels(query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
    """level(t, s) = bit_length(t XOR s) for every pair. query_pos: [Tq], key_pos: [Tk] (int64, >= 0)
    -> [Tq, Tk] int64 (0 on the diagonal; meaningful for s <= t)."""
    xor = torch.bitwise_xor(query_pos[:, None], key_pos[None, :])
    # frexp writes x = m * 2**e with m in [0.5, 1): e is the bit length for x > 0 and 0 for x == 0
    # (exact in float64 for every position below 2**53).
    return torch.frexp(xor.to(torch.float64)).exponent.to(torch.long)


def _check_shapes(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, level_weights: torch.Tensor, log_decay: torch.Tensor | None
) -> None:
    assert q.dim() == 4 and k.shape == q.shape, f"q {tuple(q.shape)}, k {tuple(k.shape)}: need [B, H, L, dk] both"
    assert v.dim() == 4 and v.shape[:3] == q.shape[:3], f"v {tuple(v.shape)}: need [B, H, L, dv]"
    assert level_weights.dim() == 4 and level_weights.shape[:3] == q.shape[:3], (
        f"level_weights {tuple(level_weights.shape)}: need [B, H, L, n_levels]"
    )
    assert log_decay is None or log_decay.shape == q.shape[:3], f"log_decay {tuple(log_decay.shape)}: need [B, H, L]"


def loglinear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    level_weights: torch.Tensor,
    log_decay: torch.Tensor | None = None,
) -> torch.Tensor:
    """The definition as one masked [L, L] matrix (module docstring for shapes) -> out [B, H, L, dv]."""
    _check_shapes(q, k, v, level_weights, log_decay)
    batch, heads, length, _ = q.shape
    pos = torch.arange(length, device=q.device)
    level = fenwick_levels(pos, pos).clamp_max(level_weights.shape[-1] - 1)  # [L, L]
    causal = pos[:, None] >= pos[None, :]
    # weight[b, h, t, s] = level_weights[b, h, t, level[t, s]]
    weight = torch.gather(level_weights, -1, level.expand(batch, heads, length, length))
    if log_decay is None:
        decay = causal.to(q.dtype)
    else:
        total = log_decay.cumsum(-1)  # the plain form: fine for an oracle at test lengths
        decay = torch.exp((total[..., :, None] - total[..., None, :]).masked_fill(~causal, float("-inf")))
    scores = (q @ k.transpose(-1, -2)) * weight * decay
    return scores @ v


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def loglinear_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    level_weights: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> torch.Tensor:
    """:func:`loglinear_attention_reference` in O(L log L) (same arguments and result); ``chunk_size``
    must be a power of two (a shorter input uses the smallest power of two that holds it)."""
    _check_shapes(q, k, v, level_weights, log_decay)
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size={chunk_size}: must be a power of two")
    batch, heads, length, _ = q.shape
    n_levels = level_weights.shape[-1]
    chunk = min(chunk_size, _pow2_at_least(length))
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    if log_decay is None:  # exp(0) == 1 exactly, so one code path serves both
        log_decay = q.new_zeros(q.shape[:3])
    if pad:  # pads sit after every real token: zero keys and values write nothing a real token reads
        q, k, v, level_weights = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v, level_weights))
        log_decay = F.pad(log_decay, (0, pad))
    qc, kc, vc = (t.unflatten(2, (n_chunks, chunk)) for t in (q, k, v))  # [B, H, n, C, d]
    weights_c = level_weights.unflatten(2, (n_chunks, chunk))  # [B, H, n, C, n_levels]
    # log decay from the end of the previous chunk to each token, inclusive: <= 0 and non-increasing
    into_chunk = log_decay.unflatten(2, (n_chunks, chunk)).cumsum(-1)  # [B, H, n, C]

    # Inside a chunk: the masked block; chunks start at multiples of C, so levels are XORs of offsets.
    offsets = torch.arange(chunk, device=q.device)
    level = fenwick_levels(offsets, offsets).clamp_max(n_levels - 1)
    causal = offsets[:, None] >= offsets[None, :]
    weight = torch.gather(weights_c, -1, level.expand(batch, heads, n_chunks, chunk, chunk))
    span = (into_chunk[..., :, None] - into_chunk[..., None, :]).masked_fill(~causal, float("-inf"))
    out = ((qc @ kc.transpose(-1, -2)) * weight * torch.exp(span)) @ vc  # [B, H, n, C, dv]
    out = out.flatten(2, 3)  # [B, H, n C, dv]
    if n_chunks == 1:
        return out[:, :, :length]

    # Between chunks: node states (sum of k v^T decayed to the node's last token) and each node's total
    # log decay, starting from the chunks; ``since_start`` is the log decay from the start of a token's
    # node at the current level (= from the end of its left neighbour) to the token, inclusive.
    chunk_decay = into_chunk[..., -1]  # [B, H, n]
    states = (kc * torch.exp(chunk_decay[..., None] - into_chunk)[..., None]).transpose(-1, -2) @ vc
    node_decay = chunk_decay
    since_start = into_chunk.flatten(2)  # [B, H, n C]
    qf, weights_f = qc.flatten(2, 3), weights_c.flatten(2, 3)
    node_size, j = chunk, 0
    while states.shape[2] > 1:
        # the last node may be short of tokens: pad it (pads are zeros after every real token; the work
        # on them is at most one node per level, O(L) over all levels)
        grow = states.shape[2] * node_size - qf.shape[2]
        if grow > 0:
            qf, weights_f, out = (F.pad(t, (0, 0, 0, grow)) for t in (qf, weights_f, out))
            since_start = F.pad(since_start, (0, grow))
        n_pairs = states.shape[2] // 2
        paired = 2 * n_pairs * node_size  # an odd last node has no right sibling: nobody reads it here
        lvl = min(chunk.bit_length() + j, n_levels - 1)  # log2(C) + 1 + j
        shape = (n_pairs, 2, node_size)  # [.., pairs, left/right child, tokens of a child]
        q_right = qf[:, :, :paired].unflatten(2, shape)[:, :, :, 1]  # [B, H, P, N, dk]
        reach = since_start[:, :, :paired].unflatten(2, shape)[:, :, :, 1]  # [B, H, P, N]
        lam = weights_f[:, :, :paired, lvl].unflatten(2, shape)[:, :, :, 1]
        left = states[:, :, 0 : 2 * n_pairs : 2]  # [B, H, P, dk, dv]
        read = (q_right @ left) * (lam * torch.exp(reach))[..., None]  # [B, H, P, N, dv]
        read = torch.stack((torch.zeros_like(read), read), dim=3).flatten(2, 4)
        out = out + F.pad(read, (0, 0, 0, out.shape[2] - paired))

        left_decay = node_decay[:, :, 0 : 2 * n_pairs : 2]  # [B, H, P]
        head = since_start[:, :, :paired].unflatten(2, shape)
        head = torch.stack((head[:, :, :, 0], head[:, :, :, 1] + left_decay[..., None]), dim=3).flatten(2, 4)
        since_start = torch.cat((head, since_start[:, :, paired:]), dim=2)
        if states.shape[2] % 2:  # an empty right sibling: no tokens, no decay
            states = F.pad(states, (0, 0, 0, 0, 0, 1))
            node_decay = F.pad(node_decay, (0, 1))
        right_decay = node_decay[:, :, 1::2]
        states = states[:, :, 0::2] * torch.exp(right_decay)[..., None, None] + states[:, :, 1::2]
        node_decay = node_decay[:, :, 0::2] + right_decay
        node_size, j = 2 * node_size, j + 1
    return out[:, :, :length]


def loglinear_state(k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None = None) -> torch.Tensor:
    """The decoding state after the L tokens of k [B, H, L, dk], v [B, H, L, dv], log_decay [B, H, L] or
    None: slots [B, H, bit_length(L), dk, dv] (module docstring), slot m decayed to token L - 1."""
    assert k.dim() == 4 and v.dim() == 4 and k.shape[:3] == v.shape[:3], "k, v: need [B, H, L, d]"
    batch, heads, length, key_dim = k.shape
    slots = k.new_zeros(batch, heads, length.bit_length(), key_dim, v.shape[-1])
    if log_decay is not None:
        # log decay from each token to the last one, exclusive of the token: a cumulative sum from the
        # end, so the terms near the end (the ones that matter) are short sums and every one is <= 0.
        suffix = log_decay.flip(-1).cumsum(-1).flip(-1)
        to_last = torch.exp(F.pad(suffix[..., 1:], (0, 1)))  # [B, H, L]
    pieces = []
    for m in range(length.bit_length()):  # one contiguous span of tokens per set bit of L
        if not (length >> m) & 1:
            pieces.append(slots[:, :, m])
            continue
        start = (length >> (m + 1)) << (m + 1)
        k_span = k[:, :, start : start + (1 << m)]
        if log_decay is not None:
            k_span = k_span * to_last[:, :, start : start + (1 << m), None]
        pieces.append(k_span.transpose(-1, -2) @ v[:, :, start : start + (1 << m)])
    return torch.stack(pieces, dim=2) if pieces else slots


def _push(slots: torch.Tensor, node: torch.Tensor, level: int, position: int) -> torch.Tensor:
    """Add a node of 2**level tokens that starts at ``position`` (a multiple of 2**level) to ``slots``
    [B, H, bit_length(position), dk, dv] (both decayed to the node's last token); carries like binary
    addition. node: [B, H, dk, dv]. Returns slots [B, H, bit_length(position + 2**level), dk, dv]."""
    assert position % (1 << level) == 0, f"a level-{level} node cannot start at {position}"
    carry = 0
    while (position >> (level + carry)) & 1:  # occupied slots merge with the node into their parent
        carry += 1
    top = level + carry
    n_slots = (position + (1 << level)).bit_length()
    slots = F.pad(slots, (0, 0, 0, 0, 0, n_slots - slots.shape[2]))
    merged = node + slots[:, :, level:top].sum(2)
    cleared = torch.zeros_like(slots[:, :, level:top])
    return torch.cat((slots[:, :, :level], cleared, merged[:, :, None], slots[:, :, top + 1 :]), dim=2)


def _read_slots(q: torch.Tensor, level_weights: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Queries that read slot m at level m + 1 (every token of an aligned block after the slots).
    q: [B, H, T, dk]; level_weights: [B, H, T, n_levels]; slots: [B, H, S, dk, dv] -> [B, H, T, dv]."""
    n_slots = slots.shape[2]
    levels = torch.arange(1, n_slots + 1, device=q.device).clamp_max(level_weights.shape[-1] - 1)
    lam = level_weights[..., levels]  # [B, H, T, S]
    # one matmul over (slot, key) pairs: sum_m lam_m q^T S_m = [lam_m q]_m . [S_m]_m
    return (lam[..., None] * q[..., None, :]).flatten(-2) @ slots.flatten(2, 3)


def _initial_slots(q: torch.Tensor, v: torch.Tensor, slots: torch.Tensor | None, position: int) -> torch.Tensor:
    """``slots``, or the empty state [B, H, 0, dk, dv] at position 0 (q: [B, H, ..., dk], v: [B, H, ..., dv])."""
    if slots is not None:
        return slots
    assert position == 0, f"position={position} with no state"
    return q.new_zeros(*q.shape[:2], 0, q.shape[-1], v.shape[-1])


def _one_token(q, k, v, level_weights, log_decay, slots, position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`loglinear_continue` for one token (same arguments, T = 1) in O(log L), without the chunked
    path's set-up: the decoding step."""
    if log_decay is not None:  # the past moves one step further away
        slots = slots * torch.exp(log_decay[:, :, 0])[..., None, None, None]
    own = level_weights[..., :1] * (q * k).sum(-1, keepdim=True) * v  # level 0: the token itself
    node = k[:, :, 0, :, None] * v[:, :, 0, None, :]
    return own + _read_slots(q, level_weights, slots), _push(slots, node, 0, position)


def loglinear_continue(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    level_weights: torch.Tensor,
    log_decay: torch.Tensor | None,
    slots: torch.Tensor | None,
    position: int,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """T tokens at positions ``position`` .. ``position + T - 1`` after ``slots``, the state after
    ``position`` tokens [B, H, bit_length(position), dk, dv] (None when position is 0); q, k, v,
    level_weights, log_decay as in :func:`loglinear_attention_reference`. Returns (out [B, H, T, dv],
    slots after them).

    The span is cut into aligned blocks (sizes powers of two, a block of 2**m starting at a multiple of
    2**m; at most 2 log2(T) of them). Inside an aligned block levels depend only on offsets, so the block
    runs the chunked path as if it started at 0; and every token of the block reads past slot m at level
    m + 1, as the block's first token does."""
    _check_shapes(q, k, v, level_weights, log_decay)
    slots = _initial_slots(q, v, slots, position)
    assert slots.shape[2] == position.bit_length(), f"{slots.shape[2]} slots after {position} tokens"
    if q.shape[2] == 1:
        return _one_token(q, k, v, level_weights, log_decay, slots, position)
    length, outs, start = q.shape[2], [], 0
    while start < length:
        at = position + start
        m = (length - start).bit_length() - 1
        if at:
            m = min(m, (at & -at).bit_length() - 1)  # the lowest set bit bounds the aligned size
        span = slice(start, start + (1 << m))
        qb, kb, vb, wb = q[:, :, span], k[:, :, span], v[:, :, span], level_weights[:, :, span]
        db = None if log_decay is None else log_decay[:, :, span]
        out = loglinear_attention_chunked(qb, kb, vb, wb, db, chunk_size)
        if slots.shape[2]:
            lam = wb if db is None else wb * torch.exp(db.cumsum(-1))[..., None]  # decay from the block start
            out = out + _read_slots(qb, lam, slots)
        if db is not None:
            slots = slots * torch.exp(db.sum(-1))[..., None, None, None]
        slots = _push(slots, loglinear_state(kb, vb, db)[:, :, m], m, at)
        outs.append(out)
        start += 1 << m
    return torch.cat(outs, dim=2), slots
