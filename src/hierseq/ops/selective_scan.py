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


class _SelectiveScanFn(torch.autograd.Function):
    """(u, delta, A, B, C, h0) -> (y without the D skip [Bt, L, Di], last state [Bt, Di, N]).

    Saves the inputs and the states h [Bt, L, Di, N]; the decays are recomputed in backward (one exp),
    which is cheaper than keeping them.

    Backward, with G_t = dLoss/dh_t from the outputs (gy_t * C_t, plus the last-state gradient at L-1):
    the adjoint g_t = G_t + exp(delta_{t+1} A) g_{t+1} is one reverse scan; then
      dB_t = sum_d g_t * delta_t u_t,   d(delta_t u_t) = sum_n g_t B_t,   dC_t = sum_d gy_t h_t,
      q_t = g_t * exp(delta_t A) * h_{t-1}  (the gradient w.r.t. the log-decay delta_t A),
      dA = sum_{b,t} q_t delta_t,  d delta_t += sum_n q_t A,  dh0 = exp(delta_0 A) g_0.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0):  # type: ignore[override]
        decay = _decays(delta, A)
        states = (delta * u).unsqueeze(-1) * B.unsqueeze(2)  # drive, becomes the states in place
        if h0 is not None:
            states[:, 0].addcmul_(decay[:, 0], h0)
        batch, length, channels, d_state = states.shape
        _scan_forward_(decay.view(batch, length, -1), states.view(batch, length, -1))
        y = (states @ C.unsqueeze(-1)).squeeze(-1)
        last = states[:, -1].clone()
        ctx.save_for_backward(u, delta, A, B, C, h0, states)
        return y, last

    @staticmethod
    def backward(ctx, grad_y, grad_last):  # type: ignore[override]
        u, delta, A, B, C, h0, states = ctx.saved_tensors
        batch, length, channels, d_state = states.shape
        if grad_y is None:
            grad_y = u.new_zeros(u.shape)
        adjoint = grad_y.unsqueeze(-1) * C.unsqueeze(2)  # [Bt, L, Di, N]
        if grad_last is not None:
            adjoint[:, -1].add_(grad_last)
        decay = _decays(delta, A)
        if length > 1:
            # g_t = G_t + decay_{t+1} g_{t+1}: a reverse scan over t < L-1 with the coefficients decay[1:],
            # g_{L-1} = G_{L-1} folded into the last of those positions.
            coeff = decay[:, 1:].clone()
            inner = adjoint[:, :-1]
            inner[:, -1].addcmul_(coeff[:, -1], adjoint[:, -1])
            _scan_backward_(coeff.view(batch, length - 1, -1), inner.view(batch, length - 1, -1))
        grad_C = (grad_y.unsqueeze(2) @ states).squeeze(2)  # [Bt, L, N]
        grad_B = ((delta * u).unsqueeze(2) @ adjoint).squeeze(2)  # [Bt, L, N]
        grad_du = (adjoint @ B.unsqueeze(-1)).squeeze(-1)  # [Bt, L, Di]
        grad_h0 = decay[:, 0] * adjoint[:, 0] if h0 is not None and ctx.needs_input_grad[5] else None
        # q = g * decay * h_prev, built in the decay buffer (no longer needed after this).
        q = decay.mul_(adjoint)
        q[:, 1:].mul_(states[:, :-1])
        if h0 is not None:
            q[:, 0].mul_(h0)
        else:
            q[:, 0].zero_()
        # Elementwise products + reductions rather than einsum: torch lowers these two contractions to
        # bmm calls over tiny matrices (or permuted copies), 2-5x slower on CPU.
        grad_delta = grad_du * u + (q * A).sum(-1)
        grad_A = q.mul_(delta.unsqueeze(-1)).sum((0, 1))
        grad_u = grad_du * delta
        return grad_u, grad_delta, grad_A, grad_B, grad_C, grad_h0


@_scan_entry_point
def selective_scan(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, h0: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast selective scan for training and prefill: the arguments and results of
    :func:`selective_scan_reference` (the last state is differentiable too). Memory: O(Bt * L * Di * N)
    for the states, like any parallel Mamba-1 scan without a fused kernel."""
    dtype = torch.promote_types(u.dtype, A.dtype)
    return _SelectiveScanFn.apply(
        u.to(dtype).contiguous(),
        delta.to(dtype).contiguous(),
        A.to(dtype).contiguous(),
        B.to(dtype).contiguous(),
        C.to(dtype).contiguous(),
        None if h0 is None else h0.to(dtype).contiguous(),
    )
