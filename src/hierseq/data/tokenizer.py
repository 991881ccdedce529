"""Byte-level tokenizer: one token per UTF-8 byte, so V = 256 and no vocabulary file is needed."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class ByteTokenizer:
    """Text <-> UTF-8 byte ids. Loss per token is therefore loss per byte (bits per byte = nats / ln 2)."""

    vocab_size: int = 256

    def encode(self, text: str) -> torch.Tensor:
        """text -> LongTensor [N] of byte values in [0, 256), N = len(text.encode('utf-8'))."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        data = text.encode("utf-8")
        if not data:
            return torch.zeros(0, dtype=torch.long)
        # frombuffer shares the (read-only) bytes; .long() copies, so the result is writable and owned.
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """ids [N] (any integer dtype, or a list) -> text. Invalid UTF-8 (e.g. a sequence cut inside a
        multi-byte character, as sampling can produce) becomes U+FFFD instead of raising."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"ids: shape={tuple(ids.shape)}: must have rank 1 [length]")
            values = ids.tolist()
        else:
            values = list(ids)
        bad = [v for v in values if not 0 <= int(v) < 256]
        if bad:
            raise ValueError(f"ids: token id {bad[0]} out of range: byte ids must be in [0, 256)")
        return bytes(int(v) for v in values).decode("utf-8", errors="replace")
