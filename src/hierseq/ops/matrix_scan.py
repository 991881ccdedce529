"""The matrix-valued first-order recurrence X_c = M_c X_{c-1} + B_c, as chunked recurrent layers need it.

A delta-rule layer (``ops/delta_rule.py``) reduces each chunk of tokens to one affine map of its state,
S_end = M_c S_start + B_c with M_c: [p, p] and B_c: [p, q]. The states entering every chunk are then the
prefix compositions of these maps. Shapes: M: [*batch, n, p, p]; B: [*batch, n, p, q]; X0 (the state
before the first map): [*batch, p, q] or None (zeros); result X: [*batch, n, p, q], the state after
each map.

* :func:`matrix_scan_reference` is the definition: a loop over the n maps.
* :func:`matrix_scan` is the fast path: a work-efficient pairwise (odd-even) scan. Adjacent maps are
  composed into pairs, the half-length sequence is scanned recursively (log2(n) levels, each one
  batched matmul), and the states between the pairs are filled in with one more batched matmul.
  That is about 2n matrix products in all, against n log2(n) for a Hillis-Steele doubling scan; the
  maps of a delta-rule layer are contractions (decays <= 1, I - beta k k^T with |k| = 1), so every
  product stays bounded. The intermediates autograd keeps are about twice the size of M and B.
"""

from __future__ import annotations

import torch

__all__ = ["matrix_scan", "matrix_scan_reference"]


def _check(M: torch.Tensor, B: torch.Tensor, X0: torch.Tensor | None) -> None:
    if M.dim() < 3 or M.shape[-1] != M.shape[-2]:
        raise ValueError(f"M shape {tuple(M.shape)}: must be [*batch, n, p, p]")
    if B.shape[:-1] != M.shape[:-1]:
        raise ValueError(f"B shape {tuple(B.shape)}: must be [*batch, n, p, q] with M's {tuple(M.shape[:-1])}")
    if X0 is not None and (X0.shape[:-2] != M.shape[:-3] or X0.shape[-2:] != B.shape[-2:]):
        raise ValueError(f"X0 shape {tuple(X0.shape)}: must be [*batch, p, q] = {(*M.shape[:-3], *B.shape[-2:])}")


def matrix_scan_reference(M: torch.Tensor, B: torch.Tensor, X0: torch.Tensor | None = None) -> torch.Tensor:
    """Loop over the maps. M: [*batch, n, p, p]; B: [*batch, n, p, q]; X0: [*batch, p, q] or None ->
    X: [*batch, n, p, q] with X_c = M_c X_{c-1} + B_c."""
    _check(M, B, X0)
    X = torch.zeros_like(B[..., 0, :, :]) if X0 is None else X0
    states = []
    for c in range(M.shape[-3]):
        X = M[..., c, :, :] @ X + B[..., c, :, :]
        states.append(X)
    return torch.stack(states, dim=-3)


def _pairwise_scan(M: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Inclusive scan from a zero state (the recursion of :func:`matrix_scan`)."""
    n = M.shape[-3]
    if n == 1:
        return B
    half = n // 2
    # Strided slices are copied to contiguous blocks: batched matmuls on them are several times faster.
    M_even, M_odd = M[..., 0 : 2 * half : 2, :, :].contiguous(), M[..., 1 : 2 * half : 2, :, :].contiguous()
    B_even, B_odd = B[..., 0 : 2 * half : 2, :, :].contiguous(), B[..., 1 : 2 * half : 2, :, :].contiguous()
    # Pair i is map 2i then map 2i + 1; the composite's M is only needed if there is another level.
    pair_B = torch.baddbmm(B_odd.flatten(0, -3), M_odd.flatten(0, -3), B_even.flatten(0, -3)).view_as(B_odd)
    pair_M = (M_odd @ M_even) if half > 1 else M_odd
    X_odd = _pairwise_scan(pair_M, pair_B)  # the states after maps 1, 3, 5, ...
    # The state after map 2i (i >= 1) is map 2i applied to the state after map 2i - 1.
    M_rest, B_rest = M[..., 2::2, :, :].contiguous(), B[..., 2::2, :, :].contiguous()
    X_rest = torch.baddbmm(
        B_rest.flatten(0, -3), M_rest.flatten(0, -3), X_odd[..., : M_rest.shape[-3], :, :].contiguous().flatten(0, -3)
    ).view_as(B_rest)
    X_even = torch.cat((B[..., :1, :, :], X_rest), dim=-3)
    interleaved = torch.stack((X_even[..., :half, :, :], X_odd), dim=-3).flatten(-4, -3)
    return torch.cat((interleaved, X_even[..., half:, :, :]), dim=-3) if n % 2 else interleaved


def matrix_scan(M: torch.Tensor, B: torch.Tensor, X0: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`matrix_scan_reference` without a loop over the maps (same arguments and result)."""
    _check(M, B, X0)
    if M.shape[-3] == 0:
        return B.clone()
    if X0 is not None:  # fold the initial state into the first map's offset
        first = M[..., :1, :, :] @ X0.unsqueeze(-3) + B[..., :1, :, :]
        B = torch.cat((first, B[..., 1:, :, :]), dim=-3)
    return _pairwise_scan(M.contiguous(), B.contiguous())
