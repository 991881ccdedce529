"""Conformance checks as plain functions.

Each ``assert_*`` function takes a model (or a factory building one) and raises ``AssertionError``
with a readable message when the property fails. The parametrised tests call them for every model in
the registry, and ``test_checks_can_fail.py`` runs them on deliberately broken models to show that
they do fail, so a passing suite means something.

Shapes: token ids are [B, L] long tensors; logits are [B, L, V].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hierseq
from hierseq.bench.report import parse_model_spec
from hierseq.losses import shift_for_next_token

#: the i.i.d.-token check (and most others) runs with this vocabulary size.
SMALL_VOCAB = 32


# ---------------------------------------------------------------------------------------- building
def small_overrides(name: str, **extra: Any) -> dict[str, Any]:
    """The model's own ``small_overrides()``, then a variant's fields (``name`` may be a variant spec
    ``"tree:level_mode=levelwise"``), then ``extra`` (e.g. ``vocab_size=32``) on top."""
    _, model, variant = parse_model_spec(name)
    return {**hierseq.get_entry(model).config_cls.small_overrides(), **variant, **extra}


def build_small(name: str, seed: int = 0, **extra: Any) -> nn.Module:
    """A small model ``name`` (a registry name or variant spec) built under ``torch.manual_seed(seed)``,
    in eval mode."""
    torch.manual_seed(seed)
    return hierseq.build_model(parse_model_spec(name)[1], **small_overrides(name, **extra)).eval()


def random_ids(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Uniform random token ids [batch, length] from a local generator (global RNG untouched)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen)


def logits_of(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Full forward without gradients: [B, L] -> logits [B, L, V]."""
    with torch.no_grad():
        return model(input_ids).logits


def boundary_positions(length: int) -> list[int]:
    """Positions to perturb / differentiate in a length-``length`` sequence: the ends, and both sides of
    every power of two (where chunked and hierarchical models put their boundaries)."""
    positions = {0, 1, length // 2, length - 2, length - 1}
    p = 2
    while p < length:
        positions.update((p - 1, p))
        p *= 2
    return sorted(t for t in positions if 0 <= t < length)


# ------------------------------------------------------------------------------------ forward / loss
def assert_forward_shapes(
    model: nn.Module, vocab: int, lengths: Iterable[int] = (1, 7, 33, 100), batch_sizes: Iterable[int] = (1, 3)
) -> None:
    """Logits are [B, L, V] and finite for every (B, L), including lengths that are not powers of two."""
    for length in lengths:
        for batch in batch_sizes:
            logits = logits_of(model, random_ids(batch, length, vocab, seed=length * 10 + batch))
            assert tuple(logits.shape) == (batch, length, vocab), (
                f"B={batch}, L={length}: logits shape {tuple(logits.shape)}, expected {(batch, length, vocab)}"
            )
            assert torch.isfinite(logits).all(), f"B={batch}, L={length}: non-finite logits"


def _aux_weight(config: Any) -> float | None:
    """The configured aux-loss weight, if the config has exactly one field that looks like one."""
    names = [
        n
        for n in type(config).field_names()
        if "aux" in n and any(w in n for w in ("weight", "coef", "scale", "lambda"))
    ]
    return float(getattr(config, names[0])) if len(names) == 1 else None


def assert_loss_consistent(model: nn.Module, vocab: int, batch: int = 2, length: int = 33) -> None:
    """With labels (some -100): ``lm_loss`` equals the cross-entropy of the logits computed here,
    ``aux_loss`` is a finite scalar tensor, and ``loss`` is ``lm_loss + weight * aux_loss``."""
    ids = random_ids(batch, length, vocab, seed=1)
    labels = random_ids(batch, length, vocab, seed=2)
    labels[0, :3] = -100
    labels[-1, -1] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits.float().reshape(-1, vocab), labels.reshape(-1), ignore_index=-100)
    for field in ("loss", "lm_loss", "aux_loss"):
        value = getattr(out, field)
        assert isinstance(value, torch.Tensor) and value.dim() == 0, f"{field} must be a scalar tensor, got {value!r}"
        assert torch.isfinite(value), f"{field}={value.item()} is not finite"
    assert torch.allclose(out.lm_loss, expected, atol=1e-5), f"lm_loss={out.lm_loss.item()} != CE {expected.item()}"
    weight = _aux_weight(model.config)
    if float(out.aux_loss) == 0.0:
        assert torch.allclose(out.loss, out.lm_loss, atol=1e-6), "aux_loss is 0 but loss != lm_loss"
    elif weight is not None:
        total = out.lm_loss + weight * out.aux_loss
        assert torch.allclose(out.loss, total, atol=1e-5), f"loss={out.loss.item()} != lm + {weight} * aux"
    # else: the weight is not identifiable from the config; lm_loss and finiteness were still checked.


# ---------------------------------------------------------------------------------------- causality
def assert_causal_by_perturbation(
    model: nn.Module,
    vocab: int,
    length: int = 45,
    positions: Sequence[int] | None = None,
    atol: float = 1e-5,
    seed: int = 0,
) -> None:
    """Changing token t leaves the logits at positions < t unchanged (within ``atol``), for every t in
    ``positions``; and the logits at position t do change for at least one t (a model that ignores
    its input would otherwise pass)."""
    positions = list(positions) if positions is not None else boundary_positions(length)
    base = random_ids(1, length, vocab, seed=seed)
    batch = base.repeat(len(positions) + 1, 1)  # row 0 unchanged, row i+1 perturbed at positions[i]
    shifts = random_ids(1, len(positions), vocab - 1, seed=seed + 1)[0] + 1  # in [1, vocab): always a change
    for i, t in enumerate(positions):
        batch[i + 1, t] = (base[0, t] + shifts[i]) % vocab
    logits = logits_of(model, batch)
    reference = logits[0]
    any_changed_at_t = False
    for i, t in enumerate(positions):
        past_diff = (logits[i + 1, :t] - reference[:t]).abs().max().item() if t > 0 else 0.0
        assert past_diff <= atol, f"changing token {t} changed logits at earlier positions (max diff {past_diff:.3g})"
        any_changed_at_t |= (logits[i + 1, t] - reference[t]).abs().max().item() > atol
    assert any_changed_at_t, f"changing token t never changed the logits at t (positions {positions}): vacuous"


def find_token_embedding(model: nn.Module, vocab: int) -> nn.Embedding:
    """The model's token embedding: the first ``nn.Embedding`` with ``num_embeddings == vocab``."""
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.num_embeddings == vocab:
            return module
    raise AssertionError(f"no nn.Embedding with num_embeddings={vocab} found in {type(model).__name__}")


def assert_causal_by_gradient(
    model: nn.Module, vocab: int, length: int = 45, positions: Sequence[int] | None = None, seed: int = 0
) -> None:
    """The gradient of ``logits[:, t].sum()`` with respect to the token-embedding output is exactly zero
    at positions > t and nonzero at some position <= t, for every t in ``positions``.

    Run in eval mode (no dropout). The embedding output is captured with a forward hook calling
    ``retain_grad()``; each t gets a fresh forward/backward so gradients never accumulate.
    """
    positions = list(positions) if positions is not None else boundary_positions(length)
    embedding = find_token_embedding(model, vocab)
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        output.retain_grad()
        captured.append(output)

    was_training = model.training
    model.eval()
    handle = embedding.register_forward_hook(hook)
    try:
        ids = random_ids(2, length, vocab, seed=seed)
        for t in positions:
            captured.clear()
            logits = model(ids).logits
            assert captured, "the token embedding was not called in forward"
            logits[:, t].sum().backward()
            grads = [c.grad for c in captured if c.grad is not None]
            assert grads, f"t={t}: no gradient reached the token embedding output"
            for grad in grads:
                assert grad.shape[:2] == ids.shape, f"embedding output {tuple(grad.shape)} is not [B, L, D]"
                future = grad[:, t + 1 :]
                assert torch.count_nonzero(future) == 0, (
                    f"logits at t={t} depend on embeddings at later positions "
                    f"{sorted(set((future.abs().sum(-1) != 0).nonzero()[:, 1].add(t + 1).tolist()))[:8]}"
                )
            assert any(torch.count_nonzero(g[:, : t + 1]) > 0 for g in grads), f"t={t}: zero gradient to the past"
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def assert_iid_floor(
    model_factory: Callable[[], nn.Module],
    vocab: int = SMALL_VOCAB,
    steps: int = 60,
    batch: int = 16,
    length: int = 64,
    lr: float = 3e-3,
    tail: int = 10,
    margin: float = 0.02,
    seed: int = 0,
) -> dict[str, float]:
    """On fresh uniform random tokens each step nothing is learnable, so the expected next-token loss of
    any causal model is >= ln V. Train briefly (Adam) and require the mean ``lm_loss`` of the last
    ``tail`` steps, and ``lm_loss`` on a final fresh large batch, to stay >= ln V - ``margin``. A model
    that sees the future can copy the next token and goes well below.

    Returns the measured losses (for messages and tuning).
    """
    torch.manual_seed(seed)
    model = model_factory()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (batch, length + 1), generator=gen)
        input_ids, labels = shift_for_next_token(tokens)
        out = model(input_ids, labels=labels)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(out.lm_loss.item())
    model.eval()
    tokens = torch.randint(0, vocab, (4 * batch, length + 1), generator=gen)
    input_ids, labels = shift_for_next_token(tokens)
    with torch.no_grad():
        final = model(input_ids, labels=labels).lm_loss.item()
    floor = math.log(vocab) - margin
    tail_mean = sum(losses[-tail:]) / tail
    result = {"floor": floor, "tail_mean": tail_mean, "final": final, "first": losses[0]}
    assert tail_mean >= floor, f"mean loss of the last {tail} steps {tail_mean:.4f} < ln V - {margin} = {floor:.4f}"
    assert final >= floor, f"loss on a fresh batch {final:.4f} < ln V - {margin} = {floor:.4f}"
    return result


# ------------------------------------------------------------------------------------------ decoding
def assert_cached_decoding_matches(
    model: nn.Module,
    vocab: int,
    segments: Sequence[int] = (5,) + (1,) * 35 + (13,) + (1,) * 27,
    atol: float = 1e-4,
    batch: int = 2,
    continue_with_use_cache: bool = True,
) -> None:
    """Feed the sequence in ``segments`` (a prefill with ``use_cache=True``, then single tokens and
    multi-token chunks, each with the cache returned by the previous call) and compare every logit with
    one full forward pass. The default covers 80 tokens, past a 64-slot cache buffer's first growth.
    ``continue_with_use_cache=False`` passes the cache without ``use_cache`` after the prefill: by the
    protocol's rule a given cache is advanced all the same (and returned as the same object)."""
    length = sum(segments)
    ids = random_ids(batch, length, vocab, seed=3)
    full = logits_of(model, ids)
    pieces = []
    cache = None
    start = 0
    with torch.no_grad():
        for i, size in enumerate(segments):
            use_cache = continue_with_use_cache or i == 0
            out = model(ids[:, start : start + size], cache=cache, use_cache=use_cache)
            assert out.cache is not None, "use_cache=True returned no cache"
            assert cache is None or out.cache is cache, "a given cache must be advanced in place and returned"
            cache = out.cache
            assert cache.length == start + size, f"cache.length={cache.length}, expected {start + size}"
            pieces.append(out.logits)
            start += size
    cached = torch.cat(pieces, dim=1)
    assert cached.shape == full.shape
    diff = (cached - full).abs().amax(dim=(0, 2))  # [L]
    worst = int(diff.argmax())
    assert diff.max().item() <= atol, (
        f"cached logits differ from the full forward: max {diff.max().item():.3g} at position {worst} "
        f"(segments {list(segments)[:4]}...)"
    )


def prefill_then_steps(prefix: int, steps: Sequence[int], total: int) -> tuple[int, ...]:
    """Segments: ``prefix`` tokens, then ``steps`` cycled until ``total`` tokens (the last one cut)."""
    segments, filled, i = [prefix], prefix, 0
    while filled < total:
        size = min(steps[i % len(steps)], total - filled)
        segments.append(size)
        filled, i = filled + size, i + 1
    return tuple(segments)


def _state_tensors(state: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    for layer in state.layers:
        if layer is not None:
            layer.map(lambda t: found.append(t) or t)
    return found


def assert_detach_keeps_values_and_cuts_graph(
    model: nn.Module, vocab: int, prefix: int = 23, length: int = 41, atol: float = 1e-4
) -> None:
    """A state built with gradients on holds a graph; ``detach()`` (in place, returns itself) leaves no
    tensor with a graph, and continuing from it gives the logits of the full forward."""
    ids = random_ids(2, length, vocab, seed=11)
    full = logits_of(model, ids)
    state = model(ids[:, :prefix], use_cache=True).cache
    assert any(t.requires_grad for t in _state_tensors(state)), "the state built with grad enabled has no graph"
    assert state.detach() is state, "detach() must work in place and return the state"
    assert all(t.grad_fn is None and not t.requires_grad for t in _state_tensors(state)), "detach() left a graph"
    assert state.length == prefix
    with torch.no_grad():
        rest = model(ids[:, prefix:], cache=state).logits
    diff = (rest - full[:, prefix:]).abs().max().item()
    assert diff <= atol, f"continuing from a detached state differs from the full forward by {diff:.3g}"


def assert_state_round_trips(model: nn.Module, vocab: int, prefix: int = 21, length: int = 37) -> None:
    """``DecodingState.from_state_dict(state.state_dict())``, also through the checkpoint's tensor
    encoding, continues exactly (bit for bit) as the original state does."""
    from hierseq.modules.state import DecodingState
    from hierseq.training.checkpoint import decode_state, encode_state

    ids = random_ids(2, length, vocab, seed=12)
    with torch.no_grad():
        state = model(ids[:, :prefix], use_cache=True).cache
        tensors: dict[str, torch.Tensor] = {}
        encoded = encode_state(state.state_dict(), tensors)
        restored = DecodingState.from_state_dict(decode_state(encoded, tensors))
        assert restored.length == state.length and restored.num_floats() == state.num_floats()
        expected = model(ids[:, prefix:], cache=state).logits
        got = model(ids[:, prefix:], cache=restored).logits
    assert torch.equal(got, expected), f"restored state continues differently: {(got - expected).abs().max():.3g}"


def assert_greedy_generate_matches_full(
    model: nn.Module, vocab: int, prompt_length: int = 6, new_tokens: int = 12, batch: int = 2
) -> None:
    """``hierseq.generate(..., temperature=0)`` (cached) emits the tokens that repeated full forwards
    without a cache pick by argmax."""
    prompt = random_ids(batch, prompt_length, vocab, seed=4)
    generated = hierseq.generate(model, prompt, new_tokens, temperature=0)
    sequence = prompt
    for _ in range(new_tokens):
        next_ids = logits_of(model, sequence)[:, -1].argmax(-1)
        sequence = torch.cat([sequence, next_ids[:, None]], dim=1)
    assert torch.equal(generated, sequence), (
        f"cached greedy {generated[:, prompt_length:]} != {sequence[:, prompt_length:]}"
    )


# ------------------------------------------------------------------------------- other invariants
def _tied_groups(model: nn.Module) -> list[set[str]]:
    """Names of parameters sharing one tensor (tied weights), as sets of size >= 2."""
    by_id: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), set()).add(name)
    return sorted((g for g in by_id.values() if len(g) > 1), key=sorted)


def assert_save_load_roundtrip(model: nn.Module, directory: Path, vocab: int) -> nn.Module:
    """``hierseq.save`` then ``hierseq.load`` gives identical logits (bit for bit), an equal config, the
    same class and the same tied-weight groups. Returns the loaded model."""
    hierseq.save(model, directory)
    loaded = hierseq.load(directory).eval()
    assert type(loaded) is type(model)
    assert loaded.config == model.config and loaded.config.to_dict() == model.config.to_dict()
    assert _tied_groups(loaded) == _tied_groups(model), "tied weights were not restored"
    ids = random_ids(2, 19, vocab, seed=5)
    assert torch.equal(logits_of(loaded, ids), logits_of(model, ids)), "loaded model gives different logits"
    return loaded


def assert_batch_independent(
    model: nn.Module, vocab: int, batch: int = 3, length: int = 33, atol: float = 1e-5
) -> None:
    """Row b of a batched forward equals the forward of row b alone."""
    ids = random_ids(batch, length, vocab, seed=6)
    batched = logits_of(model, ids)
    for b in range(batch):
        alone = logits_of(model, ids[b : b + 1])
        diff = (batched[b] - alone[0]).abs().max().item()
        assert diff <= atol, f"row {b}: batched and single-row logits differ by {diff:.3g}"


def assert_deterministic(model_factory: Callable[[], nn.Module], vocab: int) -> None:
    """Two builds by ``model_factory`` (which seeds itself) have identical parameters and logits, and an
    eval forward repeated on one model gives identical logits."""
    first, second = model_factory().eval(), model_factory().eval()
    state_a, state_b = first.state_dict(), second.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), f"parameter {name} differs between seeded builds"
    ids = random_ids(2, 21, vocab, seed=7)
    logits = logits_of(first, ids)
    assert torch.equal(logits, logits_of(second, ids)), "seeded builds give different logits"
    assert torch.equal(logits, logits_of(first, ids)), "two eval forwards give different logits"


def assert_clear_input_errors(model: nn.Module, vocab: int) -> None:
    """Bad token ids fail with a ValueError / TypeError naming ``input_ids``, not an IndexError inside."""
    good = random_ids(2, 5, vocab, seed=8)
    too_big, negative = good.clone(), good.clone()
    too_big[1, 2] = vocab
    negative[0, 4] = -1
    bad_inputs = {
        "id == vocab_size": too_big,
        "id == -1": negative,
        "rank 1": good[0],
        "rank 3": good[:, :, None],
        "batch 0": good[:0],
        "length 0": good[:, :0],
        "float ids": good.float(),
    }
    for what, ids in bad_inputs.items():
        with pytest.raises((ValueError, TypeError), match="input_ids"):
            model(ids)
            raise AssertionError(f"{what}: no error raised")


def assert_gradients_reach_all_parameters(model: nn.Module, vocab: int, min_nonzero_fraction: float = 0.9) -> None:
    """After one backward of the loss on a small batch, every trainable parameter has a finite gradient,
    and at least ``min_nonzero_fraction`` of the parameter tensors have a nonzero one."""
    was_training = model.training
    model.train()
    model.zero_grad(set_to_none=True)
    tokens = random_ids(2, 34, vocab, seed=9)
    input_ids, labels = shift_for_next_token(tokens)
    model(input_ids, labels=labels).loss.backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    try:
        missing = [n for n, p in params if p.grad is None]
        assert not missing, f"no gradient reached: {missing[:8]}"
        not_finite = [n for n, p in params if not torch.isfinite(p.grad).all()]
        assert not not_finite, f"non-finite gradients: {not_finite[:8]}"
        zero = [n for n, p in params if torch.count_nonzero(p.grad) == 0]
        assert len(zero) <= (1 - min_nonzero_fraction) * len(params), f"all-zero gradients: {zero[:8]}"
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
