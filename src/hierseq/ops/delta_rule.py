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

from typing import Any, NamedTuple

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


class _ChunkPieces(NamedTuple):
    """What a chunk computes before its entering state is known (chunked shapes [B, H, n, ...])."""

    decay: torch.Tensor  # Gamma_i / Gamma_j for j <= i, else 0: [C, C]
    kk: torch.Tensor  # k_i . k_j: [C, C]
    qk: torch.Tensor  # q_i . k_j: [C, C]
    system: torch.Tensor  # A (read strictly below the diagonal): [C, C]
    solved: torch.Tensor  # [U~ | W] = T [beta V | beta Gamma K]: [C, dv + dk]
    gamma: torch.Tensor  # Gamma_i: [C]
    to_end: torch.Tensor  # Gamma_C / Gamma_j: [C]


def _unit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / max(|x|, 1e-12) over the last dim, that norm [..., 1]): F.normalize, keeping the norm."""
    norm = x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return x / norm, norm


def _chunk_pieces(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g: torch.Tensor
) -> _ChunkPieces:
    """The in-chunk pieces from chunked inputs (:func:`_chunks`)."""
    chunk = k.shape[-2]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    decay = (g.unsqueeze(-1) - g.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()
    kk = k @ k.transpose(-1, -2)
    # (I + A) with A strictly lower; the solver reads only the strict lower triangle (unit diagonal).
    system = kk * decay * beta.unsqueeze(-1)
    gamma = g.exp()
    rhs = torch.cat((v, k * gamma.unsqueeze(-1)), dim=-1) * beta.unsqueeze(-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    to_end = (g[..., -1:] - g).exp()
    return _ChunkPieces(decay, kk, q @ k.transpose(-1, -2), system, solved, gamma, to_end)


def _chunk_maps(
    q: torch.Tensor, k: torch.Tensor, p: _ChunkPieces
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P [U~ | W] [B, H, n, C, dv + dk], the query read-out Gamma Q - P W [B, H, n, C, dk], the transition
    M [B, H, n, dk, dk], the offset K_d^T U~ [B, H, n, dk, dv]): O = P U~ + (Gamma Q - P W) S0 and
    S_end = M S0 + K_d^T U~."""
    key_dim = k.shape[-1]
    value_dim = p.solved.shape[-1] - key_dim
    read = (p.qk * p.decay) @ p.solved  # P [U~ | W], one matmul
    k_d_solved = (k * p.to_end.unsqueeze(-1)).transpose(-1, -2) @ p.solved  # K_d^T [U~ | W]
    offset, k_d_w = k_d_solved.split((value_dim, key_dim), dim=-1)
    eye = torch.eye(key_dim, dtype=k.dtype, device=k.device)
    transition = p.gamma[..., -1:, None] * eye - k_d_w
    q_state = q * p.gamma.unsqueeze(-1) - read[..., value_dim:]
    return read, q_state, transition, offset


def _chunk_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    p: _ChunkPieces,
    entering: torch.Tensor,
    d_out: torch.Tensor,
    d_transition: torch.Tensor,
    d_offset: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the chunk maps (written out: no autograd graph is built, so backward allocates only
    its temporaries). Returns dq, dk, dv, dbeta and dG (the gradient of the in-chunk cumulative log
    decay), chunked shapes."""
    # Big temporaries are consumed in place and dropped early: this runs for a whole layer at once.
    key_dim, value_dim = k.shape[-1], v.shape[-1]
    b = beta.unsqueeze(-1)
    d_q_state = d_out @ entering.transpose(-1, -2)  # O = ... + (Gamma Q - P W) S0
    dq = d_q_state * p.gamma.unsqueeze(-1)
    d_gamma = (q * d_q_state).sum(-1)
    d_read = torch.cat((d_out, d_q_state.neg_()), dim=-1)  # read = P [U~ | W]
    del d_q_state
    d_scores = d_read @ p.solved.transpose(-1, -2)
    d_solved = (p.qk * p.decay).transpose(-1, -2) @ d_read
    del d_read
    # k_d_solved = K_d^T [U~ | W] with gradient [d_offset | -d_transition]; M's identity term needs Gamma_C.
    d_k_d_solved = torch.cat((d_offset, -d_transition), dim=-1)
    k_d = k * p.to_end.unsqueeze(-1)
    d_k_d = p.solved @ d_k_d_solved.transpose(-1, -2)
    d_solved.add_(k_d @ d_k_d_solved)
    del k_d, d_k_d_solved
    d_to_end = (d_k_d * k).sum(-1).mul_(p.to_end)  # d/dG_j of exp(G_C - G_j) is minus this
    dk = d_k_d.mul_(p.to_end.unsqueeze(-1))
    dg_last = d_to_end.sum(-1) + p.gamma[..., -1] * d_transition.diagonal(dim1=-2, dim2=-1).sum(-1)
    # solved = (I + A)^-1 rhs: d rhs = (I + A)^-T d solved, dA = -(d rhs) solved^T below the diagonal.
    d_rhs = torch.linalg.solve_triangular(p.system.transpose(-1, -2), d_solved, upper=True, unitriangular=True)
    del d_solved
    d_system_decay = (d_rhs @ p.solved.transpose(-1, -2)).tril_(-1).neg_().mul_(p.decay)  # dA * decay
    d_rhs_v, d_rhs_w = d_rhs.split((value_dim, key_dim), dim=-1)
    dv = d_rhs_v * b
    w_dot = (d_rhs_w * k).sum(-1)
    dk.addcmul_(d_rhs_w, b * p.gamma.unsqueeze(-1))
    d_gamma.addcmul_(beta, w_dot)
    t_kk = d_system_decay * p.kk
    d_beta = (d_rhs_v * v).sum(-1) + p.gamma * w_dot + t_kk.sum(-1)
    del d_rhs
    d_kk = d_system_decay.mul_(b)
    d_qk = d_scores.mul_(p.decay)
    dk.add_(d_kk @ k).add_(d_kk.transpose(-1, -2) @ k).add_(d_qk.transpose(-1, -2) @ q)
    dq.add_(d_qk @ k)
    e = t_kk.mul_(b).addcmul_(d_qk, p.qk)  # dL/d(G_i - G_j) through the decay matrix
    dg = e.sum(-1).sub_(e.sum(-2)).sub_(d_to_end).addcmul_(d_gamma, p.gamma)
    dg[..., -1] += dg_last
    return dq, dk, dv, d_beta, dg


def _entering(after: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
    """The state entering every chunk [B, H, n, dk, dv]: the given state, then the state after each chunk."""
    start = after.new_zeros(after[:, :, :1].shape) if state is None else state.unsqueeze(2)
    return torch.cat((start, after[:, :, :-1]), dim=2)


def _unchunk(t: torch.Tensor, length: int) -> torch.Tensor:
    """[B, H, n, C, ...] -> [B, H, length, ...] (drops the padding)."""
    return t.flatten(2, 3)[:, :, :length]


#: the in-chunk pieces (several [C, C] and [C, dk + dv] tensors per chunk) are built a segment of chunks
#: at a time, with about this many floats in each [C, C] tensor of a segment, so that the elementwise
#: passes run in cache and the temporaries of a long sequence stay bounded. Every segment is one batched
#: call over its chunks, heads and batch rows. Measured at L=16384, 4 heads of 64, two threads,
#: forward + backward: 0.44 s with 4096-token segments, 0.34 s with 512 (0.5 MiB per [C, C] tensor).
SEGMENT_FLOATS = 1 << 17


def _segments(batch_heads: int, n_chunks: int, chunk: int) -> list[slice]:
    step = max(1, SEGMENT_FLOATS // (batch_heads * chunk * chunk))
    return [slice(start, min(start + step, n_chunks)) for start in range(0, n_chunks, step)]


class _GatedDeltaRule(torch.autograd.Function):
    """The chunked form with a hand-written backward. Forward saves the inputs, the state after every
    chunk, the chunk transitions and the query read-outs (about the size of q, k and v together).
    Backward runs the adjoint of the chunk scan (the same pairwise scan, reversed, over M^T), then
    recomputes the in-chunk pieces segment by segment and applies the written-out gradients of
    :func:`_chunk_backward`; autograd through the form would keep about 6x the inputs' size."""

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
        normalize_qk: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        qc, kc, vc, bc, g = _chunks(q, k, v, beta, log_alpha, chunk)
        if normalize_qk:
            (qc, _), (kc, _) = _unit(qc), _unit(kc)
        batch, heads, n = qc.shape[:3]
        key_dim, value_dim = k.shape[-1], v.shape[-1]
        out = qc.new_empty(batch, heads, n, chunk, value_dim)
        q_state = torch.empty_like(qc)
        transition = qc.new_empty(batch, heads, n, key_dim, key_dim)
        offset = qc.new_empty(batch, heads, n, key_dim, value_dim)
        for seg in _segments(batch * heads, n, chunk):
            pieces = _chunk_pieces(qc[:, :, seg], kc[:, :, seg], vc[:, :, seg], bc[:, :, seg], g[:, :, seg])
            read, q_state[:, :, seg], transition[:, :, seg], offset[:, :, seg] = _chunk_maps(
                qc[:, :, seg], kc[:, :, seg], pieces
            )
            out[:, :, seg] = read[..., :value_dim]
        after = matrix_scan(transition, offset, state)
        out.flatten(0, 2).baddbmm_(q_state.flatten(0, 2), _entering(after, state).flatten(0, 2))
        ctx.save_for_backward(q, k, v, beta, log_alpha, state, after, q_state, transition)
        ctx.chunk, ctx.normalize_qk = chunk, normalize_qk
        return _unchunk(out, k.shape[2]), after[:, :, -1]

    @staticmethod
    def backward(ctx: Any, d_out: torch.Tensor, d_final: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, beta, log_alpha, state, after, q_state, transition = ctx.saved_tensors
        length = k.shape[2]
        qc, kc, vc, bc, g = _chunks(q, k, v, beta, log_alpha, ctx.chunk)
        if ctx.normalize_qk:
            (qc, q_norm), (kc, k_norm) = _unit(qc), _unit(kc)
        batch, heads, n, chunk = qc.shape[:4]
        d_out = F.pad(d_out, (0, 0, 0, n * chunk - length)).unflatten(2, (n, chunk))
        entering = _entering(after, state)
        d_entering = q_state.transpose(-1, -2) @ d_out
        # Adjoint of X_c = M_c X_{c-1} + B_c: lam_c = dX_c + M_{c+1}^T lam_{c+1}, a scan run backwards.
        d_after = torch.cat((d_entering[:, :, 1:], d_final.unsqueeze(2)), dim=2)
        m_t = transition.transpose(-1, -2)
        backwards = torch.cat((torch.zeros_like(m_t[:, :, :1]), m_t[:, :, 1:].flip(2)), dim=2)
        lam = matrix_scan(backwards, d_after.flip(2)).flip(2)
        d_transition = lam @ entering.transpose(-1, -2)
        dq, dk, dv = torch.empty_like(qc), torch.empty_like(kc), torch.empty_like(vc)
        d_beta, dg = torch.empty_like(bc), torch.empty_like(g)
        for seg in _segments(batch * heads, n, chunk):
            inputs = (qc[:, :, seg], kc[:, :, seg], vc[:, :, seg], bc[:, :, seg])
            grads = _chunk_backward(
                *inputs,
                _chunk_pieces(*inputs, g[:, :, seg]),
                entering[:, :, seg],
                d_out[:, :, seg],
                d_transition[:, :, seg],
                lam[:, :, seg],
            )
            dq[:, :, seg], dk[:, :, seg], dv[:, :, seg], d_beta[:, :, seg], dg[:, :, seg] = grads
        if ctx.normalize_qk:  # back through u = x / |x|: dx = (du - u (u . du)) / |x|
            dq = dq.sub_(qc * (dq * qc).sum(-1, keepdim=True)).div_(q_norm)
            dk = dk.sub_(kc * (dk * kc).sum(-1, keepdim=True)).div_(k_norm)
        # G is a cumulative sum inside each chunk: its adjoint is the reversed cumulative sum.
        d_log_alpha = dg.flip(-1).cumsum(-1).flip(-1)
        grads = [_unchunk(t, length) for t in (dq, dk, dv)]
        grads += [d_beta.flatten(2)[:, :, :length], d_log_alpha.flatten(2)[:, :, :length]]
        d_state = None
        if state is not None and ctx.needs_input_grad[5]:
            d_state = d_entering[:, :, 0] + m_t[:, :, 0] @ lam[:, :, 0]
        return (*grads, d_state, None, None)


def gated_delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_alpha: torch.Tensor,
    state: torch.Tensor | None = None,
    chunk_size: int = 64,
    normalize_qk: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gated_delta_rule_reference` with no loop over tokens or chunks (same arguments and results).

    ``normalize_qk``: L2-normalise q and k inside (equal to passing ``F.normalize(q)``, ``F.normalize(k)``,
    gradients included) so that only the raw q and k are stored for backward, not normalised copies."""
    if k.shape[2] == 0:
        empty_state = q.new_zeros(*k.shape[:2], k.shape[-1], v.shape[-1]) if state is None else state
        return v.clone(), empty_state
    return _GatedDeltaRule.apply(q, k, v, beta, log_alpha, state, min(chunk_size, k.shape[2]), normalize_qk)
