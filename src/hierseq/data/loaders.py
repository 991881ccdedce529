"""Seeded, batch-first loaders of next-token windows.

Every loader cuts windows of ``seq_len + 1`` tokens and turns them into ``(input_ids [B, L],
labels [B, L])`` with :func:`hierseq.losses.shift_for_next_token` (the one place hierseq shifts).

Distributed runs: a loader is told the GLOBAL ``batch_size`` and its ``rank`` / ``world_size`` and
returns only its rows ``[rank * B / W, (rank + 1) * B / W)`` of the global batch, so W processes see
exactly the batch one process would see.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..losses import shift_for_next_token


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")


def _check_tokens(tokens: Any) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens: shape={shape}: must be a 1-D tensor of token ids")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(f"tokens: dtype={tokens.dtype}: must be an integer tensor")
    return tokens


def _check_ranks(batch_size: int, rank: int, world_size: int) -> None:
    _check_int("world_size", world_size, 1)
    _check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank={rank}: must be < world_size={world_size}")
    if batch_size % world_size:
        raise ValueError(f"batch_size={batch_size}: the global batch must be divisible by world_size={world_size}")


def _gather_windows(tokens: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """tokens [N], starts [B] -> windows [B, length] (long), one batched index instead of a loop."""
    index = starts.unsqueeze(1) + torch.arange(length).unsqueeze(0)
    return tokens[index].long()


class _WindowLoader:
    """What both loaders share: the checks, this rank's slice of the global batch, the step count,
    iteration and the loader state (kind, step and shape; a subclass adds its own fields)."""

    kind = ""

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, rank: int, world_size: int) -> None:
        self.tokens = _check_tokens(tokens)
        _check_int("batch_size", batch_size, 1)
        _check_int("seq_len", seq_len, 1)
        _check_ranks(batch_size, rank, world_size)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = batch_size // world_size
        self.step = 0

    def next_batch(self) -> tuple:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple]:
        while True:
            yield self.next_batch()

    def _own_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load_own_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """{"kind", "step", "batch_size", "seq_len", ...}: tensors + JSON scalars, no pickle."""
        shape = {"batch_size": self.batch_size, "seq_len": self.seq_len}
        return {"kind": self.kind, "step": self.step, **self._own_state(), **shape}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a :meth:`state_dict` of a loader of the same kind, batch_size and seq_len."""
        if state.get("kind", self.kind) != self.kind:
            raise ValueError(f"loader state kind={state.get('kind')!r}: expected {self.kind!r}")
        for key in ("batch_size", "seq_len"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(f"loader state {key}={state[key]}: this loader has {key}={getattr(self, key)}")
        self._load_own_state(state)
        self.step = int(state["step"])


class RandomWindowLoader(_WindowLoader):
    """Random windows: each step draws ``batch_size`` (global) window starts uniformly from a
    ``torch.Generator`` seeded with ``seed``; this rank keeps its slice of rows.

    ``next_batch() -> (input_ids [B / W, L], labels [B / W, L])`` (long, CPU).
    """

    kind = "random"

    def __init__(
        self, tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        super().__init__(tokens, batch_size, seq_len, rank, world_size)
        _check_int("seed", seed, 0)
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"tokens: the split has {len(tokens)} tokens, needs at least seq_len + 1 = {seq_len + 1} for one window"
            )
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        n_starts = len(self.tokens) - self.seq_len  # last valid start leaves room for seq_len + 1 tokens
        # Every rank draws the whole global batch so the generator stays in lock-step across ranks.
        starts = torch.randint(0, n_starts, (self.batch_size,), generator=self.generator)
        lo = self.rank * self.local_batch_size
        windows = _gather_windows(self.tokens, starts[lo : lo + self.local_batch_size], self.seq_len + 1)
        self.step += 1
        return shift_for_next_token(windows)

    def _own_state(self) -> dict[str, Any]:
        return {"generator_state": self.generator.get_state().clone(), "seed": self.seed}

    def _load_own_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator_state"].to(torch.uint8).cpu())


class StreamLoader(_WindowLoader):
    """Contiguous streams for recurrent training with carried state (TBPTT).

    The tokens are cut into ``batch_size`` (global) equal contiguous streams; batch ``i`` row ``b`` is
    ``stream_b[i * L : i * L + L + 1]``, so its input continues exactly where row ``b`` of batch
    ``i - 1`` ended. When a stream has no full window left, all streams wrap back to their start.

    ``next_batch() -> (input_ids [B / W, L], labels [B / W, L], reset: bool)``; ``reset`` is True on
    the first batch and after every wrap, telling the trainer to drop the carried state.
    """

    kind = "stream"

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(tokens, batch_size, seq_len, rank, world_size)
        self.stream_len = len(tokens) // batch_size
        if self.stream_len < seq_len + 1:
            raise ValueError(
                f"tokens: {len(tokens)} tokens cut into batch_size={batch_size} streams give {self.stream_len} "
                f"tokens each, need at least seq_len + 1 = {seq_len + 1}; use a smaller batch_size or seq_len"
            )
        #: batches per pass over the streams; the last label of batch i is the first input of batch i + 1.
        self.batches_per_pass = (self.stream_len - 1) // seq_len
        first = rank * self.local_batch_size
        self.stream_starts = torch.arange(first, first + self.local_batch_size) * self.stream_len
        self.position = 0  # batch index within the current pass

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        if self.position >= self.batches_per_pass:
            self.position = 0
        reset = self.position == 0
        windows = _gather_windows(self.tokens, self.stream_starts + self.position * self.seq_len, self.seq_len + 1)
        self.position += 1
        self.step += 1
        input_ids, labels = shift_for_next_token(windows)
        return input_ids, labels, reset

    def _own_state(self) -> dict[str, Any]:
        return {"position": self.position}

    def _load_own_state(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


def eval_windows(
    tokens: torch.Tensor, batch_size: int, seq_len: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic non-overlapping windows for evaluation: window k covers tokens
    ``[k * L, k * L + L]`` (inputs and labels), so every token of the split except the first is
    predicted exactly once. Yields ``(input_ids [b, L], labels [b, L])`` with ``b <= batch_size``.

    With ``max_batches`` and more windows than ``max_batches * batch_size``, the windows used are spread
    evenly over the whole split (not just its beginning), so a cheap eval still sees all of it.
    """
    _check_tokens(tokens)
    _check_int("batch_size", batch_size, 1)
    _check_int("seq_len", seq_len, 1)
    if max_batches is not None:
        _check_int("max_batches", max_batches, 1)
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        raise ValueError(
            f"tokens: the split has {len(tokens)} tokens, needs at least seq_len + 1 = {seq_len + 1} for one window"
        )
    window_ids = torch.arange(n_windows)
    if max_batches is not None and n_windows > max_batches * batch_size:
        n_keep = max_batches * batch_size
        # Evenly spaced, distinct (n_keep < n_windows) and deterministic.
        window_ids = (torch.arange(n_keep) * n_windows) // n_keep
    for lo in range(0, len(window_ids), batch_size):
        starts = window_ids[lo : lo + batch_size] * seq_len
        yield shift_for_next_token(_gather_windows(tokens, starts, seq_len + 1))
