"""Per-node linear maps over windows: every window of a sequence is served by one of N nodes, each node
with its own weight matrix, and all windows are computed in one batched matrix product.

Assignment rule (the one HAMA uses): window ``w`` is served by node ``w mod N``, so neighbouring windows
go to different nodes and every node sees windows from the whole sequence.

``node_linear(x [B, W, S, D_in], weight [N, D_in, D_out], bias [N, D_out] | None) -> [B, W, S, D_out]``
pads the windows to a multiple of N, regroups them as [N, B * ceil(W / N) * S, D_in] and runs one
``torch.baddbmm``; the padding rows (fewer than N windows) are dropped again. ``node_linear_reference``
loops over windows and is the definition the tests compare against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def node_of_window(windows: int, nodes: int, device: torch.device | None = None) -> torch.Tensor:
    """[W] long: the node serving every window (``w mod N``)."""
    return torch.arange(windows, device=device) % nodes


def node_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, W, S, D_in] (window w served by node w mod N), weight [N, D_in, D_out], bias [N, D_out]
    -> [B, W, S, D_out]: ``x[:, w] @ weight[w % N] + bias[w % N]`` for every window, in one bmm."""
    B, W, S, D_in = x.shape
    N, _, D_out = weight.shape
    if N == 1:  # shared weights: a plain matmul, no regrouping
        y = x @ weight[0]
        return y if bias is None else y + bias[0]
    groups = -(-W // N)
    if groups * N != W:
        x = F.pad(x, (0, 0, 0, 0, 0, groups * N - W))
    # [B, G, N, S, D] -> [N, B * G * S, D]: window g * N + n lands in node n's rows.
    rows = x.view(B, groups, N, S, D_in).permute(2, 0, 1, 3, 4).reshape(N, B * groups * S, D_in)
    y = torch.bmm(rows, weight) if bias is None else torch.baddbmm(bias[:, None, :], rows, weight)
    y = y.view(N, B, groups, S, D_out).permute(1, 2, 0, 3, 4).reshape(B, groups * N, S, D_out)
    return y[:, :W]


def node_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The definition, one window at a time (tests only)."""
    N = weight.shape[0]
    outs = []
    for w in range(x.shape[1]):
        y = x[:, w] @ weight[w % N]
        outs.append(y if bias is None else y + bias[w % N])
    return torch.stack(outs, dim=1)
