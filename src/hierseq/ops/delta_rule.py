"""The gated delta rule (Yang, Kautz & Hatamizadeh, "Gated Delta Networks", ICLR 2025), per head.

State S: [dk, dv], an associative memory from keys to values. Each token decays it by alpha_t and then
moves the value it stores under k_t a fraction beta_t of the way to v_t (the delta rule: a correcting
write, not a plain sum)::

    S_t = alpha_t S_{t-1} + beta_t k_t (v_t - alpha_t S_{t-1}^T k_t)^T
        = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T q_t

Inputs: q, k: [B, H, L, dk] (unit-norm keys keep I - beta k k^T a contraction); v: [B, H, L, dv];
beta: [B, H, L] in [0, 1]; log_alpha: [B, H, L] <= 0; state: [B, H, dk, dv] or None (zeros).

* :func:`gated_delta_rule_reference`: the definition, a loop over time.
* :func:`gated_delta_rule_step`: one token in O(1), for generation.
* :func:`gated_delta_rule_chunked`: the training path, matrix multiplies only (the WY / UT form).
  Inside a chunk of C tokens, with Gamma_i = exp(sum_{j <= i} log alpha_j) from the chunk start and
  S0 the state entering it, the writes u_i = beta_i (v_i - alpha_i S_{i-1}^T k_i) solve the unit lower
  triangular system (I + A) U = beta V - beta Gamma K S0, A_ij = beta_i (Gamma_i / Gamma_j) k_i . k_j
  for j < i. One triangular solve per chunk gives U~ = T beta V and W = T beta Gamma K (T = (I + A)^-1),
  so U = U~ - W S0 and

      O     = P U~ + (Gamma Q - P W) S0              P_ij = (Gamma_i / Gamma_j) q_i . k_j, j <= i
      S_end = M S0 + K_d^T U~,  M = Gamma_C I - K_d^T W,   K_d = (Gamma_C / Gamma) K

  The states entering the chunks are the prefix compositions of the affine maps (M, K_d^T U~): a
  pairwise scan over chunks (``ops/matrix_scan.py``), not a loop. Decay ratios are formed as
  exp(G_i - G_j) of differences of in-chunk cumulative sums, masked before the exp, so nothing
  overflows; a product that underflows to 0 only drops a contribution already below fp32 precision.

The three agree to float tolerance in values, states and gradients (tests/ops/test_delta_rule_op.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .matrix_scan import matrix_scan

__all__ = ["gated_delta_rule_chunked", "gated_delta_rule_reference", "gated_delta_rule_step"]


def gated_delta_rule_step(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    beta_t: torch.Tensor,
    log_alpha_t: torch.Tensor,
    state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token. q_t, k_t: [B, H, dk]; v_t: [B, H, dv]; beta_t, log_alpha_t: [B, H];
    state: [B, H, dk, dv] or None. Returns (o_t [B, H, dv], new state)."""
    if state is None:
        state = q_t.new_zeros(*k_t.shape, v_t.shape[-1])
    state = state * log_alpha_t.exp()[..., None, None]
    predicted = torch.einsum("bhk,bhkv->bhv", k_t, state)
    write = beta_t.unsqueeze(-1) * (v_t - predicted)
    state = state + k_t.unsqueeze(-1) * write.unsqueeze(-2)
    return torch.einsum("bhk,bhkv->bhv", q_t, state), state


def gated_delta_rule_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_alpha: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop over time (shapes in the module docstring). Returns (o [B, H, L, dv], final state)."""
    if state is None:
        state = q.new_zeros(*k.shape[:2], k.shape[-1], v.shape[-1])
    outs = []
    for t in range(q.shape[2]):
        out_t, state = gated_delta_rule_step(
            q[:, :, t], k[:, :, t], v[:, :, t], beta[:, :, t], log_alpha[:, :, t], state
        )
        outs.append(out_t)
    if not outs:
        return v.clone(), state
    return torch.stack(outs, dim=2), state


def _chunks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, log_alpha: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, ...]:
    """Pad to whole chunks and cut: q, k [B, H, n, C, dk]; v [B, H, n, C, dv]; beta and G (the
    cumulative log decay from each chunk's start) [B, H, n, C]."""
    batch, heads, length = k.shape[:3]
    n = -(-length // chunk)
    pad = n * chunk - length
    if pad:  # beta = 0 writes nothing and log alpha = 0 keeps the state: the padding changes nothing
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        beta, log_alpha = (F.pad(t, (0, pad)) for t in (beta, log_alpha))
    q, k, v = (t.reshape(batch, heads, n, chunk, t.shape[-1]) for t in (q, k, v))
    return q, k, v, beta.reshape(batch, heads, n, chunk), log_alpha.reshape(batch, heads, n, chunk).cumsum(-1)


def _chunk_maps(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Everything a chunk computes without its entering state S0 (chunked inputs from :func:`_chunks`).

    Returns (P U~ [B, H, n, C, dv], the query read-out Gamma Q - P W [B, H, n, C, dk], the transition
    M [B, H, n, dk, dk] and the offset K_d^T U~ [B, H, n, dk, dv]) so that O = P U~ + (Gamma Q - P W) S0
    and S_end = M S0 + K_d^T U~."""
    chunk, key_dim, value_dim = k.shape[-2], k.shape[-1], v.shape[-1]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    decay = (g.unsqueeze(-1) - g.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()  # Gamma_i / Gamma_j
    # (I + A) with A strictly lower; the solver reads only the strict lower triangle (unit diagonal).
    system = (k @ k.transpose(-1, -2)) * decay * beta.unsqueeze(-1)
    rhs = torch.cat((v, k * g.exp().unsqueeze(-1)), dim=-1) * beta.unsqueeze(-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    u_tilde, w = solved.split((value_dim, key_dim), dim=-1)
    k_d_t = (k * (g[..., -1:] - g).exp().unsqueeze(-1)).transpose(-1, -2)  # K_d^T: [B, H, n, dk, C]
    eye = torch.eye(key_dim, dtype=k.dtype, device=k.device)
    transition = g[..., -1].exp()[..., None, None] * eye - k_d_t @ w
    scores = (q @ k.transpose(-1, -2)) * decay  # P (decay is zero above the diagonal)
    return scores @ u_tilde, q * g.exp().unsqueeze(-1) - scores @ w, transition, k_d_t @ u_tilde


def _entering(after: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
    """The state entering every chunk [B, H, n, dk, dv]: the given state, then the state after each chunk."""
    start = after.new_zeros(after[:, :, :1].shape) if state is None else state.unsqueeze(2)
    return torch.cat((start, after[:, :, :-1]), dim=2)


class _GatedDeltaRule(torch.autograd.Function):
    """The chunked form with a memory-lean backward. Forward saves only the inputs and the state after
    every chunk (dk x dv floats per chunk); backward recomputes the in-chunk pieces of one layer, runs
    the adjoint of the chunk scan (the same pairwise scan, reversed, over M^T) and back-propagates
    through the pieces. Autograd through the whole form would keep about 6x the inputs' size instead."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        beta: torch.Tensor,
        log_alpha: torch.Tensor,
        state: torch.Tensor | None,
        chunk: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        length = k.shape[2]
        local_out, q_state, transition, offset = _chunk_maps(*_chunks(q, k, v, beta, log_alpha, chunk))
        after = matrix_scan(transition, offset, state)
        out = local_out + q_state @ _entering(after, state)
        ctx.save_for_backward(q, k, v, beta, log_alpha, state, after)
        ctx.chunk = chunk
        return out.flatten(2, 3)[:, :, :length], after[:, :, -1]

    @staticmethod
    def backward(ctx: Any, d_out: torch.Tensor, d_final: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, beta, log_alpha, state, after = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(need) for t, need in zip((q, k, v, beta, log_alpha), ctx.needs_input_grad)]
        with torch.enable_grad():
            pieces = _chunk_maps(*_chunks(*inputs, ctx.chunk))
        local_out, q_state, transition, _ = pieces
        n, chunk = local_out.shape[2:4]
        d_out = F.pad(d_out, (0, 0, 0, n * chunk - d_out.shape[2])).unflatten(2, (n, chunk))
        entering = _entering(after, state)
        d_entering = q_state.detach().transpose(-1, -2) @ d_out
        # Adjoint of X_c = M_c X_{c-1} + B_c: lam_c = dX_c + M_{c+1}^T lam_{c+1}, a scan run backwards.
        d_after = torch.cat((d_entering[:, :, 1:], d_final.unsqueeze(2)), dim=2)
        m_t = transition.detach().transpose(-1, -2)
        backwards = torch.cat((torch.zeros_like(m_t[:, :, :1]), m_t[:, :, 1:].flip(2)), dim=2)
        lam = matrix_scan(backwards, d_after.flip(2)).flip(2)
        d_pieces = (d_out, d_out @ entering.transpose(-1, -2), lam @ entering.transpose(-1, -2), lam)
        wanted = [t for t in inputs if t.requires_grad]
        found = iter(torch.autograd.grad(pieces, wanted, d_pieces) if wanted else ())
        grads = [next(found) if t.requires_grad else None for t in inputs]
        d_state = None
        if state is not None and ctx.needs_input_grad[5]:
            d_state = d_entering[:, :, 0] + m_t[:, :, 0] @ lam[:, :, 0]
        return (*grads, d_state, None)


def gated_delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_alpha: torch.Tensor,
    state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gated_delta_rule_reference` with no loop over tokens or chunks (same arguments and results)."""
    if k.shape[2] == 0:
        empty_state = q.new_zeros(*k.shape[:2], k.shape[-1], v.shape[-1]) if state is None else state
        return v.clone(), empty_state
    return _GatedDeltaRule.apply(q, k, v, beta, log_alpha, state, min(chunk_size, k.shape[2]))
