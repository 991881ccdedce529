"""node_linear (one bmm over all windows) against its per-window reference: values and gradients."""

from __future__ import annotations

import pytest
import torch

from hierseq.ops.node_linear import node_linear, node_linear_reference, node_of_window


@pytest.mark.parametrize("windows,nodes,bias", [(8, 4, True), (7, 3, True), (5, 1, False), (2, 4, True), (6, 2, False)])
def test_node_linear_matches_reference_values_and_gradients(windows: int, nodes: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(windows * 10 + nodes)
    x = torch.randn(3, windows, 5, 6, generator=gen, requires_grad=True)
    weight = torch.randn(nodes, 6, 4, generator=gen, requires_grad=True)
    b = torch.randn(nodes, 4, generator=gen, requires_grad=True) if bias else None
    upstream = torch.randn(3, windows, 5, 4, generator=gen)
    fast, ref = node_linear(x, weight, b), node_linear_reference(x, weight, b)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    inputs = (x, weight) + ((b,) if bias else ())
    g_fast = torch.autograd.grad((fast * upstream).sum(), inputs)
    g_ref = torch.autograd.grad((ref * upstream).sum(), inputs)
    for a, r in zip(g_fast, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_window_w_uses_node_w_mod_n() -> None:
    assert node_of_window(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    x = torch.ones(1, 4, 1, 1)
    weight = torch.tensor([1.0, 10.0]).view(2, 1, 1)
    assert node_linear(x, weight).flatten().tolist() == [1.0, 10.0, 1.0, 10.0]
