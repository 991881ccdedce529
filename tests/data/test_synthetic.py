"""MQAR generator: structure, labels, determinism, the power-law gaps, argument errors."""

from __future__ import annotations

import pytest
import torch

from hierseq.data.synthetic import mqar_accuracy, mqar_batch, mqar_batches


def _batch(seed: int = 0, **kw):
    args = {"batch_size": 32, "seq_len": 64, "n_pairs": 4, "vocab_size": 256, **kw}
    return mqar_batch(generator=torch.Generator().manual_seed(seed), **args)


def test_context_keys_values_and_queries() -> None:
    ids, labels = _batch()
    assert ids.shape == labels.shape == (32, 64) and ids.dtype == torch.long
    keys, values = ids[:, 0:8:2], ids[:, 1:8:2]
    assert ((keys >= 1) & (keys < 128)).all() and ((values >= 128) & (values < 256)).all()
    for b in range(32):
        assert len(set(keys[b].tolist())) == 4 and len(set(values[b].tolist())) == 4
        pairs = dict(zip(keys[b].tolist(), values[b].tolist()))
        query_pos = (labels[b] != -100).nonzero()[:, 0].tolist()
        assert len(query_pos) == 4 and all(p >= 8 for p in query_pos)
        # each query is a context key, labelled with its value, and that value follows it in the input
        assert sorted(ids[b, query_pos].tolist()) == sorted(pairs)
        for p in query_pos:
            assert labels[b, p].item() == pairs[ids[b, p].item()]
            if p + 1 < 64:
                assert ids[b, p + 1].item() == labels[b, p].item()
        # everything else in the query region is the zero filler
        region = ids[b, 8:].clone()
        for p in query_pos:
            region[p - 8 : p - 6] = 0
        assert (region == 0).all()


def test_deterministic_and_seed_dependent() -> None:
    a, b, c = _batch(seed=1), _batch(seed=1), _batch(seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    it1, it2 = mqar_batches(4, 64, 4, 256, seed=5), mqar_batches(4, 64, 4, 256, seed=5)
    for _ in range(3):
        assert torch.equal(next(it1)[0], next(it2)[0])


def test_power_law_favours_short_gaps() -> None:
    # a = 0.01: p(slot i) ∝ i^-0.99, so slot 1 is ~29x as likely as slot 29 (of 29 slots at L=64, K=4);
    # sampling 4 without replacement flattens this, but the first slot must stay the most used by far.
    ids, labels = _batch(batch_size=2000)
    pos = (labels != -100).nonzero()[:, 1]
    counts = torch.bincount((pos - 8) // 2, minlength=29).float()
    assert counts[0] == counts.max() and counts[0] > 4 * counts[20:].mean()


def test_random_filler_keeps_structure() -> None:
    ids, labels = _batch(filler="random")
    assert (labels != -100).sum(-1).eq(4).all()
    assert (ids[:, 8:] != 0).float().mean() > 0.9


def test_accuracy_counts_only_labelled_positions() -> None:
    ids, labels = _batch(batch_size=2)
    logits = torch.zeros(2, 64, 256)
    mask = labels != -100
    logits[mask, labels[mask]] = 1.0  # correct everywhere it is scored
    assert mqar_accuracy(logits, labels) == (8, 8)
    logits[0] = 0.0
    logits[0, :, 0] = 1.0  # row 0 now predicts 0
    assert mqar_accuracy(logits, labels) == (4, 8)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_pairs": 200}, "n_pairs=200"),
        ({"seq_len": 10, "n_pairs": 4}, "seq_len=10"),
        ({"power_a": 0.0}, "power_a=0.0"),
        ({"filler": "noise"}, "filler='noise'"),
        ({"batch_size": 0}, "batch_size=0"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _batch(**kwargs)
