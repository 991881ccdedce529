"""A fixed-size recurrent decoding state: one small tuple of tensors per layer.

The recurrent models (``hamt``, ``linear_attn``, ``mamba``) carry, per layer, a conv window and a memory
whose sizes do not depend on how many tokens were seen. :class:`LayerStateCache` is that container
once, with what generation and truncated BPTT need from it:

* ``detach()`` cuts the autograd graph at a batch boundary (TBPTT);
* ``reorder(index)`` keeps / reorders batch rows (beam search, finished rows);
* ``num_floats()`` counts the floats held (constant in the context length);
* ``state_dict()`` / ``from_state_dict()`` turn it into plain tensors and back, so a training
  checkpoint can store the carried state and a resumed TBPTT run continues exactly.

Every entry of ``layers`` is None (the layer has seen nothing yet) or a ``layer_state_type`` of tensors
whose first dimension is the batch. Subclasses only name that type when it is not a plain tuple.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch

__all__ = ["LayerStateCache"]

CacheT = TypeVar("CacheT", bound="LayerStateCache")


class LayerStateCache:
    """Per-layer recurrent state: ``layers[i]`` is None or a tuple of tensors [B, ...]; ``length`` is
    the number of tokens seen."""

    #: the per-layer container; a NamedTuple subclass is built with ``layer_state_type(*tensors)``.
    layer_state_type: type = tuple

    def __init__(self, n_layers: int) -> None:
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers={n_layers!r}: must be a positive integer")
        self.layers: list[Any] = [None] * n_layers
        self.length = 0

    def _make(self, tensors: Any) -> Any:
        tensors = list(tensors)
        return tuple(tensors) if self.layer_state_type is tuple else self.layer_state_type(*tensors)

    def detach(self: CacheT) -> CacheT:
        """Cut the autograd graph (truncated BPTT): in place, returns self."""
        self.layers = [None if s is None else self._make(t.detach() for t in s) for s in self.layers]
        return self

    def reorder(self, index: torch.Tensor) -> None:
        """Keep / reorder batch rows (beam search, dropping finished rows). index: [B'] long."""
        self.layers = [None if s is None else self._make(t.index_select(0, index) for t in s) for s in self.layers]

    def num_floats(self) -> int:
        """Floats held, over all layers and batch rows (constant in context length)."""
        return sum(t.numel() for s in self.layers if s is not None for t in s)

    def state_dict(self) -> dict[str, Any]:
        """Plain data: ``{"length": int, "layers": [None | [tensor, ...]]}`` (detached tensors)."""
        return {
            "length": int(self.length),
            "layers": [None if s is None else [t.detach() for t in s] for s in self.layers],
        }

    @classmethod
    def from_state_dict(cls: type[CacheT], state: dict[str, Any], device: torch.device | str | None = None) -> CacheT:
        """The cache :meth:`state_dict` described, with its tensors on ``device`` (None: where they are)."""
        if not isinstance(state, dict) or set(state) != {"length", "layers"}:
            raise ValueError(f"state: expected a dict with keys 'length' and 'layers', got {state!r:.200}")
        layers = state["layers"]
        if not isinstance(layers, list) or not layers:
            raise ValueError(f"state['layers']: expected a non-empty list, got {type(layers).__name__}")
        cache = cls(len(layers))
        for i, tensors in enumerate(layers):
            if tensors is None:
                continue
            if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in tensors):
                raise ValueError(f"state['layers'][{i}]: expected None or a list of tensors")
            cache.layers[i] = cache._make(t if device is None else t.to(device) for t in tensors)
        cache.length = int(state["length"])
        return cache
