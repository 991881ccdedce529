"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"), generated on the fly from a seed.

A sequence of ``seq_len`` tokens (before the next-token shift, ``seq_len + 1``):

* context: ``k_1 v_1 k_2 v_2 ... k_K v_K`` with K = ``n_pairs`` distinct keys from the lower half of the
  vocabulary (token 0 excluded, it is the filler) and distinct values from the upper half;
* query region (the rest): every key appears once more, followed by its value, at a pair slot drawn
  without replacement with probability ∝ a·i^(a-1) over the slot index i = 1, 2, ... (a = ``power_a``,
  0.01 in the paper: short gaps are favoured, long ones still occur); the other positions are filler
  (zeros, or random tokens with ``filler="random"``).

``labels`` are the next-token targets, -100 everywhere except at the repeated keys, whose label is the
value bound to them in the context: accuracy on those positions measures in-context recall, and the
value tokens that follow in the query region are never scored.
"""

from __future__ import annotations

import torch

from ..config import config_error

__all__ = ["mqar_batch", "mqar_batches", "mqar_accuracy"]

FILLERS = ("zeros", "random")


def _check_mqar_args(seq_len: int, n_pairs: int, vocab_size: int, power_a: float, filler: str) -> None:
    for name, value in (("seq_len", seq_len), ("n_pairs", n_pairs), ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise config_error(name, value, "must be a positive integer")
    if vocab_size // 2 - 1 < n_pairs:
        raise config_error("n_pairs", n_pairs, f"needs vocab_size // 2 - 1 >= n_pairs distinct keys, got {vocab_size=}")
    query_slots = (seq_len + 1 - 2 * n_pairs) // 2
    if query_slots < n_pairs:
        raise config_error("seq_len", seq_len, f"too short for n_pairs={n_pairs}: needs seq_len >= {4 * n_pairs - 1}")
    if isinstance(power_a, bool) or not isinstance(power_a, (int, float)) or not 0 < power_a <= 1:
        raise config_error("power_a", power_a, "must be in (0, 1]")
    if filler not in FILLERS:
        raise config_error("filler", filler, f"must be one of {list(FILLERS)}")


def mqar_batch(
    batch_size: int,
    seq_len: int,
    n_pairs: int,
    vocab_size: int,
    generator: torch.Generator | None = None,
    power_a: float = 0.01,
    filler: str = "zeros",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch: (input_ids [B, seq_len] long, labels [B, seq_len] long, -100 except at queries)."""
    _check_mqar_args(seq_len, n_pairs, vocab_size, power_a, filler)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise config_error("batch_size", batch_size, "must be a positive integer")
    half = vocab_size // 2
    total = seq_len + 1
    context = 2 * n_pairs
    rows = torch.arange(batch_size)[:, None]

    # Distinct keys in [1, half) and distinct values in [half, vocab) per row: first K of a random order.
    keys = torch.rand(batch_size, half - 1, generator=generator).argsort(-1)[:, :n_pairs] + 1
    values = torch.rand(batch_size, vocab_size - half, generator=generator).argsort(-1)[:, :n_pairs] + half

    if filler == "zeros":
        tokens = torch.zeros(batch_size, total, dtype=torch.long)
    else:
        tokens = torch.randint(0, vocab_size, (batch_size, total), generator=generator)
    tokens[:, 0:context:2] = keys
    tokens[:, 1:context:2] = values

    # Query pair slots (key at context + 2i, value right after it), power-law over the slot index.
    n_slots = (total - context) // 2
    index = torch.arange(1, n_slots + 1, dtype=torch.float64)
    slot_probs = (power_a * index ** (power_a - 1)).expand(batch_size, n_slots)
    slots = torch.multinomial(slot_probs, n_pairs, replacement=False, generator=generator)  # [B, K]
    order = torch.rand(batch_size, n_pairs, generator=generator).argsort(-1)  # which pair goes where
    key_pos = context + 2 * slots
    tokens[rows, key_pos] = keys.gather(1, order)
    tokens[rows, key_pos + 1] = values.gather(1, order)

    input_ids = tokens[:, :-1]
    labels = torch.full_like(input_ids, -100)
    labels[rows, key_pos] = tokens[rows, key_pos + 1]  # the target at a query is its value
    return input_ids.contiguous(), labels


def mqar_batches(
    batch_size: int,
    seq_len: int,
    n_pairs: int,
    vocab_size: int,
    seed: int = 0,
    power_a: float = 0.01,
    filler: str = "zeros",
):
    """Endless iterator of :func:`mqar_batch` batches from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield mqar_batch(batch_size, seq_len, n_pairs, vocab_size, generator, power_a, filler)


def mqar_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, total) argmax predictions at labelled positions. logits [B, L, V], labels [B, L]."""
    mask = labels != -100
    correct = int((logits.argmax(-1)[mask] == labels[mask]).sum())
    return correct, int(mask.sum())
