"""Mamba as a language model: the mixers keep the reference initialisation under the shell's init, config
validation, the two scan paths agree inside the model, O(1) recurrent cache with TBPTT detach. The mixer
is tested in ``tests/mixers/test_mamba.py``, the scans in ``tests/ops/test_selective_scan.py``."""

from __future__ import annotations

import math

import pytest
import torch

import hierseq
from hierseq.mixers.mamba import Mamba, MambaState
from hierseq.models.causal_lms import MambaConfig
from hierseq.modules.state import DecodingState


def small_mamba(seed: int = 0, **over):
    torch.manual_seed(seed)
    return hierseq.build_model("mamba", **{"vocab_size": 32, "d_model": 16, "n_layers": 2, "d_state": 4, **over}).eval()


def test_reference_initialisation_survives_the_shell_init() -> None:
    model = small_mamba(d_model=32, d_state=8)
    assert model.config.mlp == "none" and all(b.mlp is None for b in model.blocks)  # as in the reference
    for block in model.blocks:
        mixer = block.mixer
        assert isinstance(mixer, Mamba) and mixer.dt_rank == math.ceil(32 / 16)
        torch.testing.assert_close(-torch.exp(mixer.A_log), -torch.arange(1, 9, dtype=torch.float32).repeat(64, 1))
        torch.testing.assert_close(mixer.D, torch.ones(64))
        dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
        assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
        assert mixer.dt_proj.weight.abs().max() <= mixer.dt_rank**-0.5
        for layer in (mixer.in_proj, mixer.x_proj):  # torch's default init, as in the reference
            assert layer.weight.abs().max() <= layer.in_features**-0.5
            assert layer.weight.std() > 2 * model.config.init_std
        # the residual projection: std init_std / sqrt(2 n_layers)
        std = model.config.init_std / math.sqrt(2 * model.config.n_layers)
        assert abs(mixer.out_proj.weight.std().item() - std) < 0.2 * std


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("d_state", 0, "d_state=0"),
        ("expand", 1.5, "expand=1.5"),
        ("dt_rank", -1, "dt_rank=-1"),
        ("dt_init", "zeros", "dt_init='zeros'"),
        ("scan", "cuda", "scan='cuda'"),
        ("dt_min", 0.5, "dt_min=0.5"),
    ],
)
def test_config_errors_name_field_and_value(field: str, value, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MambaConfig(**{field: value})


def test_reference_scan_config_gives_the_same_logits() -> None:
    ids = torch.randint(0, 32, (2, 37), generator=torch.Generator().manual_seed(1))
    fast = small_mamba(scan="fast")
    ref = small_mamba(scan="reference")
    assert all(b.mixer.cfg.scan == "reference" for b in ref.blocks)
    ref.load_state_dict(fast.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_token_by_token_steps_equal_the_parallel_forward() -> None:
    model = small_mamba()
    ids = torch.randint(0, 32, (3, 25), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        cache = None
        steps = []
        for t in range(ids.shape[1]):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)
    assert isinstance(cache, DecodingState) and cache.length == 25
    assert all(isinstance(s, MambaState) for s in cache.layers)


def test_cache_size_is_constant_in_sequence_length() -> None:
    model = small_mamba()
    sizes = []
    for length in (8, 200):
        with torch.no_grad():
            cache = model(torch.zeros(1, length, dtype=torch.long), use_cache=True).cache
        sizes.append(sum(s.conv.numel() + s.ssm.numel() for s in cache.layers))
        assert cache.num_floats() == sizes[-1] == model.state_floats(length)
    assert sizes[0] == sizes[1] == 2 * (32 * 3 + 32 * 4)  # layers * (d_inner*(d_conv-1) + d_inner*d_state)


def test_detach_cuts_the_graph_for_tbptt() -> None:
    model = small_mamba().train()
    assert model.tbptt_refusal() is None
    ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(3))
    out = model(ids[:, :6], labels=ids[:, :6], use_cache=True)
    assert out.cache.layers[0].ssm.requires_grad
    cache = out.cache.detach()
    assert cache is out.cache and isinstance(cache, DecodingState)
    assert not any(s.ssm.requires_grad or s.conv.requires_grad for s in cache.layers)
    out2 = model(ids[:, 6:], labels=ids[:, 6:], cache=cache, use_cache=True)
    out2.loss.backward()  # would raise if the first segment's graph were still attached and freed
    assert all(p.grad is not None for p in model.parameters())


def test_cache_of_another_batch_size_is_rejected() -> None:
    model = small_mamba()
    with torch.no_grad():
        cache = model(torch.zeros(2, 4, dtype=torch.long), use_cache=True).cache
        with pytest.raises(ValueError, match="cache"):
            model(torch.zeros(3, 1, dtype=torch.long), cache=cache, use_cache=True)
