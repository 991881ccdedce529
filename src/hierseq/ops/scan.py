"""The first-order linear recurrence h_t = a_t * h_{t-1} + b_t (elementwise), as used by SSMs.

Shapes throughout: a, b: [B, L, *dims]; optional initial state h0: [B, *dims] (zeros when omitted);
the result is every state h: [B, L, *dims].

* :func:`linear_scan_reference` is the definition: a Python loop over time. Slow, obviously right.
* :func:`linear_scan_chunked` is the training path: no loop over tokens, only over log2 levels.
* :func:`linear_scan_step` advances one token, for recurrent generation in O(1) memory.
* :func:`linear_scan` is what models call; it picks the fast path.

Why a doubling scan and not ``h = A * (h0 + cumsum(b / A))`` with A the running product of a: for a in
(0, 1) the product A underflows to 0 within a few hundred steps and b / A becomes inf/nan. The pairs
(a, b) compose associatively, (a1, b1) then (a2, b2) = (a1 * a2, a2 * b1 + b2), and combining them
only multiplies and adds values that stay bounded, so a Hillis-Steele scan is stable for any |a| <= 1
and uses only plain differentiable ops, so autograd gives the backward pass.
"""

from __future__ import annotations

import torch


def _check_scan_inputs(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None) -> None:
    if a.shape != b.shape:
        raise ValueError(f"a shape {tuple(a.shape)} and b shape {tuple(b.shape)}: must be equal [B, L, *dims]")
    if a.dim() < 2:
        raise ValueError(f"a shape {tuple(a.shape)}: needs at least 2 dims [B, L, *dims]")
    if a.dtype != b.dtype:
        raise ValueError(f"a dtype {a.dtype} and b dtype {b.dtype}: must be equal")
    if h0 is not None:
        expected = (a.shape[0], *a.shape[2:])
        if tuple(h0.shape) != expected:
            raise ValueError(f"h0 shape {tuple(h0.shape)}: expected [B, *dims] = {list(expected)}")


def linear_scan_reference(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """Readable definition with a loop over time. a, b: [B, L, *dims], h0: [B, *dims] -> h: [B, L, *dims]."""
    _check_scan_inputs(a, b, h0)
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0.to(b.dtype)
    states = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        states.append(h)
    if not states:
        return b.clone()
    return torch.stack(states, dim=1)


def linear_scan_step(a_t: torch.Tensor, b_t: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
    """One recurrent step: a_t, b_t, h: [B, *dims] -> new h [B, *dims]; h=None means the zero state."""
    if a_t.shape != b_t.shape:
        raise ValueError(f"a_t shape {tuple(a_t.shape)} and b_t shape {tuple(b_t.shape)}: must be equal")
    if h is None:
        return b_t
    if h.shape != a_t.shape:
        raise ValueError(f"h shape {tuple(h.shape)}: expected {tuple(a_t.shape)} like a_t")
    return a_t * h + b_t


def _doubling_scan(a: torch.Tensor, b: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive Hillis-Steele scan of the pairs (a, b) along ``dim`` (zero initial state).

    Returns (A, H) with A_t = a_0 * ... * a_t (the cumulative decay) and H_t = h_t from a zero state.
    After the level with stride d, position t holds the composition of the 2d pairs ending at t (or of
    all pairs from 0 when t < 2d); log2(L) levels, each a few whole-tensor ops.
    """
    length = a.shape[dim]
    stride = 1
    while stride < length:
        a_earlier = a.narrow(dim, 0, length - stride)
        b_earlier = b.narrow(dim, 0, length - stride)
        a_later = a.narrow(dim, stride, length - stride)
        b_later = b.narrow(dim, stride, length - stride)
        # Positions < stride already hold their full prefix; the rest absorb the segment `stride` earlier.
        b = torch.cat((b.narrow(dim, 0, stride), a_later * b_earlier + b_later), dim=dim)
        a = torch.cat((a.narrow(dim, 0, stride), a_later * a_earlier), dim=dim)
        stride *= 2
    return a, b


def linear_scan_chunked(
    a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, chunk_size: int = 64
) -> torch.Tensor:
    """Fast scan with no loop over tokens. a, b: [B, L, *dims], h0: [B, *dims] -> h: [B, L, *dims].

    The sequence is cut into chunks of ``chunk_size`` (the tail padded with the identity pair a=1, b=0,
    which cannot change earlier states). Three batched stages:

    1. a doubling scan inside every chunk at once ([B, n_chunks, chunk, *dims]): per-position decay
       from the chunk start and the state reached from a zero state at the chunk start;
    2. a doubling scan over the n_chunks chunk totals (a tiny tensor) gives the state entering each chunk,
       with h0 folded into the first chunk;
    3. h = (state entering the chunk) * (decay since chunk start) + (within-chunk state).

    Work is O(L log chunk) and autograd keeps log2(chunk) full-size intermediates (instead of log2(L)
    for a doubling scan over the whole length).
    """
    _check_scan_inputs(a, b, h0)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: must be a positive integer")
    batch, length = a.shape[:2]
    dims = a.shape[2:]
    if length == 0:
        return b.clone()
    chunk = min(chunk_size, length)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    if pad:
        a = torch.cat((a, a.new_ones(batch, pad, *dims)), dim=1)
        b = torch.cat((b, b.new_zeros(batch, pad, *dims)), dim=1)
    a = a.reshape(batch, n_chunks, chunk, *dims)
    b = b.reshape(batch, n_chunks, chunk, *dims)

    # Stage 1: within every chunk, from a zero state at its start.
    decay_in_chunk, state_in_chunk = _doubling_scan(a, b, dim=2)

    # Stage 2: state after each chunk, h_end_c = decay_c * h_end_{c-1} + local_end_c, starting from h0.
    chunk_decay = decay_in_chunk[:, :, -1]  # [B, n_chunks, *dims]
    chunk_local_end = state_in_chunk[:, :, -1]
    if h0 is not None:
        first = chunk_decay[:, :1] * h0.to(b.dtype).unsqueeze(1) + chunk_local_end[:, :1]
        chunk_local_end = torch.cat((first, chunk_local_end[:, 1:]), dim=1)
    _, chunk_end_state = _doubling_scan(chunk_decay, chunk_local_end, dim=1)
    # The state entering chunk c is the state after chunk c-1 (h0, or zero, for the first chunk).
    h_start = h0.to(b.dtype).unsqueeze(1) if h0 is not None else chunk_end_state.new_zeros(batch, 1, *dims)
    entering = torch.cat((h_start, chunk_end_state[:, :-1]), dim=1)  # [B, n_chunks, *dims]

    # Stage 3: add the carried-in state, decayed to each position.
    h = entering.unsqueeze(2) * decay_in_chunk + state_in_chunk
    return h.reshape(batch, n_chunks * chunk, *dims)[:, :length]


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """The scan models should call. a, b: [B, L, *dims], h0: [B, *dims] or None -> h: [B, L, *dims].

    Uses :func:`linear_scan_chunked`; kept as its own name so a faster backend (a fused kernel) can be
    slotted in later without touching the models.
    """
    return linear_scan_chunked(a, b, h0)
