"""Mamba-2's state-space duality (SSD, Dao & Gu 2024): a selective SSM whose decay is one scalar per head.

Per batch row and head h (headdim P, state size N), with head h reading group g = h // (H / G) of B, C::

    h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T        (state [P, N])
    y_t = h_t C_t + D_h x_t

Shapes: x [B, L, H, P]; dt [B, L, H] (already positive: the caller applies softplus); A [H] (negative);
B, C [B, L, G, N] with G dividing H; D [H] or None; initial state h0 / final state [B, H, P, N].

Three paths that agree (tests/ops/test_ssd_op.py):

* :func:`ssd_reference` - the definition, a Python loop over time through :func:`ssd_step`;
* :func:`ssd_step` - one token in O(1), for generation;
* :func:`ssd_chunked` - the training path, the SSD block decomposition over chunks of Q tokens, with
  no loop over tokens or chunks:

  1. inside each chunk, the output as a masked [Q, Q] "attention": (C_i . B_j) exp(s_i - s_j) dt_j x_j
     for j <= i, where s is the cumulative sum of dt A inside the chunk;
  2. each chunk's own end state, sum_j exp(s_end - s_j) dt_j x_j B_j^T;
  3. the states entering every chunk (and the final one) from h0 and the chunk states, with the
     [n_chunks + 1, n_chunks + 1] lower-triangular matrix of decays between chunk boundaries (column 0
     for h0): one matmul per head, batched over rows;
  4. each entering state read out: exp(s_i) C_i . H_c.

  Its backward is written by hand (:class:`_SSDChunkedFn`): it saves the inputs and the entering states
  (one [P, N] per chunk and head, P N / Q floats per token and head) and recomputes the [Q, Q] blocks,
  so training memory does not hold the O(L Q) intra-chunk tensors autograd would keep. Forward and
  backward loop over the heads (a constant), every step a matmul over all chunks at once, so their
  temporaries are one head's size and reused (see the class for why that matters on CPU).
  :func:`ssd_chunked_autograd` is the same forward, all heads batched, with plain autograd: the second
  path the tests hold the hand-written backward to.

Numerical stability: every decay is exp of a sum of dt A over a span (<= 0), taken as a difference of
cumulative sums, masked outside the causal triangle before the exp; no running product is ever divided
by. Inside a chunk the cumulative sums are bounded by Q max|dt A|, so float32 differences are accurate;
between chunks they grow with L, so those are differenced in float64 (a [n+1, n+1] matrix, cheap).
Decays below exp(-50) are flushed to exactly 0 (:data:`_LOG_DECAY_FLOOR`; 1e-22 of a unit term, far
below float32 resolution), which keeps denormals, and their ~3x slowdown of the matmuls, out. A length
that is not a multiple of Q is padded with dt = 0 (decay 1, no input): the padding changes neither the
outputs nor the final state.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["ssd_chunked", "ssd_chunked_autograd", "ssd_reference", "ssd_step"]


def _check_shapes(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    h0: torch.Tensor | None,
) -> None:
    if x.dim() != 4:
        raise ValueError(f"x: shape={tuple(x.shape)}: must be [batch, length, heads, headdim]")
    batch, length, heads, headdim = x.shape
    if tuple(dt.shape) != (batch, length, heads):
        raise ValueError(f"dt: shape={tuple(dt.shape)}: must be [batch, length, heads] = {[batch, length, heads]}")
    if tuple(A.shape) != (heads,):
        raise ValueError(f"A: shape={tuple(A.shape)}: must be [heads={heads}]")
    if B.dim() != 4 or tuple(B.shape[:2]) != (batch, length) or B.shape[2] == 0 or heads % B.shape[2]:
        raise ValueError(
            f"B: shape={tuple(B.shape)}: must be [batch, length, groups, d_state], groups dividing {heads}"
        )
    if C.shape != B.shape:
        raise ValueError(f"C: shape={tuple(C.shape)}: must equal B's shape {tuple(B.shape)}")
    if D is not None and tuple(D.shape) != (heads,):
        raise ValueError(f"D: shape={tuple(D.shape)}: must be [heads={heads}]")
    state_shape = (batch, heads, headdim, B.shape[3])
    if h0 is not None and tuple(h0.shape) != state_shape:
        raise ValueError(f"h0: shape={tuple(h0.shape)}: must be [batch, heads, headdim, d_state] = {list(state_shape)}")


def _per_head(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., G, N] -> [..., H, N]: group g serves heads g H/G .. (g + 1) H/G - 1 (a broadcast view)."""
    groups = t.shape[-2]
    return t.unsqueeze(-2).expand(*t.shape[:-1], heads // groups, t.shape[-1]).flatten(-3, -2)


# ------------------------------------------------------------------------------------ reference
def ssd_step(
    x_t: torch.Tensor,
    dt_t: torch.Tensor,
    A: torch.Tensor,
    B_t: torch.Tensor,
    C_t: torch.Tensor,
    D: torch.Tensor | None,
    state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token in O(1). x_t [B, H, P]; dt_t [B, H]; A [H]; B_t, C_t [B, G, N]; D [H] or None;
    state [B, H, P, N] or None (zeros). Returns (y_t [B, H, P], the new state [B, H, P, N])."""
    heads = x_t.shape[1]
    B_h, C_h = _per_head(B_t, heads), _per_head(C_t, heads)  # [B, H, N]
    drive = (dt_t.unsqueeze(-1) * x_t).unsqueeze(-1) * B_h.unsqueeze(-2)  # [B, H, P, N]
    if state is None:
        state = drive
    else:
        state = torch.exp(dt_t * A)[..., None, None] * state + drive
    y_t = (state @ C_h.unsqueeze(-1)).squeeze(-1)
    if D is not None:
        y_t = y_t + D.unsqueeze(-1) * x_t
    return y_t, state


def ssd_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    h0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, one token at a time (slow; for tests and as documentation). Shapes as in the module
    docstring. Returns (y [B, L, H, P], final state [B, H, P, N])."""
    _check_shapes(x, dt, A, B, C, D, h0)
    batch, length, heads, headdim = x.shape
    state = x.new_zeros(batch, heads, headdim, B.shape[-1]) if h0 is None else h0
    ys = []
    for t in range(length):
        y_t, state = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], D, state)
        ys.append(y_t)
    return torch.stack(ys, dim=1), state


# -------------------------------------------------------------------------------- chunked form
def _to_chunks(t: torch.Tensor, n_chunks: int, chunk: int) -> torch.Tensor:
    """[B, L, K, F] -> [B, K, n_chunks, chunk, F], contiguous, zero-padded at the end of time."""
    batch, length, k, f = t.shape
    out = t.new_zeros(batch, k, n_chunks * chunk, f)
    out[:, :, :length] = t.transpose(1, 2)
    return out.view(batch, k, n_chunks, chunk, f)


def _from_chunks(t: torch.Tensor, length: int) -> torch.Tensor:
    """[B, K, n_chunks, chunk, F] -> [B, length, K, F] (a strided view; the padding dropped)."""
    batch, k, n_chunks, chunk, f = t.shape
    return t.view(batch, k, n_chunks * chunk, f)[:, :, :length].transpose(1, 2)


#: Decays at or below exp(-50) ~ 2e-22 are flushed to exactly 0. Next to any unit-size term they are far
#: below float32 resolution, and left in, they and their products fall into the denormal range, which
#: makes the matmuls several times slower on x86 CPUs (2.6x on the forward, measured).
_LOG_DECAY_FLOOR = -50.0
_DECAY_FLOOR = 1.0001 * math.exp(_LOG_DECAY_FLOOR)  # a little above exp(-50) in any float rounding


def _flushed_exp_(log_decay: torch.Tensor) -> torch.Tensor:
    """exp(log_decay) in place (log_decay <= 0), exactly 0 at or below the floor.

    The exponent is clamped to the floor first and the floor values zeroed after the exp: the vectorised
    exp is ~5x slower on inputs whose result underflows, and on -inf, so no such input is ever passed."""
    decay = log_decay.clamp_min_(_LOG_DECAY_FLOOR).exp_()
    if decay.requires_grad:  # under autograd: exp keeps its output for backward, so flush out of place
        return F.threshold(decay, _DECAY_FLOOR, 0.0)
    return F.threshold_(decay, _DECAY_FLOOR, 0.0)


def _decay_exp(log_decay: torch.Tensor) -> torch.Tensor:
    """:func:`_flushed_exp_` on a copy."""
    return _flushed_exp_(log_decay.clone())


def _causal_decays(cum: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """exp(cum_i - cum_j) for j <= i, else 0 (and 0 below the floor). cum: [..., T] -> [..., T, T], into
    ``out`` when given.

    Above the diagonal the exponent is masked (to the floor, which the flush turns into exact zeros) before
    the exp, so nothing there can overflow."""
    size = cum.shape[-1]
    upper = torch.ones(size, size, dtype=torch.bool, device=cum.device).triu(1)
    if out is None:
        out = cum.unsqueeze(-1) - cum.unsqueeze(-2)
    else:
        torch.sub(cum.unsqueeze(-1), cum.unsqueeze(-2), out=out)
    return _flushed_exp_(out.masked_fill_(upper, _LOG_DECAY_FLOOR))


def _chunk_decays(totals: torch.Tensor) -> torch.Tensor:
    """totals: [B, H, n] summed dt A of every chunk -> [B, H, n + 1, n + 1], entry (z, k) the decay from
    the state after chunk k - 1 (k = 0: h0) to the state after chunk z - 1.

    The cumulative sum over chunks grows with the length (it reaches -1e5 at strong decays), where float32
    differences lose the small spans that matter, so it is differenced in float64."""
    cum = torch.cat((totals.new_zeros(*totals.shape[:-1], 1, dtype=torch.float64), totals.double().cumsum(-1)), -1)
    return _causal_decays(cum).to(totals.dtype)


def _chunk_parts(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inputs in chunk layout: cum [B, H, n, Q] (cumulative dt A inside each chunk), xdt [B, H, n, Q, P]
    (dt x), Bc, Cc [B, G, n, Q, N]; every head's matrices contiguous, for batched matmuls."""
    n_chunks = -(-x.shape[1] // chunk)
    cum = _to_chunks((dt * A).unsqueeze(-1), n_chunks, chunk).squeeze(-1).cumsum(-1)
    xdt = _to_chunks(x * dt.unsqueeze(-1), n_chunks, chunk)
    return cum, xdt, _to_chunks(B, n_chunks, chunk), _to_chunks(C, n_chunks, chunk)


def _chunked_forward(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    h0: torch.Tensor | None,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The four SSD steps, with plain (differentiable) torch ops. Returns y without the D skip, in chunk
    layout [B, H, n, Q, P], and the states [B, H, n + 1, P, N]: entering each chunk, then the final one."""
    batch, _, heads, headdim = x.shape
    groups, d_state = B.shape[2:]
    rep = heads // groups
    cum, xdt, Bc, Cc = _chunk_parts(x, dt, A, B, C, chunk)
    n_chunks = cum.shape[2]
    # Heads of one group share B and C: [B, G, rep, n, ...] views broadcast them without copies.
    by_group = (batch, groups, rep, n_chunks)

    # 1. Inside each chunk: (C_i . B_j) exp(cum_i - cum_j) for j <= i, times dt_j x_j.
    scores = (Cc @ Bc.transpose(-1, -2)).unsqueeze(2) * _causal_decays(cum).view(*by_group, chunk, chunk)
    y = scores.view(batch, heads, n_chunks, chunk, chunk) @ xdt

    # 2. Each chunk's end state from its own tokens: sum_j exp(cum_end - cum_j) dt_j x_j B_j^T.
    to_end = _decay_exp(cum[..., -1:] - cum).unsqueeze(-1)
    own = (xdt * to_end).view(*by_group, chunk, headdim).transpose(-1, -2) @ Bc.unsqueeze(2)

    # 3. States entering every chunk: one matmul with the decays between chunk boundaries.
    start = x.new_zeros(batch, heads, 1, headdim, d_state) if h0 is None else h0.unsqueeze(2)
    writes = torch.cat((start, own.reshape(batch, heads, n_chunks, headdim, d_state)), dim=2)
    states = (_chunk_decays(cum[..., -1]) @ writes.flatten(-2)).view_as(writes)

    # 4. The entering state read out at every position: exp(cum_i) C_i . H_c.
    entering = states[:, :, :-1].reshape(*by_group, headdim, d_state)
    read = (Cc.unsqueeze(2) @ entering.transpose(-1, -2)).view(batch, heads, n_chunks, chunk, headdim)
    y = y + read * _decay_exp(cum).unsqueeze(-1)
    return y, states


def _promoted(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """At least float32 (bf16 sums of decays would be far off). Strided inputs are fine: every use either
    copies them into chunk layout or is elementwise."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return [None if t is None else t.to(dtype) for t in tensors]


def _add_skip(y_chunks: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None) -> torch.Tensor:
    """y [B, H, n, Q, P] (chunk layout) -> y + D x [B, L, H, P], contiguous, in one new tensor."""
    y = _from_chunks(y_chunks, x.shape[1])
    if D is None:
        return y.contiguous()
    return torch.mul(x, D.unsqueeze(-1)).add_(y)


def ssd_chunked_autograd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    h0: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ssd_chunked` with autograd through the chunk form instead of the hand-written backward (the
    same numbers; it keeps every intra-chunk block for backward, so use it to check, not to train)."""
    _check_shapes(x, dt, A, B, C, D, h0)
    x, dt, A, B, C, D, h0 = _promoted(x, dt, A, B, C, D, h0)
    chunk = min(chunk_size, max(x.shape[1], 1))
    y, states = _chunked_forward(x, dt, A, B, C, h0, chunk)
    return _add_skip(y, x, D), states[:, :, -1]


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1): [..., K] x [..., K] -> [...], as a batched matmul, so no product of the inputs'
    size is allocated (fresh memory is what element-wise passes at long lengths mostly pay for)."""
    return (a.unsqueeze(-2) @ b.unsqueeze(-1)).squeeze(-1).squeeze(-1)


class _Chunks:
    """What the per-head forward and backward of :class:`_SSDChunkedFn` share: shapes, the padded B and C
    in chunks, and the decays, all small next to x (nothing here is [B, L, H, P] sized)."""

    def __init__(
        self, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk: int
    ):
        self.batch, self.length, self.heads, self.headdim = x.shape
        self.groups, self.d_state = B.shape[2:]
        self.rep, self.chunk = self.heads // self.groups, chunk
        self.n_chunks = -(-self.length // chunk)
        self.padded = self.n_chunks * chunk
        dtA = dt * A
        pad = self.padded - self.length
        if pad:  # dt = 0 there: decay 1 and no input, so the padding changes nothing
            dtA = F.pad(dtA, (0, 0, 0, pad))
            B, C = F.pad(B, (0, 0, 0, 0, 0, pad)), F.pad(C, (0, 0, 0, 0, 0, pad))
        by_chunk = (self.batch, self.n_chunks, chunk)
        self.cum = dtA.view(*by_chunk, self.heads).permute(0, 3, 1, 2).contiguous().cumsum(-1)  # [B, H, n, Q]
        self.Bc = B.view(*by_chunk, self.groups, self.d_state)  # [B, n, Q, G, N]
        self.Cc = C.view(*by_chunk, self.groups, self.d_state)
        self.CB = self.Cc.transpose(2, 3) @ self.Bc.permute(0, 1, 3, 4, 2)  # [B, n, G, Q, Q]
        self.between = _chunk_decays(self.cum[..., -1])  # [B, H, n + 1, n + 1]


class _SSDChunkedFn(torch.autograd.Function):
    """(x, dt, A, B, C, D, h0, chunk) -> (y [B, L, H, P], final state [B, H, P, N]).

    Heads are independent, so forward and backward run the four SSD steps one head at a time (a loop over
    the H heads, each step a matmul batched over all chunks): the intra-chunk blocks and every other
    temporary are then [B, n, Q, Q]-sized buffers reused across heads, not H times larger fresh tensors.
    On CPU that is most of the speed: a fresh large tensor costs its page faults (~0.3 ms per MB, about
    as much as a pass over it), while one head's buffers stay in cache. Every matmul writes a contiguous
    buffer (MKL's strided-output path is ~100x slower). Forward + backward at L = 16384, H = 8,
    P = N = 64: ~0.3 s on 2 cores, 3x faster than the same algorithm batched over heads.

    Saves the inputs and the states entering each chunk ([H, B, n, P, N]). With cum the cumulative dt A
    inside a chunk, xdt = dt x and G_y = dLoss/dy, backward runs the four steps in reverse:

    4. read-out y_i += exp(cum_i) C_i . H_c: dH_c = G_y^T (exp(cum) C), and dC, dcum from G_y H_c;
    3. state passing H = decays [h0, S]: the adjoint dS = decays^T [dH, dfinal] (one matmul), dh0 the
       same with the h0 column, and d total_c = exp(total_c) <dS_c, H_c> (H_{c+1} = exp(total_c) H_c + S_c);
    2. chunk states S_c = xdt^T (exp(cum_end - cum) B): dxdt += (exp(cum_end - cum) B) dS^T, and dB,
       dcum from xdt dS;
    1. intra-chunk y = W xdt with W = (C B^T) o exp(segsum): dxdt += W^T G_y, dW = G_y xdt^T, so
       d(C B^T) = dW o exp(segsum) and d(cum_i - cum_j) = dW o W;

    then d(dt A) is the reverse cumulative sum of dcum inside each chunk, and the chain rule through
    xdt = dt x and dt A gives dx, ddt, dA.
    """

    @staticmethod
    def forward(ctx: Any, x, dt, A, B, C, D, h0, chunk):  # type: ignore[override]
        ch = _Chunks(x, dt, A, B, C, chunk)
        batch, length, heads, headdim = x.shape
        n, Q, N = ch.n_chunks, chunk, ch.d_state
        rows, flat = batch * n, headdim * N
        y = x.new_empty(x.shape)
        entering = x.new_empty(heads, batch, n, headdim, N)
        final = x.new_empty(batch, heads, headdim, N)
        xdt = x.new_zeros(batch, ch.padded, headdim)  # the padded tail stays zero
        out = x.new_empty(batch, ch.padded, headdim)
        weights = x.new_empty(batch, n, Q, Q)
        scaled = x.new_empty(batch, n, Q, N)
        own = x.new_empty(batch, n, headdim, N)
        last = x.new_empty(batch, 1, flat)
        xq, outq = xdt.view(rows, Q, headdim), out.view(rows, Q, headdim)
        for h in range(heads):
            g, cum = h // ch.rep, ch.cum[:, h]
            torch.mul(x[:, :, h], dt[:, :, h, None], out=xdt[:, :length])
            # 1. intra-chunk
            torch.mul(_causal_decays(cum, weights), ch.CB[:, :, g], out=weights)
            torch.bmm(weights.view(rows, Q, Q), xq, out=outq)
            # 2. each chunk's own end state
            torch.mul(ch.Bc[:, :, :, g], _decay_exp(cum[..., -1:] - cum).unsqueeze(-1), out=scaled)
            torch.bmm(xq.transpose(1, 2), scaled.view(rows, Q, N), out=own.view(rows, headdim, N))
            # 3. states entering every chunk, and the final one
            between, states = ch.between[:, h], entering[h].view(batch, n, flat)
            torch.bmm(between[:, :n, 1:], own.view(batch, n, flat), out=states)
            torch.bmm(between[:, n:, 1:], own.view(batch, n, flat), out=last)
            if h0 is not None:
                start = h0[:, h].reshape(batch, 1, flat)
                states.addcmul_(between[:, :n, :1], start)
                last.addcmul_(between[:, n:, :1], start)
            final[:, h] = last.view(batch, headdim, N)
            # 4. read-out of the entering states
            torch.mul(ch.Cc[:, :, :, g], _decay_exp(cum).unsqueeze(-1), out=scaled)
            outq.baddbmm_(scaled.view(rows, Q, N), entering[h].view(rows, headdim, N).transpose(1, 2))
            if D is None:
                y[:, :, h] = out[:, :length]
            else:
                torch.addcmul(out[:, :length], x[:, :, h], D[h], out=y[:, :, h])
        ctx.save_for_backward(x, dt, A, B, C, D, h0, entering)
        ctx.chunk = chunk
        return y, final

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor | None, grad_final: torch.Tensor | None):  # type: ignore[override]
        x, dt, A, B, C, D, h0, entering = ctx.saved_tensors
        chunk = ctx.chunk
        ch = _Chunks(x, dt, A, B, C, chunk)
        batch, length, heads, headdim = x.shape
        n, Q, N, G = ch.n_chunks, chunk, ch.d_state, ch.groups
        rows, flat = batch * n, headdim * N
        if grad_y is None:
            grad_y = x.new_zeros(x.shape)
        grad_x = x.new_empty(x.shape)
        grad_dt = x.new_empty(dt.shape)
        grad_A = x.new_empty(heads)
        grad_D = None if D is None else x.new_empty(heads)
        grad_h0 = x.new_empty(h0.shape) if h0 is not None and ctx.needs_input_grad[6] else None
        grad_B = x.new_zeros(batch, ch.padded, G, N)
        grad_C = x.new_zeros(batch, ch.padded, G, N)
        grad_CB = x.new_zeros(batch, n, G, Q, Q)
        grad_Bc, grad_Cc = (t.view(batch, n, Q, G, N) for t in (grad_B, grad_C))
        xdt = x.new_zeros(batch, ch.padded, headdim)
        gy = x.new_zeros(batch, ch.padded, headdim)
        grad_xdt = x.new_empty(batch, ch.padded, headdim)
        decays, weights, grad_w = (x.new_empty(batch, n, Q, Q) for _ in range(3))
        scaled, grad_scaled = x.new_empty(batch, n, Q, N), x.new_empty(batch, n, Q, N)
        grad_read, grad_own = x.new_empty(batch, n, headdim, N), x.new_empty(batch, n, headdim, N)
        xq, gyq, gxq = (t.view(rows, Q, headdim) for t in (xdt, gy, grad_xdt))
        for h in range(heads):
            g, cum = h // ch.rep, ch.cum[:, h]
            Bg, Cg = ch.Bc[:, :, :, g], ch.Cc[:, :, :, g]
            states = entering[h].view(rows, headdim, N)
            torch.mul(x[:, :, h], dt[:, :, h, None], out=xdt[:, :length])
            gy[:, :length] = grad_y[:, :, h]
            grow = _decay_exp(cum)  # exp(cum_i): decay from the chunk start to i

            # 4. read-out y_i += exp(cum_i) C_i . H_c
            torch.mul(Cg, grow.unsqueeze(-1), out=scaled)
            torch.bmm(gyq.transpose(1, 2), scaled.view(rows, Q, N), out=grad_read.view(rows, headdim, N))
            torch.bmm(gyq, states, out=grad_scaled.view(rows, Q, N))
            grad_Cc[:, :, :, g].addcmul_(grad_scaled, grow.unsqueeze(-1))
            grad_cum = _rowdot(grad_scaled, Cg).mul_(grow)  # [B, n, Q]

            # 3. state passing, adjoint: the transposed chunk decays carry gradients back across chunks
            between = ch.between[:, h]
            own_flat = grad_own.view(batch, n, flat)
            torch.bmm(between[:, :n, 1:].transpose(1, 2), grad_read.view(batch, n, flat), out=own_flat)
            final_flat = None if grad_final is None else grad_final[:, h].reshape(batch, 1, flat)
            if final_flat is not None:
                own_flat.baddbmm_(between[:, n:, 1:].transpose(1, 2), final_flat)
            if grad_h0 is not None:
                start = between[:, :n, :1].transpose(1, 2) @ grad_read.view(batch, n, flat)
                if final_flat is not None:
                    start.addcmul_(between[:, n:, :1], final_flat)
                grad_h0[:, h] = start.view(batch, headdim, N)
            totals = cum[..., -1]
            grad_cum[..., -1] += _rowdot(own_flat, entering[h].view(batch, n, flat)).mul_(_decay_exp(totals))

            # 2. chunk states S_c = xdt^T (exp(cum_end - cum) B)
            to_end = _decay_exp(cum[..., -1:] - cum)
            torch.bmm(xq, grad_own.view(rows, headdim, N), out=grad_scaled.view(rows, Q, N))
            grad_to_end = _rowdot(grad_scaled, Bg).mul_(to_end)
            grad_cum -= grad_to_end
            grad_cum[..., -1] += grad_to_end.sum(-1)
            grad_Bc[:, :, :, g].addcmul_(grad_scaled, to_end.unsqueeze(-1))
            torch.mul(Bg, to_end.unsqueeze(-1), out=scaled)

            # 1. intra-chunk y = W xdt, W = (C B^T) o exp(segsum)
            _causal_decays(cum, decays)
            torch.mul(decays, ch.CB[:, :, g], out=weights)
            torch.bmm(weights.view(rows, Q, Q).transpose(1, 2), gyq, out=gxq)
            gxq.baddbmm_(scaled.view(rows, Q, N), grad_own.view(rows, headdim, N).transpose(1, 2))
            torch.bmm(gyq, xq.transpose(1, 2), out=grad_w.view(rows, Q, Q))
            grad_w.mul_(decays)
            grad_CB[:, :, g] += grad_w
            grad_w.mul_(ch.CB[:, :, g])  # now d(cum_i - cum_j)
            grad_cum += grad_w.sum(-1)
            grad_cum -= grad_w.sum(-2)

            # cum = cumsum(dt A) inside each chunk, xdt = dt x
            grad_dtA = grad_cum.flip(-1).cumsum(-1).flip(-1).view(batch, ch.padded)[:, :length]
            grad_xdt_h = grad_xdt[:, :length]
            grad_dt[:, :, h] = _rowdot(grad_xdt_h, x[:, :, h]).addcmul_(grad_dtA, A[h])
            grad_A[h] = _rowdot(grad_dtA, dt[:, :, h]).sum()
            torch.mul(grad_xdt_h, dt[:, :, h, None], out=grad_x[:, :, h])
            if D is not None:
                grad_x[:, :, h].addcmul_(grad_y[:, :, h], D[h])
                grad_D[h] = _rowdot(grad_y[:, :, h], x[:, :, h]).sum()
        for g in range(G):  # C B^T, shared by the heads of a group
            grad_Cc[:, :, :, g] += grad_CB[:, :, g] @ ch.Bc[:, :, :, g]
            grad_Bc[:, :, :, g] += grad_CB[:, :, g].transpose(-1, -2) @ ch.Cc[:, :, :, g]
        return grad_x, grad_dt, grad_A, grad_B[:, :length], grad_C[:, :length], grad_D, grad_h0, None


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    h0: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training / prefill path: the arguments and results of :func:`ssd_reference`, any length (chunks
    of ``chunk_size`` tokens, the last one padded), the final state differentiable too. Memory kept for
    backward: the inputs plus one [P, N] state per chunk and head."""
    _check_shapes(x, dt, A, B, C, D, h0)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: must be a positive integer")
    x, dt, A, B, C, D, h0 = _promoted(x, dt, A, B, C, D, h0)
    chunk = min(chunk_size, max(x.shape[1], 1))
    return _SSDChunkedFn.apply(x, dt, A, B, C, D, h0, chunk)
