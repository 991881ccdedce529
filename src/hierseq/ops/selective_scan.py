"""Mamba's selective scan: the input-dependent diagonal SSM at the heart of a Mamba mixer.

For every batch row b, channel d and state index n::

    h_t[d, n] = exp(delta_t[d] * A[d, n]) * h_{t-1}[d, n] + delta_t[d] * B_t[n] * u_t[d]
    y_t[d]    = sum_n C_t[n] * h_t[d, n]  (+ D[d] * u_t[d] when D is given)

Shapes: u, delta: [Bt, L, Di]; A: [Di, N] (negative real parts); B, C: [Bt, L, N]; D: [Di];
h0 / last state: [Bt, Di, N]. ``delta`` is already positive (softplus applied by the caller).

Three paths that agree (tests/ops/test_selective_scan_op.py):

* :func:`selective_scan_reference` - the definition, a Python loop over time with plain autograd;
* :func:`selective_scan` - the training path: a custom autograd function that runs a work-efficient
  in-place Brent-Kung scan (log2(L) levels, no loop over tokens) forward, and the adjoint recurrence
  (the same scan run backwards in time) for the gradients;
* :func:`selective_scan_step` - one token, O(1) memory, for generation and streaming.

Numerical stability: the fast path only ever multiplies decays ``exp(delta * A)`` that lie in (0, 1]
and adds bounded terms, exactly like the sequential loop; it never forms ``exp`` of a growing
cumulative sum or divides by a running product (which underflows to 0 within a few hundred steps).

Memory layout: states are [Bt, L, Di, N], so at every scan level each time position is one
contiguous row of Di * N floats; the strided level slices then move whole rows, which is what makes
the scan fast on CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "selective_scan",
    "selective_scan_reference",
    "selective_scan_step",
]


ScanCore = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _scan_entry_point(core: ScanCore) -> Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """Give a scan ``core(u, delta, A, B, C, h0) -> (y, h_L)`` the public signature
    ``(u, delta, A, B, C, D=None, h0=None, return_last_state=False)``: shape checks, the skip term
    ``D * u`` and the optional last state are the same for every path, so they live here once."""

    def scan(
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor | None = None,
        h0: torch.Tensor | None = None,
        return_last_state: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if u.dim() != 3:
            raise ValueError(f"u: shape={tuple(u.shape)}: must be [batch, length, channels]")
        batch, length, channels = u.shape
        if delta.shape != u.shape:
            raise ValueError(f"delta: shape={tuple(delta.shape)}: must equal u's shape {tuple(u.shape)}")
        if A.dim() != 2 or A.shape[0] != channels:
            raise ValueError(f"A: shape={tuple(A.shape)}: must be [channels={channels}, d_state]")
        d_state = A.shape[1]
        for name, t in (("B", B), ("C", C)):
            if tuple(t.shape) != (batch, length, d_state):
                raise ValueError(
                    f"{name}: shape={tuple(t.shape)}: must be [batch, length, d_state] = {[batch, length, d_state]}"
                )
        if D is not None and tuple(D.shape) != (channels,):
            raise ValueError(f"D: shape={tuple(D.shape)}: must be [channels={channels}]")
        if h0 is not None and tuple(h0.shape) != (batch, channels, d_state):
            raise ValueError(
                f"h0: shape={tuple(h0.shape)}: must be [batch, channels, d_state] = {[batch, channels, d_state]}"
            )
        y, last = core(u, delta, A, B, C, h0)
        if D is not None:
            y = y + u * D
        return (y, last) if return_last_state else y

    scan.__name__, scan.__qualname__, scan.__doc__ = core.__name__, core.__qualname__, core.__doc__
    return scan


# ------------------------------------------------------------------------------------ reference
@_scan_entry_point
def selective_scan_reference(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, h0: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, one token at a time (slow; for tests and as documentation). Called as
    ``(u, delta, A, B, C, D=None, h0=None, return_last_state=False)``, shapes as in the module docstring;
    returns y: [Bt, L, Di] and, with ``return_last_state``, h_L: [Bt, Di, N]."""
    batch, length, channels = u.shape
    h = u.new_zeros(batch, channels, A.shape[1]) if h0 is None else h0
    ys = []
    for t in range(length):
        y_t, h = selective_scan_step(u[:, t], delta[:, t], A, B[:, t], C[:, t], None, h)
        ys.append(y_t)
    return torch.stack(ys, dim=1), h


def selective_scan_step(
    u_t: torch.Tensor,
    delta_t: torch.Tensor,
    A: torch.Tensor,
    B_t: torch.Tensor,
    C_t: torch.Tensor,
    D: torch.Tensor | None,
    h: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrent step in O(1) memory.

    u_t, delta_t: [Bt, Di]; A: [Di, N]; B_t, C_t: [Bt, N]; D: [Di] or None; h: [Bt, Di, N] or None
    (zeros). Returns (y_t [Bt, Di], new h [Bt, Di, N]).
    """
    decay = torch.exp(delta_t.unsqueeze(-1) * A)  # [Bt, Di, N], in (0, 1] since A < 0
    drive = (delta_t * u_t).unsqueeze(-1) * B_t.unsqueeze(1)  # [Bt, Di, N]
    h = drive if h is None else decay * h + drive
    y_t = (h @ C_t.unsqueeze(-1)).squeeze(-1)  # contract over N: [Bt, Di]
    if D is not None:
        y_t = y_t + D * u_t
    return y_t, h


# ----------------------------------------------------------------------------- in-place scan
def _scan_levels(length: int) -> list[int]:
    """Strides of the Brent-Kung up-sweep for a sequence of ``length``: 1, 2, 4, ... while 2s <= L."""
    strides = []
    s = 1
    while 2 * s <= length:
        strides.append(s)
        s *= 2
    return strides


def _scan_forward_(a: torch.Tensor, b: torch.Tensor) -> None:
    """In place: b[:, t] <- h_t with h_t = a_t * h_{t-1} + b_t, h_{-1} = 0. a, b: [Bt, L, M]; a is clobbered.

    Brent-Kung: the up-sweep combines pairs at strides 1, 2, 4, ..., so position i with (i + 1) % 2s == 0
    ends up holding the composition of the 2s pairs ending at i (its decay in a, its state-from-zero in
    b). The down-sweep then finishes the remaining positions, largest stride first: position i with
    lowbit(i + 1) == s absorbs the (already final) state at i - s. About 2L row-updates in total.
    """
    length = a.shape[1]
    strides = _scan_levels(length)
    for s in strides:
        later, earlier = slice(2 * s - 1, length, 2 * s), slice(s - 1, length - s, 2 * s)
        b[:, later].addcmul_(a[:, later], b[:, earlier])
        a[:, later].mul_(a[:, earlier])  # the block decay is needed by the next level and the down-sweep
    for s in reversed(strides):
        if 3 * s - 1 >= length:
            continue
        later, earlier = slice(3 * s - 1, length, 2 * s), slice(2 * s - 1, length - s, 2 * s)
        b[:, later].addcmul_(a[:, later], b[:, earlier])


def _scan_backward_(a: torch.Tensor, b: torch.Tensor) -> None:
    """In place, the same scan run from the end: b[:, t] <- g_t with g_t = a_t * g_{t+1} + b_t, g_L = 0.

    a, b: [Bt, L, M]; a is clobbered. Position t plays the role of L - 1 - t in :func:`_scan_forward_`;
    the mirrored index sets are again plain positive-step slices, so no flipped copies are needed.
    """
    length = a.shape[1]
    strides = _scan_levels(length)
    for s in strides:
        first = (length - 2 * s) % (2 * s)
        later, earlier = slice(first, length - 2 * s + 1, 2 * s), slice(first + s, length - s + 1, 2 * s)
        b[:, later].addcmul_(a[:, later], b[:, earlier])
        a[:, later].mul_(a[:, earlier])
    for s in reversed(strides):
        if 3 * s - 1 >= length:
            continue
        first = (length - 3 * s) % (2 * s)
        later, earlier = slice(first, length - 3 * s + 1, 2 * s), slice(first + s, length - 2 * s + 1, 2 * s)
        b[:, later].addcmul_(a[:, later], b[:, earlier])


def _decays(delta: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """exp(delta * A): [Bt, L, Di] x [Di, N] -> [Bt, L, Di, N], computed in place after one product."""
    return (delta.unsqueeze(-1) * A).exp_()


#: the scan runs over segments of time whose states [Bt, T, Di, N] hold about this many floats (8 MiB):
#: a segment's elementwise passes then stay in cache instead of streaming [Bt, L, Di, N] through
#: memory a dozen times, and only the state at every segment boundary is kept for backward, which
#: recomputes a segment's states from it (as the fused CUDA kernel does per chunk). Measured on this
#: machine, one thread, forward + backward: L=8192, Di=512, N=16: 1.4 s unsegmented, 1.0 s at 256
#: tokens; Bt=16, L=256, Di=384: 0.70 s unsegmented, 0.42 s at 32 tokens.
SEGMENT_FLOATS = 1 << 21


def segment_tokens(batch: int, channels: int, d_state: int) -> int:
    """Tokens per segment: the largest power of two whose states fit :data:`SEGMENT_FLOATS` (at least 1)."""
    tokens = max(1, SEGMENT_FLOATS // max(1, batch * channels * d_state))
    return 1 << (tokens.bit_length() - 1)


def _segment_states(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, h0: torch.Tensor | None, keep_decay: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(decays, states) of one segment [Bt, T, Di, N] from the state before it (None: zeros); the
    decays are clobbered by the scan unless ``keep_decay``."""
    decay = _decays(delta, A)
    states = (delta * u).unsqueeze(-1) * B.unsqueeze(2)  # drive, becomes the states in place
    if h0 is not None:
        states[:, 0].addcmul_(decay[:, 0], h0)
    batch, length = states.shape[:2]
    _scan_forward_((decay.clone() if keep_decay else decay).view(batch, length, -1), states.view(batch, length, -1))
    return decay, states


class _SelectiveScanFn(torch.autograd.Function):
    """(u, delta, A, B, C, h0) -> (y without the D skip [Bt, L, Di], last state [Bt, Di, N]).

    Runs segment by segment (:func:`segment_tokens`), carrying the state; saves the inputs and the
    state before every segment, and recomputes a segment's decays and states in backward.

    Backward, with G_t = dLoss/dh_t from the outputs (gy_t * C_t, plus the last-state gradient at L-1):
    the adjoint g_t = G_t + exp(delta_{t+1} A) g_{t+1} is one reverse scan per segment, from the last
    segment back, each started from the adjoint carried out of the segment after it; then
      dB_t = sum_d g_t * delta_t u_t,   d(delta_t u_t) = sum_n g_t B_t,   dC_t = sum_d gy_t h_t,
      q_t = g_t * exp(delta_t A) * h_{t-1}  (the gradient w.r.t. the log-decay delta_t A),
      dA = sum_{b,t} q_t delta_t,  d delta_t += sum_n q_t A,  dh0 = exp(delta_0 A) g_0.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0):  # type: ignore[override]
        (batch, length, channels), d_state = u.shape, A.shape[1]
        step = ctx.step = segment_tokens(batch, channels, d_state)
        y = torch.empty_like(u)
        starts = list(range(0, length, step))
        entering = []  # the state before each segment (None: zeros)
        h = h0
        for start in starts:
            seg = slice(start, start + step)
            entering.append(h)
            _, states = _segment_states(u[:, seg], delta[:, seg], A, B[:, seg], h, keep_decay=False)
            y[:, seg] = (states @ C[:, seg].unsqueeze(-1)).squeeze(-1)
            h = states[:, -1].clone()
        boundaries = torch.stack([u.new_zeros(h.shape) if e is None else e for e in entering], dim=1)
        ctx.save_for_backward(u, delta, A, B, C, h0, boundaries)
        return y, h

    @staticmethod
    def backward(ctx, grad_y, grad_last):  # type: ignore[override]
        u, delta, A, B, C, h0, boundaries = ctx.saved_tensors
        length = u.shape[1]
        if grad_y is None:
            grad_y = u.new_zeros(u.shape)
        grads = {name: torch.empty_like(t) for name, t in (("u", u), ("delta", delta), ("B", B), ("C", C))}
        grad_A = torch.zeros_like(A)
        carry = grad_last  # dLoss/dh at the segment's last position from outside it (None: nothing yet)
        next_decay = None  # exp(delta A) of the first token of the segment after this one
        grad_h0 = None
        for index in reversed(range(boundaries.shape[1])):
            seg = slice(index * ctx.step, min((index + 1) * ctx.step, length))
            h_before = None if index == 0 and h0 is None else (h0 if index == 0 else boundaries[:, index])
            u_s, delta_s, B_s, C_s, gy = u[:, seg], delta[:, seg], B[:, seg], C[:, seg], grad_y[:, seg]
            decay, states = _segment_states(u_s, delta_s, A, B_s, h_before, keep_decay=True)
            adjoint = gy.unsqueeze(-1) * C_s.unsqueeze(2)  # [Bt, T, Di, N]
            if carry is not None:
                # g_{last} = G_{last} + decay_{next} g_{next} (the segment after this one), or the
                # last-state gradient for the final segment.
                adjoint[:, -1].add_(carry if next_decay is None else next_decay * carry)
            batch, seg_len = adjoint.shape[:2]
            if seg_len > 1:
                # g_t = G_t + decay_{t+1} g_{t+1}: a reverse scan over t < T-1 with the coefficients
                # decay[1:], g_{T-1} folded into the last of those positions.
                coeff = decay[:, 1:].clone()
                inner = adjoint[:, :-1]
                inner[:, -1].addcmul_(coeff[:, -1], adjoint[:, -1])
                _scan_backward_(coeff.view(batch, seg_len - 1, -1), inner.view(batch, seg_len - 1, -1))
            grads["C"][:, seg] = (gy.unsqueeze(2) @ states).squeeze(2)  # [Bt, T, N]
            grads["B"][:, seg] = ((delta_s * u_s).unsqueeze(2) @ adjoint).squeeze(2)
            grad_du = (adjoint @ B_s.unsqueeze(-1)).squeeze(-1)  # [Bt, T, Di]
            if index == 0 and h0 is not None and ctx.needs_input_grad[5]:
                grad_h0 = decay[:, 0] * adjoint[:, 0]
            carry, next_decay = adjoint[:, 0].clone(), decay[:, 0].clone()
            # q = g * decay * h_prev, built in the decay buffer (no longer needed after this).
            q = decay.mul_(adjoint)
            q[:, 1:].mul_(states[:, :-1])
            if h_before is not None:
                q[:, 0].mul_(h_before)
            else:
                q[:, 0].zero_()
            # Elementwise products + reductions rather than einsum: torch lowers these two contractions
            # to bmm calls over tiny matrices (or permuted copies), 2-5x slower on CPU.
            grads["delta"][:, seg] = grad_du * u_s + (q * A).sum(-1)
            grad_A += q.mul_(delta_s.unsqueeze(-1)).sum((0, 1))
            grads["u"][:, seg] = grad_du * delta_s
        return grads["u"], grads["delta"], grad_A, grads["B"], grads["C"], grad_h0


@_scan_entry_point
def selective_scan(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, h0: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast selective scan for training and prefill: the arguments and results of
    :func:`selective_scan_reference` (the last state is differentiable too). Memory: the states of one
    segment (:func:`segment_tokens`) at a time plus one state per segment boundary, instead of
    the O(Bt * L * Di * N) states a parallel scan without a fused kernel keeps."""
    dtype = torch.promote_types(u.dtype, A.dtype)
    return _SelectiveScanFn.apply(
        u.to(dtype).contiguous(),
        delta.to(dtype).contiguous(),
        A.to(dtype).contiguous(),
        B.to(dtype).contiguous(),
        C.to(dtype).contiguous(),
        None if h0 is None else h0.to(dtype).contiguous(),
    )
