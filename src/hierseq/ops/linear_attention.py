"""Causal linear attention (Katharopoulos et al. 2020) with the normaliser as one extra value column.

Per head, with positive (already feature-mapped) queries and keys:

    S_t = S_{t-1} + k_t [v_t, 1]^T        (state [dk, dv + 1]);   out_t = q_t^T S_t[:, :dv] / (q_t^T S_t[:, dv] + eps)

:func:`linear_attention_chunked` (training: a masked [C, C] score matrix inside each chunk plus the
state carried in by an exclusive cumulative sum over chunk totals; sums only, nothing can overflow),
:func:`linear_attention_step` (generation, O(1) per token) and :func:`linear_attention_reference`
(the loop over time) agree to float tolerance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["linear_attention_chunked", "linear_attention_reference", "linear_attention_step"]

_EPS = 1e-6


def linear_attention_step(
    q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token. q_t, k_t: [B, H, dk] (already feature-mapped, positive); v_t: [B, H, dv];
    state: [B, H, dk, dv + 1] or None. Returns (out_t [B, H, dv], new state)."""
    v_ext = torch.cat((v_t, torch.ones_like(v_t[..., :1])), dim=-1)
    update = k_t.unsqueeze(-1) * v_ext.unsqueeze(-2)
    state = update if state is None else state + update
    num_den = torch.einsum("bhk,bhkv->bhv", q_t, state)
    return num_den[..., :-1] / (num_den[..., -1:] + _EPS), state


def linear_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop over time. q, k: [B, H, L, dk]; v: [B, H, L, dv]; state [B, H, dk, dv + 1] or None.
    Returns (out [B, H, L, dv], final state)."""
    outs = []
    for t in range(q.shape[2]):
        out_t, state = linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state)
        outs.append(out_t)
    return torch.stack(outs, dim=2), state


def linear_attention_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor | None = None, chunk_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`linear_attention_reference` without a loop over tokens (same arguments and results)."""
    batch, heads, length, key_dim = q.shape
    chunk = min(chunk_size, length)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    v_ext = torch.cat((v, torch.ones_like(v[..., :1])), dim=-1)
    if pad:  # zero keys write nothing, so the final state is unchanged
        q, k, v_ext = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v_ext))
    q, k = (t.reshape(batch, heads, n_chunks, chunk, key_dim) for t in (q, k))
    v_ext = v_ext.reshape(batch, heads, n_chunks, chunk, -1)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    scores = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0.0)  # [B, H, n, C, C]
    num_den = scores @ v_ext
    chunk_totals = k.transpose(-1, -2) @ v_ext  # [B, H, n, dk, dv + 1]
    ends = chunk_totals.cumsum(dim=2)
    if state is not None:
        ends = ends + state.unsqueeze(2)
    start = torch.zeros_like(ends[:, :, :1]) if state is None else state.unsqueeze(2)
    entering = torch.cat((start, ends[:, :, :-1]), dim=2)
    num_den = num_den + q @ entering
    num_den = num_den.reshape(batch, heads, n_chunks * chunk, -1)[:, :, :length]
    return num_den[..., :-1] / (num_den[..., -1:] + _EPS), ends[:, :, -1]
