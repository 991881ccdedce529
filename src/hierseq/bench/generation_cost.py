"""Generation cost per new token after a long context: the one measurement behind ``hierseq bench speed``
(every causal LM of the run).

A context of C random tokens (batch 1) is prefilled with the model's cache
(``model(ids[1, C], use_cache=True).cache``), one cached step is taken as warm-up, then ``new_tokens``
greedy single-token steps ``model(token[1, 1], cache=cache, use_cache=True)`` are timed one by one; the
median is the cost of one new token. Recurrent models (Mamba, linear attention) should be flat in C;
attention with a KV cache grows with C.
"""

from __future__ import annotations

import inspect
import statistics
from collections.abc import Sequence

import torch

from .sweep import budgeted_sweep, time_call

DEFAULT_GEN_CONTEXTS = (1024, 4096, 16384)
DEFAULT_GEN_TOKENS = 64


def supports_cache(model: torch.nn.Module) -> bool:
    """True when ``model.forward`` takes ``cache`` and ``use_cache`` (the causal-LM generation contract)."""
    params = inspect.signature(model.forward).parameters
    return "cache" in params and "use_cache" in params


def check_contexts(contexts: Sequence[int] | None) -> list[int]:
    """Sorted contexts; ``None``, ``[]`` or ``[0]`` mean "skip generation" and give ``[]``."""
    contexts = sorted(contexts or [])
    if contexts == [0]:
        return []
    if any(not isinstance(c, int) or c < 1 for c in contexts):
        raise ValueError(f"gen_contexts={contexts}: every context must be an integer >= 1 (or just 0 to skip)")
    return contexts


def measure_generation(
    model: torch.nn.Module, context: int, new_tokens: int = DEFAULT_GEN_TOKENS, seed: int = 0
) -> dict:
    """Median milliseconds per cached new token after prefilling ``context`` tokens (batch 1).

    Returns ``{"status": "ok", "ms_per_token", "prefill_s", "new_tokens"}``, or ``{"status": "no cache"}``
    when the model has no cache to generate with. Puts the model in eval mode."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens={new_tokens}: must be >= 1")
    if not supports_cache(model):
        return {"status": "no cache"}
    model.eval()
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(device)
    state: dict = {}

    def step(tokens: torch.Tensor, cache: object) -> None:
        out = model(tokens, cache=cache, use_cache=True)
        state["cache"], state["token"] = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)

    with torch.no_grad():
        prefill_s = time_call(lambda: step(ids, None), device)
        if state["cache"] is None:
            return {"status": "no cache"}
        step(state["token"], state["cache"])  # warm-up step
        per_token = [time_call(lambda: step(state["token"], state["cache"]), device) for _ in range(new_tokens)]
    state.clear()
    return {
        "status": "ok",
        "ms_per_token": 1e3 * statistics.median(per_token),
        "prefill_s": prefill_s,
        "new_tokens": new_tokens,
    }


def generation_sweep(
    model: torch.nn.Module,
    contexts: Sequence[int],
    new_tokens: int = DEFAULT_GEN_TOKENS,
    time_budget_s: float = float("inf"),
    seed: int = 0,
    desc: str | None = None,
) -> list[dict]:
    """One row ``{"context", "status", ...}`` per context (see :func:`measure_generation`); a context the
    cache cannot hold is ``"oom"``, contexts after the budget is spent are ``"time budget"``."""
    return budgeted_sweep(
        contexts, lambda c: measure_generation(model, c, new_tokens, seed), time_budget_s, key="context", desc=desc
    )
