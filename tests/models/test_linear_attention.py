"""Linear attention: chunked path vs the loop over time, recurrent step, state size, config errors."""

from __future__ import annotations

import pytest
import torch

import hierseq
from hierseq.models.linear_attention import (
    LinearAttentionCache,
    LinearAttentionConfig,
    linear_attention_chunked,
    linear_attention_reference,
    linear_attention_step,
)


def _inputs(length: int = 29, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(2, 3, length, 4, generator=g, dtype=torch.float64) + 0.1  # positive, like elu + 1
    k = torch.rand(2, 3, length, 4, generator=g, dtype=torch.float64) + 0.1
    v = torch.randn(2, 3, length, 5, generator=g, dtype=torch.float64)
    state = torch.rand(2, 3, 4, 6, generator=g, dtype=torch.float64)
    return q, k, v, state


@pytest.mark.parametrize("chunk_size", [1, 8, 29, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_reference(chunk_size: int, with_state: bool) -> None:
    q, k, v, state = _inputs()
    state = state if with_state else None
    out_ref, final_ref = linear_attention_reference(q, k, v, state)
    out, final = linear_attention_chunked(q, k, v, state, chunk_size)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


def test_step_is_normalised_attention_by_hand() -> None:
    # two tokens, one head: out_2 = (q.k1 v1 + q.k2 v2) / (q.k1 + q.k2)
    q = torch.tensor([[[1.0, 2.0]]])
    k1, k2 = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[0.0, 1.0]]])
    v1, v2 = torch.tensor([[[3.0]]]), torch.tensor([[[6.0]]])
    _, state = linear_attention_step(q, k1, v1, None)
    out, state = linear_attention_step(q, k2, v2, state)
    torch.testing.assert_close(out, torch.tensor([[[(1 * 3 + 2 * 6) / 3.0]]]), rtol=1e-5, atol=1e-5)
    assert state.shape == (1, 1, 2, 2)


def test_model_step_equals_full_forward_and_state_is_constant() -> None:
    torch.manual_seed(0)
    model = hierseq.build_model("linear_attn", **LinearAttentionConfig.small_overrides(), vocab_size=32).eval()
    ids = torch.randint(0, 32, (2, 40))
    full = model(ids).logits
    cache, steps = None, []
    with torch.no_grad():
        for t in range(40):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full.detach(), rtol=1e-4, atol=1e-5)
    assert isinstance(cache, LinearAttentionCache) and cache.length == 40
    assert cache.detach() is cache
    floats = sum(c.numel() + s.numel() for c, s in cache.layers) // 2  # per batch row
    assert floats == model.config.n_layers * model.state_size()


def test_state_size_formula() -> None:
    model = hierseq.build_model("linear_attn", d_model=64, n_layers=2, n_heads=1, key_dim=64, conv_kernel=4)
    # 1 head x 64 keys x (64 values + normaliser) + conv window (64 + 64 + 64 channels x 3 taps)
    assert model.state_size() == 64 * 65 + 192 * 3


@pytest.mark.parametrize(("field", "value"), [("n_heads", 3), ("key_dim", -1), ("conv_kernel", 0), ("chunk_size", 0)])
def test_config_errors(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=f"{field if field != 'n_heads' else 'd_model'}="):
        LinearAttentionConfig(**{field: value})
