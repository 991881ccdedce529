"""Checks shared by the mixer tests: one mixer alone, through the mixer signature."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


def run_in_segments(
    mixer: nn.Module,
    x: torch.Tensor,
    sizes: Sequence[int],
    on_step: Callable[[Any, Any, int], None] | None = None,
) -> tuple[torch.Tensor, Any]:
    """Feed x: [B, L, D] in pieces of ``sizes`` (summing to L), carrying the state; returns the outputs
    concatenated [B, L, D] and the final state. ``on_step(given, returned, tokens_so_far)`` sees the
    state passed in and the one returned by every call."""
    assert sum(sizes) == x.shape[1], f"segments {list(sizes)} do not cover length {x.shape[1]}"
    state, pieces, start = None, [], 0
    for size in sizes:
        y, returned, _ = mixer(x[:, start : start + size], state, use_cache=True)
        start += size
        if on_step is not None:
            on_step(state, returned, start)
        state = returned
        pieces.append(y)
    return torch.cat(pieces, 1), state


def assert_causal_by_perturbation(mixer: nn.Module, x: torch.Tensor, t: int, seed: int = 5) -> None:
    """Changing the inputs from position t on leaves the outputs before t unchanged, and changes them from t on."""
    perturbed = x.clone()
    perturbed[:, t:] += torch.randn(x[:, t:].shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y, y_perturbed = mixer(x)[0], mixer(perturbed)[0]
    torch.testing.assert_close(y_perturbed[:, :t], y[:, :t], rtol=0, atol=1e-6)
    assert (y_perturbed[:, t:] - y[:, t:]).abs().max() > 1e-3


def _state_tensors(state: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    state.map(lambda t: found.append(t) or t)
    return found


def assert_carried_state_then_detach(mixer: nn.Module, x: torch.Tensor, split: int) -> None:
    """TBPTT building block: two calls with the carried state equal one call on x (x: [B, L, D]); the
    gradient flows through every tensor of the state into the first segment until ``detach()`` (in place,
    values kept) cuts it."""
    x = x.detach().requires_grad_()
    first, state, _ = mixer(x[:, :split], use_cache=True)
    second, state, _ = mixer(x[:, split:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), mixer(x)[0], rtol=1e-4, atol=1e-5)
    assert all(t.requires_grad for t in _state_tensors(state)), "a carried state tensor has no graph"
    (grad,) = torch.autograd.grad(second.square().sum(), x)
    assert grad[:, :split].abs().sum() > 0 and grad[:, split:].abs().sum() > 0

    _, state, _ = mixer(x[:, :split], use_cache=True)
    values = state.clone()
    assert state.detach() is state
    assert not any(t.requires_grad for t in _state_tensors(state)), "detach() left a graph"
    assert all(torch.equal(a, b) for a, b in zip(_state_tensors(state), _state_tensors(values)))
    second, _, _ = mixer(x[:, split:], state)
    (grad,) = torch.autograd.grad(second.square().sum(), x)
    assert grad[:, :split].abs().sum() == 0 and grad[:, split:].abs().sum() > 0
