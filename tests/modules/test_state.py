"""LayerStateCache: detach, reorder, size and the plain-tensor round trip used by TBPTT checkpoints."""

from typing import NamedTuple

import pytest
import torch

from hierseq.modules.state_cache import LayerStateCache


class _Pair(NamedTuple):
    conv: torch.Tensor
    memory: torch.Tensor


class _PairCache(LayerStateCache):
    layer_state_type = _Pair


def _filled(cls=LayerStateCache) -> LayerStateCache:
    cache = cls(3)
    w = torch.ones((), requires_grad=True)
    cache.layers[0] = cache._make((torch.arange(6.0).reshape(3, 2) * w, torch.arange(12.0).reshape(3, 4) * w))
    cache.layers[2] = cache._make((torch.zeros(3, 1), torch.full((3, 2, 2), 2.0)))
    cache.length = 17
    return cache


def test_detach_cuts_the_graph_in_place_and_keeps_values() -> None:
    cache = _filled()
    before = [t.clone() for t in cache.layers[0]]
    assert cache.detach() is cache
    assert all(t.grad_fn is None for t in cache.layers[0])
    assert all(torch.equal(a, b) for a, b in zip(before, cache.layers[0]))
    assert cache.layers[1] is None and cache.length == 17


def test_reorder_selects_batch_rows_of_every_tensor() -> None:
    cache = _filled()
    cache.reorder(torch.tensor([2, 0]))
    assert torch.equal(cache.layers[0][0], torch.tensor([[4.0, 5.0], [0.0, 1.0]]))
    assert cache.layers[0][1].shape == (2, 4) and cache.layers[2][1].shape == (2, 2, 2)


def test_num_floats_counts_every_tensor() -> None:
    assert _filled().num_floats() == 6 + 12 + 3 + 12


@pytest.mark.parametrize("cls", [LayerStateCache, _PairCache], ids=["tuple", "namedtuple"])
def test_state_dict_round_trip_is_exact_and_keeps_the_layer_type(cls) -> None:
    cache = _filled(cls)
    state = cache.state_dict()
    assert state["length"] == 17 and state["layers"][1] is None
    assert all(t.grad_fn is None for t in state["layers"][0])
    back = cls.from_state_dict(state)
    assert type(back) is cls and back.length == 17 and back.layers[1] is None
    for a, b in zip(cache.layers, back.layers):
        if a is not None:
            assert type(b) is type(a) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_from_state_dict_rejects_what_state_dict_does_not_write() -> None:
    with pytest.raises(ValueError, match="keys 'length' and 'layers'"):
        LayerStateCache.from_state_dict({"layers": [None]})
    with pytest.raises(ValueError, match="non-empty list"):
        LayerStateCache.from_state_dict({"length": 0, "layers": []})
    with pytest.raises(ValueError, match=r"state\['layers'\]\[0\]: expected None or a list of tensors"):
        LayerStateCache.from_state_dict({"length": 0, "layers": [[1.0]]})
    with pytest.raises(ValueError, match="n_layers=0"):
        LayerStateCache(0)
