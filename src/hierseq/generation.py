"""Autoregressive generation through the causal-LM contract, with caches / recurrent state.

Only the contract is used: ``out = model(ids, use_cache=True)`` to prefill, then
``out = model(next_ids[:, None], cache=out.cache, use_cache=True)`` once per new token. Attention
models carry a KV cache in ``out.cache``; recurrent models carry their state there, so every model
steps at its own per-token cost without generation knowing which kind it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .config import config_error
from .modules.causal_lm import CausalLM

__all__ = ["check_sampling_arguments", "generate", "sample_next_token"]

Prompt = torch.Tensor | Sequence[int]
StepCallback = Callable[[int, torch.Tensor], None]


def check_sampling_arguments(
    max_new_tokens: Any,
    temperature: Any = 1.0,
    top_k: Any = None,
    top_p: Any = None,
    seed: Any = None,
    eos_id: Any = None,
    vocab_size: int | None = None,
) -> None:
    """Raise ``ValueError("name=value: rule")`` for the first invalid argument of :func:`generate` (the
    CLI calls it before it prints anything)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise config_error("max_new_tokens", max_new_tokens, "must be an integer >= 0")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise config_error("temperature", temperature, "must be a finite number >= 0 (0 = greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise config_error("top_k", top_k, "must be None or an integer >= 1")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise config_error("top_p", top_p, "must be None or a number in (0, 1]")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise config_error("seed", seed, "must be None or an integer")
    if eos_id is not None:
        if isinstance(eos_id, bool) or not isinstance(eos_id, int) or eos_id < 0:
            raise config_error("eos_id", eos_id, "must be None or a non-negative integer token id")
        if vocab_size is not None and eos_id >= vocab_size:
            raise config_error("eos_id", eos_id, f"must be a token id in [0, {vocab_size})")


def _as_prompt_rows(prompts: Any, device: torch.device) -> tuple[list[torch.Tensor], bool]:
    """Normalise ``prompts`` to a list of 1-D token tensors on ``device``.

    Returns (rows, was_tensor): ``was_tensor`` is True when ``prompts`` was one [B, L] tensor, so the
    result is returned in the same form. Token dtype and range are left to the model's own checks.
    """
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise config_error("prompts", tuple(prompts.shape), "a tensor of prompts must have shape [batch, length]")
        if prompts.shape[0] == 0 or prompts.shape[1] == 0:
            raise config_error("prompts", tuple(prompts.shape), "empty prompt: batch and length must be >= 1")
        return list(prompts.to(device).unbind(0)), True
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(
            f"prompts: expected a [batch, length] tensor or a list of 1-D prompts, got {type(prompts).__name__}"
        )
    if len(prompts) == 0:
        raise config_error("prompts", prompts, "empty list: need at least one prompt")
    rows = []
    for i, p in enumerate(prompts):
        row = p if isinstance(p, torch.Tensor) else torch.as_tensor(list(p))
        if row.dim() != 1:
            raise config_error(f"prompts[{i}]", tuple(row.shape), "each prompt must be 1-D")
        if row.numel() == 0:
            raise config_error(f"prompts[{i}]", list(row.tolist()), "empty prompt: need at least one token")
        rows.append(row.to(device))
    return rows, False


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row. logits: [B, V] -> token ids [B] (long).

    ``temperature == 0`` is greedy (argmax; ``top_k`` / ``top_p`` are then irrelevant). Otherwise the
    logits are divided by ``temperature``, restricted to the ``top_k`` largest, then to the smallest
    set of most-probable tokens whose probability mass is >= ``top_p`` (never empty), and sampled
    with ``generator``.
    """
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    vocab = logits.shape[-1]
    if top_k is not None and top_k < vocab:
        kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Mass of the strictly more probable tokens: a token is kept while that mass is still < top_p,
        # which keeps the smallest prefix reaching top_p and always the most probable token.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def generate(
    model: nn.Module,
    prompts: torch.Tensor | Sequence[Prompt],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """Continue each prompt by up to ``max_new_tokens`` tokens with cached decoding.

    Args:
        model: a causal LM following the hierseq contract (``model(ids, cache=, use_cache=)`` returning
            a ``CausalLMOutput`` with ``logits [B, L, V]`` and ``cache``).
        prompts: a LongTensor [B, L], or a list of 1-D LongTensors / lists of ints (lengths may differ).
        max_new_tokens: number of tokens to add (>= 0).
        temperature: 0 = greedy; > 0 scales the logits before sampling.
        top_k: keep only the k most probable tokens (None = all).
        top_p: nucleus sampling: keep the smallest set of tokens with probability mass >= top_p.
        seed: seeds a local ``torch.Generator`` (the global RNG is untouched); None = nondeterministic.
        eos_id: when given, a row stops after emitting it.
        callback: ``callback(step, tokens)`` after each decoding step; ``step`` counts from 0 and
            ``tokens`` is a LongTensor [B] of the new token of every row, in prompt order (``eos_id``
            for rows that already finished).

    Returns:
        The same form as ``prompts``: a tensor [B, L + max_new_tokens] (rows that stopped at ``eos_id``
        are padded with ``eos_id``), or a list of 1-D tensors, each prompt + its generated tokens
        (ending at the first ``eos_id`` when one was emitted).

    Runs under ``torch.no_grad()`` with the model in eval mode; each submodule's previous training
    mode is restored afterwards.
    """
    kind = getattr(model, "model_kind", "causal_lm")  # set on every registered model class
    if kind != "causal_lm":
        raise config_error("model", type(model).__name__, f"is a {kind} model; generate needs a causal LM")
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    check_sampling_arguments(max_new_tokens, temperature, top_k, top_p, seed, eos_id, vocab_size)
    device = _model_device(model)
    rows, was_tensor = _as_prompt_rows(prompts, device)

    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            new_tokens = _decode(model, rows, max_new_tokens, temperature, top_k, top_p, generator, eos_id, callback)
    finally:
        for module, mode in modes:
            module.training = mode

    if was_tensor:
        return torch.cat([torch.stack(rows).long(), new_tokens], dim=1)
    out = []
    for prompt, generated in zip(rows, new_tokens.unbind(0)):
        if eos_id is not None:
            hits = (generated == eos_id).nonzero()
            if hits.numel():
                generated = generated[: int(hits[0, 0]) + 1]
        out.append(torch.cat([prompt.long(), generated]))
    return out


def _decode(
    model: nn.Module,
    rows: list[torch.Tensor],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator,
    eos_id: int | None,
    callback: StepCallback | None,
) -> torch.Tensor:
    """Decode every row; returns the new tokens [B, max_new_tokens] (eos-padded after a row stops).

    Rows are grouped by prompt length and each group is decoded as one batch. Within a group every
    row has seen exactly the same number of tokens, so a batched step is the same computation as a
    step of each row alone, for any model: attention, recurrent or hierarchical. Padding ragged
    prompts instead would need each model to define how pad tokens interact with its state (a
    recurrent scan or a chunked hierarchy would absorb left-padding into its state), which the
    causal-LM contract does not promise. The groups advance in lock step so that ``callback`` sees
    one token per row per step.
    """
    batch = len(rows)
    device = rows[0].device
    new_tokens = torch.full(
        (batch, max_new_tokens), eos_id if eos_id is not None else 0, dtype=torch.long, device=device
    )
    if max_new_tokens == 0:
        return new_tokens

    groups: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.numel(), []).append(i)
    group_index = [torch.tensor(idx, device=device) for idx in groups.values()]
    caches: list[Any] = []
    last_logits: list[torch.Tensor] = []
    for idx in groups.values():
        out = model(torch.stack([rows[i] for i in idx]), use_cache=True)
        caches.append(out.cache)
        last_logits.append(out.logits[:, -1])
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    # The prompts were checked by the prefill and every later token is sampled from the vocabulary:
    # the shell may skip its token-range check (a host sync per step).
    step_kwargs = {"check_inputs": False} if isinstance(model, CausalLM) else {}

    for step in range(max_new_tokens):
        step_tokens = new_tokens[:, step]  # a view: filled in place below
        for g, index in enumerate(group_index):
            chosen = sample_next_token(last_logits[g], temperature, top_k, top_p, generator)
            if eos_id is not None:
                chosen = chosen.masked_fill(finished[index], eos_id)
            step_tokens[index] = chosen
        if eos_id is not None:
            finished |= step_tokens == eos_id
        if callback is not None:
            callback(step, step_tokens.clone())
        if step + 1 == max_new_tokens or bool(finished.all()):
            break
        for g, index in enumerate(group_index):
            if bool(finished[index].all()):
                continue  # this group only emits eos_id from now on
            out = model(step_tokens[index][:, None], cache=caches[g], use_cache=True, **step_kwargs)
            caches[g] = out.cache
            last_logits[g] = out.logits[:, -1]
    return new_tokens
