"""Input checks shared by every model's forward: clear errors instead of IndexErrors deep inside."""

from __future__ import annotations

import torch


def check_input_ids(input_ids: object, vocab_size: int, name: str = "input_ids") -> torch.Tensor:
    """input_ids must be an integer tensor [B, L] with B, L >= 1 and 0 <= id < vocab_size."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.long, torch.int, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name}: dtype={input_ids.dtype}: token ids must be an integer tensor")
    if input_ids.dim() != 2:
        raise ValueError(f"{name}: shape={tuple(input_ids.shape)}: must have rank 2 [batch, length]")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"{name}: shape={tuple(input_ids.shape)}: batch and length must be >= 1")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name}: token id {bad} out of range: ids must be in [0, {vocab_size})")
    return input_ids.long()


def check_labels(labels: torch.Tensor | None, input_ids: torch.Tensor, vocab_size: int) -> None:
    """labels: [B, L] next-token targets aligned with input_ids; -100 means ignore."""
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels: shape={shape}: must match input_ids shape {tuple(input_ids.shape)}")
    valid = labels[labels != -100]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= vocab_size):
        raise ValueError(f"labels: values must be -100 or in [0, {vocab_size})")


def check_features(x: object, d_in: int, name: str = "x") -> torch.Tensor:
    """x must be a floating tensor [B, T, d_in] with B, T >= 1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: dtype={x.dtype}: must be a floating-point tensor")
    if x.dim() != 3:
        raise ValueError(f"{name}: shape={tuple(x.shape)}: must have rank 3 [batch, length, features]")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: shape={tuple(x.shape)}: batch and length must be >= 1")
    if x.shape[2] != d_in:
        raise ValueError(f"{name}: shape={tuple(x.shape)}: last dimension must be {d_in}")
    return x
