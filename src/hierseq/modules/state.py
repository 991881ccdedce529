"""The one decoding-state protocol, for every mixer and every causal LM.

A causal LM's state is a :class:`DecodingState`: one entry per layer (None until the layer has seen a
token) and ``length``, the tokens seen so far. A layer's entry is a :class:`LayerState`, a dataclass
whose fields are tensors with the batch first, ints, None, nested layer states, or lists / tuples of
these. Because the fields are plain data, every operation is written once, here:

* ``detach()`` cuts the autograd graph in place (truncated BPTT) and keeps the values; a layer state
  may also drop what it must not carry on (attention keeps a bounded key window, see its docstring);
* ``reorder(index)`` keeps / reorders batch rows (beam search, finished rows);
* ``num_floats()`` counts the floats held;
* ``state_dict()`` / ``from_state_dict()`` turn it into plain tensors and back (a training checkpoint
  stores the carried state, and a resumed TBPTT run continues exactly). Layer-state classes register
  themselves by name when they are defined, so nothing above this module is needed to rebuild one.

The rule for ``cache=`` (the same for every model): a call given a cache continues from it and advances
it **in place**; ``out.cache`` is that same object. ``use_cache=True`` without a cache starts a new one.
Without either, no state is kept (``out.cache`` is None). To read a state without advancing it, pass
``state.clone()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, TypeVar

import torch

__all__ = ["DecodingState", "LayerState", "RecurrentState", "map_tensors"]

S = TypeVar("S", bound="LayerState")
_LAYER_STATE_TYPES: dict[str, type[LayerState]] = {}


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor inside it (lists, tuples, layer states walked)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, LayerState):
        return value.map(fn)
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(v, fn) for v in value)
    return value


def _iter_tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside ``value``, walked in place (nothing is rebuilt: cheap enough per decode step)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, LayerState):
        for f in dataclasses.fields(value):
            yield from _iter_tensors(getattr(value, f.name))
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _iter_tensors(v)


def _count_floats(value: Any) -> int:
    """Floats held in ``value``; a nested layer state counts itself (its own ``num_floats``)."""
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, LayerState):
        return value.num_floats()
    if isinstance(value, (list, tuple)):
        return sum(_count_floats(v) for v in value)
    return 0


def _to_plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, LayerState):
        return value.state_dict()
    if isinstance(value, (list, tuple)):
        return {"__seq__": type(value).__name__, "items": [_to_plain(v) for v in value]}
    return value


def _from_plain(value: Any, device: torch.device | str | None) -> Any:
    if isinstance(value, torch.Tensor):
        return value if device is None else value.to(device)
    if isinstance(value, dict) and "__seq__" in value:
        items = [_from_plain(v, device) for v in value["items"]]
        return tuple(items) if value["__seq__"] == "tuple" else items
    if isinstance(value, dict) and "__layer_state__" in value:
        return LayerState.from_state_dict(value, device)
    return value


@dataclasses.dataclass
class LayerState:
    """Base of every mixer's per-layer state (a dataclass of tensors [B, ...], ints, lists, None)."""

    #: registered name of each subclass, used by :meth:`from_state_dict`.
    state_name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.state_name = f"{cls.__module__}.{cls.__qualname__}"
        _LAYER_STATE_TYPES[cls.state_name] = cls

    def map(self: S, fn: Callable[[torch.Tensor], torch.Tensor]) -> S:
        """A new state of the same type with ``fn`` applied to every tensor."""
        return type(self)(**{f.name: map_tensors(getattr(self, f.name), fn) for f in dataclasses.fields(self)})

    def _replace_from(self, other: LayerState) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(other, f.name))

    def detach(self: S) -> S:
        """Cut the autograd graph, in place; returns self. Subclasses may also bound what they keep."""
        self._replace_from(self.map(torch.Tensor.detach))
        return self

    def reorder(self, index: torch.Tensor) -> None:
        """Keep / reorder batch rows, in place. index: [B'] long."""
        self._replace_from(self.map(lambda t: t.index_select(0, index)))

    def clone(self: S) -> S:
        return self.map(torch.Tensor.clone)

    def num_floats(self) -> int:
        return sum(_count_floats(getattr(self, f.name)) for f in dataclasses.fields(self))

    def state_dict(self) -> dict[str, Any]:
        """Plain data (tensors detached), tagged with the class so it can be rebuilt."""
        fields = {f.name: _to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"__layer_state__": self.state_name, "fields": fields}

    @staticmethod
    def from_state_dict(state: dict[str, Any], device: torch.device | str | None = None) -> LayerState:
        name = state.get("__layer_state__") if isinstance(state, dict) else None
        if name not in _LAYER_STATE_TYPES:
            raise ValueError(f"state: {name!r}: not a registered layer-state type (is its mixer imported?)")
        fields = {k: _from_plain(v, device) for k, v in state["fields"].items()}
        return _LAYER_STATE_TYPES[name](**fields)


@dataclasses.dataclass
class RecurrentState(LayerState):
    """A conv window [B, C, K-1] and a fixed-size memory [B, ...]: the state of the memory mixers
    (linear attention, hamt, gated_deltanet)."""

    conv: torch.Tensor
    memory: torch.Tensor


# Checkpoints written before this class moved here name it by its old module.
_LAYER_STATE_TYPES["hierseq.mixers.linear_attention.RecurrentState"] = RecurrentState


class DecodingState:
    """The state of a whole causal LM: ``layers[i]`` is None or layer i's :class:`LayerState`;
    ``length`` is the number of tokens seen."""

    def __init__(self, n_layers: int) -> None:
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers={n_layers!r}: must be a positive integer")
        self.layers: list[LayerState | None] = [None] * n_layers
        self.length = 0

    def __repr__(self) -> str:
        kinds = [None if s is None else type(s).__name__ for s in self.layers]
        return f"DecodingState(length={self.length}, layers={kinds})"

    def batch_size(self) -> int | None:
        """Rows held (None while nothing is stored)."""
        first = next((t for s in self.layers for t in _iter_tensors(s)), None)
        return None if first is None else first.shape[0]

    def detach(self) -> DecodingState:
        """Cut the autograd graph at a batch boundary (TBPTT), in place; returns self."""
        for s in self.layers:
            if s is not None:
                s.detach()
        return self

    def reorder(self, index: torch.Tensor) -> None:
        for s in self.layers:
            if s is not None:
                s.reorder(index)

    def clone(self) -> DecodingState:
        """An independent copy (tensors cloned): advancing it leaves this one as it is."""
        other = DecodingState(len(self.layers))
        other.layers = [None if s is None else s.clone() for s in self.layers]
        other.length = self.length
        return other

    def num_floats(self) -> int:
        return sum(s.num_floats() for s in self.layers if s is not None)

    def state_dict(self) -> dict[str, Any]:
        return {
            "length": int(self.length),
            "layers": [None if s is None else s.state_dict() for s in self.layers],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device | str | None = None) -> DecodingState:
        """The state :meth:`state_dict` described, its tensors on ``device`` (None: where they are)."""
        if not isinstance(state, dict) or set(state) != {"length", "layers"}:
            raise ValueError(f"state: expected a dict with keys 'length' and 'layers', got {state!r:.200}")
        layers = state["layers"]
        if not isinstance(layers, list) or not layers:
            raise ValueError(f"state['layers']: expected a non-empty list, got {type(layers).__name__}")
        out = cls(len(layers))
        out.layers = [None if s is None else LayerState.from_state_dict(s, device) for s in layers]
        out.length = int(state["length"])
        return out
