"""Redundancy game between candidates: certified epsilon-Nash gap, agreement with a plain per-row
projection-dynamics reference, a game that moves the weights, implicit gradients, and the sync-free
mode (fixed work, nothing read back from the device) giving the same certified equilibrium."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hierseq.ops.redundancy_game import (
    cosine_redundancy,
    redundancy_game_equilibrium,
    redundancy_game_nash_gap,
    redundancy_game_payoffs,
    redundancy_game_reference,
)
from hierseq.ops.simplex import sparsemax


def correlated(rows: int, size: int, dim: int, seed: int, dtype: torch.dtype = torch.float64):
    """Candidates that share a common part to a varying degree, so their cosines spread over (-1, 1)."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(rows, 1, dim, generator=gen, dtype=torch.float64)
    share = torch.rand(rows, size, 1, generator=gen, dtype=torch.float64) * 2 - 0.5
    outputs = share * common + torch.randn(rows, size, dim, generator=gen, dtype=torch.float64) * 0.7
    relevance = torch.randn(rows, size, generator=gen, dtype=torch.float64) * 0.5
    return outputs.to(dtype), relevance.to(dtype)


def random_mask(rows: int, size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, size, generator=gen) < 0.7
    mask[torch.arange(rows), torch.randint(size, (rows,), generator=gen)] = True
    return mask


@pytest.mark.parametrize("size", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.95])
@pytest.mark.parametrize("masked", [False, True])
def test_nash_gap_certificate_float64(size: int, gamma: float, masked: bool) -> None:
    outputs, relevance = correlated(400, size, 16, seed=size)
    mask = random_mask(400, size, seed=size) if masked else None
    w, gap = redundancy_game_equilibrium(outputs, relevance, gamma, 1.0, mask)
    assert gap.shape == (400,) and gap.max().item() <= 1e-4
    assert gap.max().item() <= 1e-12  # the solver is exact: the certificate is at rounding level
    assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones(400, dtype=w.dtype), atol=1e-12)
    if mask is not None:
        assert (w[~mask] == 0).all()
    # The certificate recomputed from the payoffs by hand: used candidates earn the best payoff.
    u = redundancy_game_payoffs(w, outputs, relevance, gamma, 1.0)
    allowed = torch.ones_like(w, dtype=torch.bool) if mask is None else mask
    best = u.masked_fill(~allowed, -torch.inf).amax(-1, keepdim=True)
    assert ((best - u) * (w > 0)).max().item() <= 1e-12


def test_nash_gap_float32() -> None:
    # Stated float32 bound: gap <= 1e-5 (payoffs of order 1, rounding ~ 1e-7 per entry). Measured 4e-7.
    outputs, relevance = correlated(4096, 4, 64, seed=1, dtype=torch.float32)
    w, gap = redundancy_game_equilibrium(outputs, relevance, 0.5, 1.0)
    assert w.dtype == torch.float32 and gap.max().item() <= 1e-5
    w64, _ = redundancy_game_equilibrium(outputs.double(), relevance.double(), 0.5, 1.0)
    assert (w.double() - w64).abs().max().item() <= 1e-5


def test_gap_detects_non_equilibria() -> None:
    outputs, relevance = correlated(200, 4, 16, seed=2)
    w, gap = redundancy_game_equilibrium(outputs, relevance, 0.8, 1.0)
    for other in (torch.softmax(relevance, -1), torch.full_like(w, 0.25), sparsemax(relevance)):
        other_gap = redundancy_game_nash_gap(other, outputs, relevance, 0.8, 1.0)
        assert other_gap.mean().item() > 1e-2 and (other_gap >= gap).all()


@pytest.mark.parametrize("size", [2, 4, 8])
def test_matches_plain_reference(size: int) -> None:
    outputs, relevance = correlated(24, size, 8, seed=10 + size)
    mask = random_mask(24, size, seed=size)
    w, _ = redundancy_game_equilibrium(outputs, relevance, 0.6, 1.0, mask)
    reference = redundancy_game_reference(outputs.numpy(), relevance.numpy(), 0.6, 1.0, mask.numpy())
    np.testing.assert_allclose(w.numpy(), reference, atol=1e-9, rtol=0)


def test_redundant_pair_shares_weight() -> None:
    # Scales a and b output the same vector, c an orthogonal one; gamma = 0.9, tau = 1.
    dim = 16
    a = torch.zeros(dim, dtype=torch.float64)
    a[0] = 4.0
    c = torch.zeros(dim, dtype=torch.float64)
    c[1] = 4.0
    outputs = torch.stack((a, a, c))[None]  # [1, 3, D]
    # Equal relevance: softmax(r) = sparsemax(r) = (1/3, 1/3, 1/3). At the equilibrium the pair
    # shares x = tau / (3 tau + gamma) = 0.2564 each and c gets 0.4872 (+0.154 over the prior).
    w, gap = redundancy_game_equilibrium(outputs, torch.zeros(1, 3, dtype=torch.float64), 0.9, 1.0)
    torch.testing.assert_close(w[0], torch.tensor([10 / 39, 10 / 39, 19 / 39], dtype=torch.float64), atol=1e-6, rtol=0)
    assert gap.item() <= 1e-12
    # Relevance favouring the pair, r = (0.3, 0.3, 0): softmax(r) = (0.365, 0.365, 0.270), the game
    # without interaction (gamma = 0) gives sparsemax(r) = (0.433, 0.433, 0.133), and with gamma = 0.9
    # the redundancy exactly offsets the pair's advantage: (1/3, 1/3, 1/3), c moves 0.133 -> 0.333.
    relevance = torch.tensor([[0.3, 0.3, 0.0]], dtype=torch.float64)
    w0, _ = redundancy_game_equilibrium(outputs, relevance, 0.0, 1.0)
    w, _ = redundancy_game_equilibrium(outputs, relevance, 0.9, 1.0)
    torch.testing.assert_close(w0[0], torch.tensor([13 / 30, 13 / 30, 4 / 30], dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(w[0], torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-6, rtol=0)
    assert (w[0] - torch.softmax(relevance[0], -1)).abs().max() > 0.06


def test_weights_move_away_from_the_prior() -> None:
    # Without interaction the equilibrium is sparsemax(r / tau), the prior.
    outputs, relevance = correlated(2000, 4, 32, seed=5)
    w0, _ = redundancy_game_equilibrium(outputs, relevance, 0.0, 1.0)
    torch.testing.assert_close(w0, sparsemax(relevance), atol=1e-12, rtol=0)
    # gamma = 0.9 on these correlated candidates (mean |cos| 0.26): measured mean ||w - prior||_1 over
    # rows 0.22 against sparsemax(r) and 0.68 against softmax(r); largest single weight change 0.45.
    w, _ = redundancy_game_equilibrium(outputs, relevance, 0.9, 1.0)
    moved = (w - w0).abs().sum(-1)
    assert moved.mean().item() > 0.15 and (w - w0).abs().max().item() > 0.3
    assert (w - torch.softmax(relevance, -1)).abs().sum(-1).mean().item() > 0.5


def test_gradcheck_outputs_relevance_strengths() -> None:
    outputs, relevance = correlated(5, 4, 3, seed=8)
    gamma = torch.tensor(0.7, dtype=torch.float64)
    tau = torch.tensor(1.2, dtype=torch.float64)
    w, _ = redundancy_game_equilibrium(outputs, relevance, gamma, tau)
    u = redundancy_game_payoffs(w, outputs, relevance, gamma, tau)
    best = u.amax(-1, keepdim=True)
    # A support that small steps keep: clear positive weights, clear losers off the support.
    assert w[w > 0].min() > 1e-3 and (best - u)[w == 0].min() > 1e-3 and (w == 0).any()
    inputs = tuple(x.clone().requires_grad_() for x in (outputs, relevance, gamma, tau))
    assert torch.autograd.gradcheck(lambda o, r, g, t: redundancy_game_equilibrium(o, r, g, t)[0], inputs)


def test_leading_dims_and_per_row_strengths() -> None:
    outputs, relevance = correlated(2 * 3 * 4, 5, 6, seed=12)
    gamma = torch.rand(2, 3, 4, dtype=torch.float64) * 0.9
    w, gap = redundancy_game_equilibrium(outputs.view(2, 3, 4, 5, 6), relevance.view(2, 3, 4, 5), gamma)
    assert w.shape == (2, 3, 4, 5) and gap.shape == (2, 3, 4) and gap.max().item() <= 1e-12
    for i in (0, 7, 23):
        single, _ = redundancy_game_equilibrium(outputs[i : i + 1], relevance[i : i + 1], gamma.flatten()[i].item())
        torch.testing.assert_close(w.reshape(24, 5)[i], single[0], atol=1e-12, rtol=0)


def test_cosine_redundancy_properties() -> None:
    outputs, _ = correlated(50, 4, 8, seed=3)
    c0 = cosine_redundancy(outputs)
    assert (torch.diagonal(c0, dim1=-2, dim2=-1) == 0).all() and torch.allclose(c0, c0.transpose(-1, -2))
    # C0 >= -I: the bound behind uniqueness for gamma < tau.
    assert torch.linalg.eigvalsh(c0).min().item() >= -1.0
    torch.testing.assert_close(cosine_redundancy(outputs * 3.0), c0, atol=1e-6, rtol=0)  # scale-free


def test_invalid_arguments() -> None:
    outputs, relevance = correlated(3, 4, 5, seed=0)
    with pytest.raises(ValueError, match="redundancy < crowding"):
        redundancy_game_equilibrium(outputs, relevance, 1.0, 1.0)
    with pytest.raises(ValueError, match="redundancy < crowding"):
        redundancy_game_equilibrium(outputs, relevance, 0.5, torch.tensor([1.0, 0.4, 1.0]))
    with pytest.raises(ValueError, match=">= 0"):
        redundancy_game_equilibrium(outputs, relevance, -0.1)
    with pytest.raises(ValueError, match="need"):
        redundancy_game_equilibrium(outputs, relevance[:, :3])
    with pytest.raises(ValueError, match="at least one True"):
        redundancy_game_equilibrium(outputs, relevance, mask=torch.zeros(3, 4, dtype=torch.bool))


# ------------------------------------------------------------------------------------ sync-free mode
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("masked", [False, True])
def test_sync_free_equilibrium_matches_and_is_certified(size: int, masked: bool) -> None:
    # Fixed work and no read-back (the mode a model's forward uses): the same equilibrium as the
    # default solver and the same certificate, gap <= 1e-12 in float64 (<= 1e-4 is the requirement).
    outputs, relevance = correlated(500, size, 16, seed=30 + size)
    mask = random_mask(500, size, seed=size) if masked else None
    for gamma in (0.0, 0.5, 0.95):
        reference, _ = redundancy_game_equilibrium(outputs, relevance, gamma, 1.0, mask)
        w, gap = redundancy_game_equilibrium(outputs, relevance, gamma, 1.0, mask, sync_free=True)
        torch.testing.assert_close(w, reference, atol=1e-9, rtol=0)
        assert gap.max().item() <= 1e-12


def test_sync_free_tensor_strengths_float32_and_no_read_back() -> None:
    outputs, relevance = correlated(4096, 4, 64, seed=1, dtype=torch.float32)
    gamma, tau = torch.tensor(0.6), torch.tensor(1.3)
    w, gap = redundancy_game_equilibrium(outputs, relevance, gamma, tau, sync_free=True)
    w64, _ = redundancy_game_equilibrium(outputs.double(), relevance.double(), 0.6, 1.3)
    assert gap.max().item() <= 1e-5 and (w.double() - w64).abs().max().item() <= 1e-5
    # Meta tensors carry no values: anything that reads the device raises. The sync-free solve runs.
    meta = outputs[:8].to("meta").requires_grad_()
    w, gap = redundancy_game_equilibrium(
        meta, relevance[:8].to("meta"), gamma.to("meta"), tau.to("meta"), sync_free=True
    )
    w.sum().backward()
    assert w.shape == (8, 4) and gap.shape == (8,) and meta.grad.shape == meta.shape
    # Python-number strengths are still checked in sync-free mode (that reads nothing from the device).
    with pytest.raises(ValueError, match="redundancy < crowding"):
        redundancy_game_equilibrium(outputs, relevance, 1.0, 1.0, sync_free=True)
