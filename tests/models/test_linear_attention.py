"""Linear attention as a language model: recurrent decoding equals the full forward with a constant state,
the state-size formula, config errors. The op is tested in ``tests/ops/test_linear_attention.py``, the
mixer in ``tests/mixers/test_linear_attention.py``."""

from __future__ import annotations

import pytest
import torch

import hierseq
from hierseq.mixers.linear_attention import LinearAttention
from hierseq.models.causal_lms import LinearAttentionConfig
from hierseq.modules.state import DecodingState, RecurrentState


def test_model_step_equals_full_forward_and_state_is_constant() -> None:
    torch.manual_seed(0)
    model = hierseq.build_model("linear_attn", **LinearAttentionConfig.small_overrides(), vocab_size=32).eval()
    ids = torch.randint(0, 32, (2, 40))
    full = model(ids).logits
    cache, steps = None, []
    with torch.no_grad():
        for t in range(40):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            assert cache is None or out.cache is cache  # a given cache is advanced in place
            cache = out.cache
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full.detach(), rtol=1e-4, atol=1e-5)
    assert isinstance(cache, DecodingState) and cache.length == 40
    assert all(isinstance(s, RecurrentState) for s in cache.layers)
    assert cache.detach() is cache
    floats = sum(s.conv.numel() + s.memory.numel() for s in cache.layers) // 2  # per batch row
    assert floats == cache.num_floats() // 2 == model.state_floats(40) == model.state_floats(1)
    assert all(isinstance(b.mixer, LinearAttention) for b in model.blocks)
    assert model.state_floats(40) == model.config.n_layers * model.blocks[0].mixer.state_size(40)


def test_state_size_formula() -> None:
    model = hierseq.build_model("linear_attn", d_model=64, n_layers=2, n_heads=1, key_dim=64, conv_kernel=4)
    # per layer: 1 head x 64 keys x (64 values + normaliser) + conv window (64 + 64 + 64 channels x 3 taps)
    assert model.state_floats(100) == 2 * (64 * 65 + 192 * 3)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [("n_heads", 3, "d_model=.*n_heads=3"), ("key_dim", -1, "key_dim=-1"), ("conv_kernel", 0, "conv_kernel=0"),
     ("chunk_size", 0, "chunk_size=0")],
)  # fmt: skip
def test_config_errors(field: str, value: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LinearAttentionConfig(**{field: value})
