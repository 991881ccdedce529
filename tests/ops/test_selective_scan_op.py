"""The fast selective scan equals the sequential reference (values and gradients); step equals both."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hierseq.ops.selective_scan import (
    _scan_backward_,
    _scan_forward_,
    selective_scan,
    selective_scan_reference,
    selective_scan_step,
)


def make_inputs(batch: int, length: int, channels: int, d_state: int, seed: int, with_h0: bool = False):
    """Random scan inputs like a Mamba mixer produces them (delta = softplus(...) > 0, A < 0)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    inputs = {
        "u": randn(batch, length, channels),
        "delta": F.softplus(randn(batch, length, channels) - 1.0),
        "A": -torch.exp(randn(channels, d_state)),
        "B": randn(batch, length, d_state),
        "C": randn(batch, length, d_state),
        "D": randn(channels),
        "h0": randn(batch, channels, d_state) if with_h0 else None,
    }
    for t in inputs.values():
        if t is not None:
            t.requires_grad_(True)
    return inputs


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)


def outputs_and_grads(fn, inputs, seed: int = 0):
    y, last = fn(**inputs, return_last_state=True)
    gen = torch.Generator().manual_seed(seed + 100)
    weight_y = torch.randn(y.shape, generator=gen)
    weight_last = torch.randn(last.shape, generator=gen)
    leaves = [t for t in inputs.values() if t is not None]
    grads = torch.autograd.grad((y * weight_y).sum() + (last * weight_last).sum(), leaves)
    return y.detach(), last.detach(), grads


@pytest.mark.parametrize("length", [1, 7, 64, 1000, 4096])
def test_fast_equals_reference_forward_and_backward(length: int) -> None:
    channels, d_state = (4, 3) if length >= 1000 else (6, 5)
    inputs = make_inputs(2 if length < 4096 else 1, length, channels, d_state, seed=length, with_h0=length % 2 == 1)
    y_ref, last_ref, grads_ref = outputs_and_grads(selective_scan_reference, inputs)
    y_fast, last_fast, grads_fast = outputs_and_grads(selective_scan, inputs)
    assert rel_err(y_fast, y_ref) < 1e-5
    assert rel_err(last_fast, last_ref) < 1e-5
    names = [k for k, v in inputs.items() if v is not None]
    for name, g_fast, g_ref in zip(names, grads_fast, grads_ref):
        assert rel_err(g_fast, g_ref) < 1e-5, f"grad of {name}: relative error {rel_err(g_fast, g_ref):.2e}"


@pytest.mark.parametrize("length", [2, 3, 5, 6, 9, 31, 33, 100])
def test_in_place_scans_match_loops_in_float64(length: int) -> None:
    """Both Brent-Kung directions at lengths that are not powers of two, to rounding in float64."""
    gen = torch.Generator().manual_seed(length)
    a = torch.rand(2, length, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(2, length, 3, generator=gen, dtype=torch.float64)
    forward, backward = torch.empty_like(b), torch.empty_like(b)
    h = torch.zeros(2, 3, dtype=torch.float64)
    for t in range(length):
        h = a[:, t] * h + b[:, t]
        forward[:, t] = h
    g = torch.zeros(2, 3, dtype=torch.float64)
    for t in reversed(range(length)):
        g = a[:, t] * g + b[:, t]
        backward[:, t] = g
    fa, fb = a.clone(), b.clone()
    _scan_forward_(fa, fb)
    ba, bb = a.clone(), b.clone()
    _scan_backward_(ba, bb)
    torch.testing.assert_close(fb, forward, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bb, backward, rtol=1e-12, atol=1e-12)


def test_step_equals_fast_path() -> None:
    inputs = {k: (v.detach() if v is not None else None) for k, v in make_inputs(2, 20, 5, 4, seed=3).items()}
    y_fast, last_fast = selective_scan(**inputs, return_last_state=True)
    h = None
    for t in range(20):
        y_t, h = selective_scan_step(
            inputs["u"][:, t], inputs["delta"][:, t], inputs["A"], inputs["B"][:, t], inputs["C"][:, t], inputs["D"], h
        )
        torch.testing.assert_close(y_t, y_fast[:, t], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, last_fast, rtol=1e-5, atol=1e-5)


def test_continuing_from_last_state_equals_one_pass() -> None:
    inputs = {k: (v.detach() if v is not None else None) for k, v in make_inputs(2, 50, 5, 4, seed=4).items()}
    y_all = selective_scan(**inputs)
    first = {k: (v[:, :30] if k in ("u", "delta", "B", "C") else v) for k, v in inputs.items()}
    second = {k: (v[:, 30:] if k in ("u", "delta", "B", "C") else v) for k, v in inputs.items()}
    y1, h = selective_scan(**first, return_last_state=True)
    second["h0"] = h
    y2 = selective_scan(**second)
    torch.testing.assert_close(torch.cat((y1, y2), dim=1), y_all, rtol=1e-5, atol=1e-5)


def test_stable_for_long_sequences_with_extreme_decays() -> None:
    """Decays from exp(-50) (state wiped each step) to exp(-1e-6) (near-perfect memory) over 8192 steps:
    no under/overflow, and with near-perfect memory a constant drive accumulates linearly."""
    length, channels = 8192, 2
    u = torch.ones(1, length, channels)
    delta = torch.full((1, length, channels), 1.0)
    A = torch.tensor([[-50.0], [-1e-6]])
    B = torch.ones(1, length, 1)
    C = torch.ones(1, length, 1)
    y = selective_scan(u, delta, A, B, C)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[0, :, 0], torch.ones(length))  # forgets everything: y_t = drive_t = 1
    # Remembers almost everything: y_t = sum_{k<t} r^k = (1 - r^t) / (1 - r), r the fp32 decay, in float64.
    r = torch.exp(torch.tensor(-1e-6)).double()
    t = torch.arange(1, length + 1, dtype=torch.float64)
    expected = (1 - r**t) / (1 - r)
    assert rel_err(y[0, :, 1].double(), expected) < 1e-5


def test_shape_errors_name_the_argument() -> None:
    inputs = {k: (v.detach() if v is not None else None) for k, v in make_inputs(2, 5, 3, 4, seed=0).items()}
    with pytest.raises(ValueError, match="delta"):
        selective_scan(**{**inputs, "delta": inputs["delta"][:, :4]})
    with pytest.raises(ValueError, match="A"):
        selective_scan(**{**inputs, "A": inputs["A"][:2]})
    with pytest.raises(ValueError, match="h0"):
        selective_scan(**{**inputs, "h0": torch.zeros(2, 3, 5)})
    with pytest.raises(ValueError, match="u"):
        selective_scan_reference(**{**inputs, "u": inputs["u"][0]})


@pytest.mark.parametrize("segment", [1, 4, 16, 64])
@pytest.mark.parametrize("with_h0", [False, True], ids=["zeros", "h0"])
def test_segments_equal_one_pass(monkeypatch: pytest.MonkeyPatch, segment: int, with_h0: bool) -> None:
    # Long sequences are scanned a segment at a time, keeping only the boundary states for backward.
    from hierseq.ops import selective_scan as module

    inputs = make_inputs(2, 37, 6, 5, seed=3, with_h0=with_h0)
    whole = outputs_and_grads(selective_scan, inputs)
    monkeypatch.setattr(module, "SEGMENT_FLOATS", segment * 2 * 6 * 5)  # batch x channels x d_state
    assert module.segment_tokens(2, 6, 5) == segment
    split = outputs_and_grads(selective_scan, inputs)
    for a, b in zip((split[0], split[1], *split[2]), (whole[0], whole[1], *whole[2]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
