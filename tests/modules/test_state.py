"""The decoding-state protocol: detach, reorder, clone, size and the plain-data round trip (TBPTT
checkpoints), written once for every layer-state type, nested ones included."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hierseq.modules.state import DecodingState, LayerState


@dataclasses.dataclass
class _Pair(LayerState):
    conv: torch.Tensor
    memory: torch.Tensor


@dataclasses.dataclass
class _Nested(LayerState):
    """Ints, None, lists, tuples and a nested layer state, as in MAHA's and the tree's states."""

    count: int = 0
    inner: _Pair | None = None
    per_scale: list = dataclasses.field(default_factory=list)
    slots: list = dataclasses.field(default_factory=list)


def _filled() -> DecodingState:
    state = DecodingState(3)
    w = torch.ones((), requires_grad=True)
    state.layers[0] = _Pair(torch.arange(6.0).reshape(3, 2) * w, torch.arange(12.0).reshape(3, 4) * w)
    state.layers[2] = _Nested(
        count=5,
        inner=_Pair(torch.zeros(3, 1), torch.full((3, 2, 2), 2.0) * w),
        per_scale=[None, torch.arange(3.0).reshape(3, 1), 7],
        slots=[None, (torch.ones(3, 2), torch.arange(3.0).reshape(3, 1) * w)],
    )
    state.length = 17
    return state


def _tensors(layer: LayerState) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    layer.map(lambda t: found.append(t) or t)
    return found


def test_detach_cuts_the_graph_in_place_and_keeps_values() -> None:
    state = _filled()
    before = [[t.clone() for t in _tensors(s)] for s in (state.layers[0], state.layers[2])]
    layer0 = state.layers[0]
    assert state.detach() is state and state.layers[0] is layer0
    for s, old in zip((state.layers[0], state.layers[2]), before):
        assert all(t.grad_fn is None for t in _tensors(s))
        assert all(torch.equal(a, b) for a, b in zip(old, _tensors(s)))
    assert state.layers[1] is None and state.length == 17 and state.layers[2].count == 5


def test_reorder_selects_batch_rows_of_every_tensor_nested_ones_too() -> None:
    state = _filled()
    state.reorder(torch.tensor([2, 0]))
    assert torch.equal(state.layers[0].conv, torch.tensor([[4.0, 5.0], [0.0, 1.0]]))
    nested = state.layers[2]
    assert nested.inner.memory.shape == (2, 2, 2)
    assert torch.equal(nested.per_scale[1], torch.tensor([[2.0], [0.0]])) and nested.per_scale[2] == 7
    assert isinstance(nested.slots[1], tuple) and torch.equal(nested.slots[1][1], torch.tensor([[2.0], [0.0]]))
    assert state.batch_size() == 2


def test_clone_is_independent() -> None:
    state = _filled().detach()
    copy = state.clone()
    copy.layers[0].conv.add_(100.0)
    copy.length += 1
    assert state.layers[0].conv.max() < 100 and state.length == 17


def test_num_floats_counts_every_tensor() -> None:
    assert _filled().num_floats() == 6 + 12 + (3 + 12 + 3 + 6 + 3)


def test_state_dict_round_trip_is_exact_and_keeps_the_types() -> None:
    state = _filled()
    plain = state.state_dict()
    assert plain["length"] == 17 and plain["layers"][1] is None
    back = DecodingState.from_state_dict(plain)
    assert back.length == 17 and back.layers[1] is None
    for a, b in zip(state.layers, back.layers):
        if a is not None:
            assert type(b) is type(a)
            assert all(torch.equal(x, y) and y.grad_fn is None for x, y in zip(_tensors(a), _tensors(b)))
    nested = back.layers[2]
    assert type(nested.inner) is _Pair and nested.count == 5 and nested.per_scale[0] is None
    assert isinstance(nested.slots[1], tuple) and isinstance(nested.per_scale, list)


def test_from_state_dict_rejects_what_state_dict_does_not_write() -> None:
    with pytest.raises(ValueError, match="keys 'length' and 'layers'"):
        DecodingState.from_state_dict({"layers": [None]})
    with pytest.raises(ValueError, match="non-empty list"):
        DecodingState.from_state_dict({"length": 0, "layers": []})
    with pytest.raises(ValueError, match="not a registered layer-state type"):
        DecodingState.from_state_dict({"length": 0, "layers": [{"__layer_state__": "nope", "fields": {}}]})
    with pytest.raises(ValueError, match="n_layers=0"):
        DecodingState(0)


@dataclasses.dataclass
class _Buffered(LayerState):
    """A state whose buffer has spare capacity: it counts only the ``used`` part (as KVState does)."""

    buffer: torch.Tensor
    used: int = 0

    def num_floats(self) -> int:
        return self.buffer[:, : self.used].numel()


def test_num_floats_of_a_nested_state_uses_its_own_count() -> None:
    outer = _Nested(inner=_Buffered(torch.zeros(2, 64), used=5), per_scale=[_Buffered(torch.zeros(2, 8), used=1)])
    assert outer.num_floats() == 2 * 5 + 2 * 1
