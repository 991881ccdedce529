"""Slot memory: a gated linear recurrence over S slots of size M with scalar per-slot decays (HAMT's memory).

    M^s_t = exp(log_decay^s_t) M^s_{t-1} + write^s_t bound_t;   out_t = sum_s read^s_t M^s_t

:func:`slot_memory_chunked` (training, prefill) is the fast path: within chunks a causal [C, C] mixing
matrix from *differences* of cumulative log-decays (every exponent <= 0, so nothing overflows) times the
bound vectors, one batched matmul; across chunks a linear scan over chunk totals. No loop over tokens.
:func:`slot_memory_step` is one token (generation); :func:`slot_memory_reference` the loop over time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .scan import linear_scan

__all__ = ["slot_memory_chunked", "slot_memory_reference", "slot_memory_step"]


def _check_slot_memory_inputs(
    bound: torch.Tensor, write: torch.Tensor, log_decay: torch.Tensor, read: torch.Tensor, state: torch.Tensor | None
) -> None:
    if bound.dim() != 3:
        raise ValueError(f"bound shape {tuple(bound.shape)}: expected [B, L, M]")
    batch, length, _ = bound.shape
    for name, t in (("write", write), ("log_decay", log_decay), ("read", read)):
        if t.dim() != 3 or t.shape[:2] != (batch, length) or t.shape[2] != write.shape[2]:
            raise ValueError(f"{name} shape {tuple(t.shape)}: expected [B, L, S] = [{batch}, {length}, S]")
    if state is not None and tuple(state.shape) != (batch, write.shape[2], bound.shape[2]):
        raise ValueError(f"state shape {tuple(state.shape)}: expected [B, S, M]")


def slot_memory_reference(
    bound: torch.Tensor,
    write: torch.Tensor,
    log_decay: torch.Tensor,
    read: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, a loop over time.

    bound: [B, L, M] bound key-value vectors; write, log_decay (<= 0), read: [B, L, S]; state: [B, S, M]
    or None (zeros). M^s_t = exp(log_decay^s_t) M^s_{t-1} + write^s_t bound_t; out_t = sum_s read^s_t M^s_t.
    Returns (out [B, L, M], final state [B, S, M]).
    """
    _check_slot_memory_inputs(bound, write, log_decay, read, state)
    batch, length, dim = bound.shape
    memory = bound.new_zeros(batch, write.shape[2], dim) if state is None else state
    outputs = []
    for t in range(length):
        out_t, memory = slot_memory_step(bound[:, t], write[:, t], log_decay[:, t], read[:, t], memory)
        outputs.append(out_t)
    return torch.stack(outputs, dim=1), memory


def slot_memory_step(
    bound_t: torch.Tensor,
    write_t: torch.Tensor,
    log_decay_t: torch.Tensor,
    read_t: torch.Tensor,
    state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token. bound_t: [B, M]; write_t, log_decay_t, read_t: [B, S]; state: [B, S, M] or None.
    Returns (out_t [B, M], new state [B, S, M])."""
    contribution = write_t.unsqueeze(-1) * bound_t.unsqueeze(1)  # [B, S, M]
    if state is None:
        new_state = contribution
    else:
        new_state = log_decay_t.exp().unsqueeze(-1) * state + contribution
    out_t = torch.einsum("bs,bsm->bm", read_t, new_state)
    return out_t, new_state


def slot_memory_chunked(
    bound: torch.Tensor,
    write: torch.Tensor,
    log_decay: torch.Tensor,
    read: torch.Tensor,
    state: torch.Tensor | None = None,
    chunk_size: int = 64,
    return_chunk_states: bool = False,
) -> tuple[torch.Tensor, ...]:
    """:func:`slot_memory_reference` without a loop over tokens. Same arguments and results; with
    ``return_chunk_states`` also the state at the end of every chunk [B, n_chunks, S, M] (the tail
    chunk's entry is the final state).

    Within a chunk (positions t, j relative to its start, cum^s = cumulative log-decay inside it):
        out_t = sum_s read^s_t [exp(cum^s_t) M^s_start + sum_{j<=t} exp(cum^s_t - cum^s_j) write^s_j bound_j]
    The second term is a [C, C] matrix (summed over slots) times the chunk's bound vectors. Every
    exponent is a difference cum_t - cum_j with j <= t (or cum_t itself), hence <= 0: no overflow and no
    1/decay blow-up however long the chunk or strong the decay.
    """
    _check_slot_memory_inputs(bound, write, log_decay, read, state)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: must be a positive integer")
    batch, length, dim = bound.shape
    slots = write.shape[2]
    chunk = min(chunk_size, length)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    if pad:
        # Padding writes nothing and does not decay (log_decay 0), so the final state is unchanged.
        bound, write, log_decay, read = (F.pad(t, (0, 0, 0, pad)) for t in (bound, write, log_decay, read))
    bound = bound.reshape(batch, n_chunks, chunk, dim)
    write, log_decay, read = (t.reshape(batch, n_chunks, chunk, slots) for t in (write, log_decay, read))

    cum = log_decay.cumsum(dim=2)  # [B, n, C, S], non-increasing along the chunk
    # Intra-chunk mixing matrix A[t, j] = sum_s read^s_t exp(cum^s_t - cum^s_j) write^s_j for j <= t.
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=bound.device).tril()
    diff = cum.unsqueeze(3) - cum.unsqueeze(2)  # [B, n, C(t), C(j), S]
    # Mask before exp: the entries with j > t are positive and could overflow; -inf gives 0 and 0 grad.
    decay = diff.masked_fill(~causal[:, :, None], float("-inf")).exp()
    mixing = (decay * read.unsqueeze(3) * write.unsqueeze(2)).sum(-1)  # [B, n, C, C]
    out = mixing @ bound  # [B, n, C, M]

    # Each chunk's own contribution to the state at its end, from a zero start.
    to_end = (cum[:, :, -1:] - cum).exp() * write  # [B, n, C, S]
    local_end = torch.einsum("bncs,bncm->bnsm", to_end, bound)
    chunk_decay = cum[:, :, -1].exp().unsqueeze(-1).expand(batch, n_chunks, slots, dim)
    chunk_end = linear_scan(chunk_decay.contiguous(), local_end, state)  # [B, n, S, M]
    start = bound.new_zeros(batch, 1, slots, dim) if state is None else state.unsqueeze(1)
    entering = torch.cat((start, chunk_end[:, :-1]), dim=1)  # state at each chunk's start
    out = out + torch.einsum("bncs,bnsm->bncm", read * cum.exp(), entering)

    out = out.reshape(batch, n_chunks * chunk, dim)[:, :length]
    if return_chunk_states:
        return out, chunk_end[:, -1], chunk_end
    return out, chunk_end[:, -1]
