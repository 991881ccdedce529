"""The SSD op (Mamba-2): the chunked path with its hand-written backward, and the same chunk form under
autograd, equal the loop over time in values, final state and every gradient; the loop equals the
quadratic (attention-like) form of the definition; steps continue a chunked prefill; strong decays;
what backward keeps; a broken decay is caught."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hierseq.ops import ssd
from hierseq.ops.ssd import ssd_chunked, ssd_chunked_autograd, ssd_reference, ssd_step

CHUNK = 16
NAMES = ("x", "dt", "A", "B", "C", "D", "h0")


def make_inputs(
    length: int,
    groups: int = 1,
    with_h0: bool = True,
    batch: int = 2,
    heads: int = 4,
    headdim: int = 5,
    d_state: int = 6,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    log_dt_range: tuple[float, float] = (-4.0, 0.0),
) -> dict[str, torch.Tensor | None]:
    """Inputs as a Mamba-2 mixer makes them: dt > 0, A < 0 (so dt * A spans small to strong decays)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype)

    lo, hi = log_dt_range
    inputs = {
        "x": randn(batch, length, heads, headdim),
        "dt": torch.exp(lo + (hi - lo) * torch.rand(batch, length, heads, generator=gen, dtype=dtype)),
        "A": -torch.linspace(1.0, 16.0, heads, dtype=dtype),
        "B": randn(batch, length, groups, d_state),
        "C": randn(batch, length, groups, d_state),
        "D": randn(heads),
        "h0": randn(batch, heads, headdim, d_state) if with_h0 else None,
    }
    for t in inputs.values():
        if t is not None:
            t.requires_grad_(True)
    return inputs


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)


def outputs_and_grads(fn, inputs: dict, **kwargs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(y, final state) and the gradients of a random linear function of both w.r.t. every input."""
    y, last = fn(*inputs.values(), **kwargs)
    gen = torch.Generator().manual_seed(123)
    loss = (y * torch.randn(y.shape, generator=gen)).sum() + (last * torch.randn(last.shape, generator=gen)).sum()
    leaves = [t for t in inputs.values() if t is not None]
    return [y.detach(), last.detach()], list(torch.autograd.grad(loss, leaves))


def assert_all_close(got: tuple[list, list], want: tuple[list, list], inputs: dict, tol: float = 1e-5) -> None:
    names = ["y", "final state"] + [f"grad {k}" for k, v in inputs.items() if v is not None]
    for name, g, w in zip(names, got[0] + got[1], want[0] + want[1]):
        assert torch.isfinite(g).all(), f"{name}: not finite"
        assert rel_err(g, w) < tol, f"{name}: relative error {rel_err(g, w):.2e}"


@pytest.mark.parametrize("length", [1, CHUNK - 1, CHUNK, 37, 5 * CHUNK])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "no-h0"])
@pytest.mark.parametrize("fn", [ssd_chunked, ssd_chunked_autograd], ids=["hand-backward", "autograd"])
def test_chunked_equals_reference(fn, length: int, groups: int, with_h0: bool) -> None:
    inputs = make_inputs(length, groups, with_h0, seed=length + 10 * groups)
    want = outputs_and_grads(ssd_reference, inputs)
    assert_all_close(outputs_and_grads(fn, inputs, chunk_size=CHUNK), want, inputs)


def quadratic_form(x, dt, A, B, C, D, h0):
    """The definition unrolled: y_t = sum_{s <= t} (C_t . B_s) exp(sum_{s < r <= t} dt_r A) dt_s x_s
    + exp(sum_{r <= t} dt_r A) h0 C_t + D x_t, as [L, L] matrices (float64, small L only)."""
    heads = x.shape[2]
    rep = heads // B.shape[2]
    Bh, Ch = B.repeat_interleave(rep, dim=2), C.repeat_interleave(rep, dim=2)  # [b, L, H, N]
    cum = torch.cumsum(dt * A, dim=1)  # [b, L, H]
    span = cum.unsqueeze(2) - cum.unsqueeze(1)  # [b, t, s, H]: sum over s < r <= t
    causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
    decay = torch.where(causal[None, :, :, None], span, float("-inf")).exp()
    scores = torch.einsum("bthn,bshn->btsh", Ch, Bh) * decay
    y = torch.einsum("btsh,bsh,bshp->bthp", scores, dt, x)
    y = y + torch.einsum("bth,bhpn,bthn->bthp", cum.exp(), h0, Ch) + D[:, None] * x
    final = torch.einsum("bsh,bsh,bshp,bshn->bhpn", (cum[:, -1:] - cum).exp(), dt, x, Bh)
    return y, final + cum[:, -1, :, None, None].exp() * h0


@pytest.mark.parametrize("groups", [1, 2])
def test_reference_equals_the_quadratic_form(groups: int) -> None:
    inputs = make_inputs(23, groups, dtype=torch.float64)
    y, last = ssd_reference(*inputs.values())
    y_q, last_q = quadratic_form(*inputs.values())
    assert rel_err(y, y_q) < 1e-12 and rel_err(last, last_q) < 1e-12


def test_steps_continue_a_chunked_prefill() -> None:
    inputs = make_inputs(3 * CHUNK + 5, groups=2)
    x, dt, A, B, C, D, h0 = (None if t is None else t.detach() for t in inputs.values())
    y_full, last_full = ssd_chunked(x, dt, A, B, C, D, h0, chunk_size=CHUNK)
    split = 2 * CHUNK + 3
    y_pre, state = ssd_chunked(x[:, :split], dt[:, :split], A, B[:, :split], C[:, :split], D, h0, chunk_size=CHUNK)
    steps = [y_pre]
    for t in range(split, x.shape[1]):
        y_t, state = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], D, state)
        steps.append(y_t.unsqueeze(1))
    assert rel_err(torch.cat(steps, 1), y_full) < 1e-5 and rel_err(state, last_full) < 1e-5
    # a step from no state is a step from zeros
    y0, s0 = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, None)
    y0_zero, s0_zero = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, torch.zeros_like(h0))
    assert torch.equal(y0, y0_zero) and torch.equal(s0, s0_zero)


@pytest.mark.parametrize("fn", [ssd_chunked, ssd_chunked_autograd], ids=["hand-backward", "autograd"])
def test_strong_and_mixed_decays_stay_finite_and_equal(fn) -> None:
    """dt A down to -16 per step (A up to 16, dt up to 1), next to decays of 1e-4 per step: within a chunk
    and across chunks; the chunk-level cumulative sums reach ~-1e4."""
    inputs = make_inputs(6 * CHUNK + 3, groups=2, log_dt_range=(-9.0, 0.0), seed=3)
    with torch.no_grad():  # whole chunks of strong decay, then of weak decay
        inputs["dt"][:, : 2 * CHUNK] = 1.0
        inputs["dt"][:, 4 * CHUNK :] = 1e-4
    assert (inputs["dt"] * inputs["A"]).min() <= -10.0
    want = outputs_and_grads(ssd_reference, inputs)
    assert_all_close(outputs_and_grads(fn, inputs, chunk_size=CHUNK), want, inputs)


def test_strided_inputs_as_a_mixer_passes_them() -> None:
    """x, B, C as views of one [B, L, H P + 2 G N] tensor (the mixer's conv output), dt as a view too."""
    inputs = make_inputs(41, groups=2, with_h0=False)
    x, dt, A, B, C, D, _ = (None if t is None else t.detach() for t in inputs.values())
    batch, length, heads, headdim = x.shape
    packed = torch.cat((x.flatten(2), B.flatten(2), C.flatten(2), dt), dim=-1).requires_grad_()
    widths = (heads * headdim, B[0, 0].numel(), C[0, 0].numel(), heads)
    xs, Bs, Cs, dts = packed.split(widths, dim=-1)
    views = (xs.unflatten(-1, x.shape[2:]), dts, A, Bs.unflatten(-1, B.shape[2:]), Cs.unflatten(-1, C.shape[2:]), D)
    y, last = ssd_chunked(*views, chunk_size=CHUNK)
    (grad,) = torch.autograd.grad(y.square().sum() + last.sum(), packed)
    contiguous = [t.contiguous().detach().requires_grad_() for t in views[:5]]
    y_ref, last_ref = ssd_reference(*contiguous, D)
    grads_ref = torch.autograd.grad(y_ref.square().sum() + last_ref.sum(), [contiguous[i] for i in (0, 3, 4, 1)])
    assert rel_err(y, y_ref) < 1e-5 and rel_err(last, last_ref) < 1e-5
    for got, want in zip(grad.split(widths, dim=-1), grads_ref):
        assert rel_err(got, want.flatten(2)) < 1e-5


def test_backward_keeps_only_the_inputs_and_one_state_per_chunk() -> None:
    """What the hand-written backward saves beyond its inputs: the [H, B, n, P, N] entering states, P N / Q
    floats per token and head; autograd through the chunk form keeps several [B, H, n, Q, Q] blocks more."""
    length, heads, headdim, d_state = 8 * CHUNK, 4, 8, 8
    inputs = make_inputs(length, with_h0=False, heads=heads, headdim=headdim, d_state=d_state, batch=1)
    given = {t.untyped_storage().data_ptr() for t in inputs.values() if t is not None}

    def saved_floats(fn) -> int:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in given:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(*inputs.values(), chunk_size=CHUNK)
        return sum(storages.values())

    per_chunk_states = (length // CHUNK) * heads * headdim * d_state
    assert saved_floats(ssd_chunked) == per_chunk_states
    assert saved_floats(ssd_chunked_autograd) > 5 * per_chunk_states


def test_the_comparison_catches_a_wrong_decay(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks above can fail: without the decay between chunks (every state passed on at full
    strength) the output and gradients differ from the reference far beyond the tolerance."""
    inputs = make_inputs(4 * CHUNK, seed=5)
    want = outputs_and_grads(ssd_reference, inputs)
    assert_all_close(outputs_and_grads(ssd_chunked, inputs, chunk_size=CHUNK), want, inputs)

    def no_decay_between_chunks(totals: torch.Tensor) -> torch.Tensor:
        return ssd._causal_decays(torch.zeros_like(totals[..., :1]).expand(*totals.shape[:-1], totals.shape[-1] + 1))

    monkeypatch.setattr(ssd, "_chunk_decays", no_decay_between_chunks)
    for fn in (ssd_chunked, ssd_chunked_autograd):
        got = outputs_and_grads(fn, inputs, chunk_size=CHUNK)
        assert rel_err(got[0][0], want[0][0]) > 1e-2 and rel_err(got[0][1], want[0][1]) > 1e-2
        with pytest.raises(AssertionError, match="relative error"):
            assert_all_close(got, want, inputs)


def test_chunk_size_does_not_change_the_result() -> None:
    inputs = make_inputs(50, groups=2)
    args = [None if t is None else t.detach() for t in inputs.values()]
    y, last = ssd_chunked(*args, chunk_size=CHUNK)
    for chunk in (1, 7, 64, 1000):
        y_c, last_c = ssd_chunked(*args, chunk_size=chunk)
        assert rel_err(y_c, y) < 1e-5 and rel_err(last_c, last) < 1e-5


def test_bad_arguments_name_the_argument() -> None:
    x, dt, A, B, C, D, h0 = (None if t is None else t.detach() for t in make_inputs(8, groups=2).values())
    cases = [
        ((x[0], dt, A, B, C), "x: shape"),
        ((x, dt[..., :1], A, B, C), "dt: shape"),
        ((x, dt, A[:1], B, C), "A: shape"),
        ((x, dt, A, F.pad(B, (0, 0, 0, 1)), C), "B: shape"),  # 3 groups do not divide 4 heads
        ((x, dt, A, B, C[..., :1]), "C: shape"),
        ((x, dt, A, B, C, D[:1]), "D: shape"),
        ((x, dt, A, B, C, D, h0[..., :1]), "h0: shape"),
    ]
    for fn in (ssd_chunked, ssd_chunked_autograd, ssd_reference):
        for args, match in cases:
            with pytest.raises(ValueError, match=match):
                fn(*args)
    with pytest.raises(ValueError, match="chunk_size=0"):
        ssd_chunked(x, dt, A, B, C, chunk_size=0)
