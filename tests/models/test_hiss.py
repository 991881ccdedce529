"""HiSS and the seed API: the seed's defects stay fixed, chunking is what the paper defines."""

from __future__ import annotations

import pytest
import torch

import hierseq
from hierseq.compat.hiss import HSSS, LowLevelMamba
from hierseq.mixers.mamba import Mamba, MambaState
from hierseq.models.hiss import HiSSConfig
from hierseq.modules.state import DecodingState


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run many small ops: one intra-op thread avoids spin contention on a busy 2-core CI box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SEED_KW = dict(dt_min=0.001, dt_max=0.1, dt_init="random", dt_scale=1.0, bias=False, conv_bias=True, pscan=True)


def readme_hsss(seed: int = 0, **over) -> HSSS:
    """The seed README's example model, argument for argument."""
    torch.manual_seed(seed)
    lows = [LowLevelMamba(dim=8, depth=6, dt_rank=4, d_state=4, expand_factor=4, d_conv=6, **SEED_KW) for _ in range(3)]
    return HSSS(
        layers=lows,
        dim=12,
        depth=3,
        dt_rank=2,
        d_state=2,
        expand_factor=2,
        d_conv=3,
        proj_layer=True,
        **SEED_KW,
        **over,
    )


def test_readme_example_runs_with_documented_shape() -> None:
    x = torch.randn(1, 10, 8, generator=torch.Generator().manual_seed(0))
    out = readme_hsss()(x)
    assert out.shape == (1, 1, 12)  # T // chunk_size = 10 // 10 chunks, width dim
    assert readme_hsss(chunk_size=5)(x).shape == (1, 2, 12)
    assert readme_hsss(chunk_size=4)(x).shape == (1, 2, 12)  # 10 = 2 * 4 + 2: the 2 trailing steps are dropped
    assert readme_hsss(chunk_size=4, remainder="partial")(x).shape == (1, 3, 12)
    assert readme_hsss(d_out=3)(x).shape == (1, 1, 3)


def test_seed_defect_outputs_are_identical_across_calls() -> None:
    model = readme_hsss().eval()
    x = torch.randn(2, 20, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(model(x), model(x))
    hiss = hierseq.build_model("hiss", **HiSSConfig.small_overrides()).eval()
    x3 = torch.randn(2, 12, 3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(hiss(x3).prediction, hiss(x3).prediction)


def test_seed_defect_all_parameters_registered_and_trained() -> None:
    model = readme_hsss(d_out=2)
    names = {n for n, _ in model.named_parameters()}
    for i in range(3):
        assert any(n.startswith(f"layers.{i}.") for n in names), f"low-level model {i} is not registered"
    assert set(model.state_dict()) >= names
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(2, 20, 8, generator=torch.Generator().manual_seed(3))
    loss = model(x).pow(2).mean()
    loss.backward()
    optimizer.step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not unchanged, f"not trained by an optimiser step: {unchanged[:5]}"


@pytest.mark.parametrize("length, chunk", [(40, 10), (43, 10), (12, 4)])
def test_seed_defect_high_level_sees_t_over_c_steps(length: int, chunk: int) -> None:
    seen = []
    model = readme_hsss(chunk_size=chunk)
    model.high.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
    model(torch.randn(2, length, 8))
    assert seen == [(2, length // chunk, 12)]
    hiss = hierseq.build_model("hiss", **{**HiSSConfig.small_overrides(), "chunk_size": chunk})
    seen.clear()
    hiss.high.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
    assert hiss(torch.randn(2, length, 3)).prediction.shape == (2, length // chunk, 2)
    assert seen == [(2, length // chunk, 16)]


def test_low_level_state_resets_at_every_chunk() -> None:
    """A chunk's feature depends on that chunk's inputs only, not on earlier chunks."""
    model = hierseq.build_model("hiss", **HiSSConfig.small_overrides()).eval()  # chunk_size 4
    x = torch.randn(1, 16, 3, generator=torch.Generator().manual_seed(4))
    x2 = x.clone()
    x2[:, 5] += 3.0  # inside chunk 1
    with torch.no_grad():
        f, f2 = model.chunk_features(x), model.chunk_features(x2)
    diff = (f - f2).abs().amax(dim=-1)[0]
    assert diff[0] == 0 and diff[2] == 0 and diff[3] == 0
    assert diff[1] > 1e-4


def test_partial_remainder_prediction_equals_prefix_forward() -> None:
    """With remainder='partial' the last prediction of T = 14 (C = 4) is made from steps 12, 13 only as
    the low-level input, and the full chunks' predictions equal those of the T = 12 forward."""
    model = hierseq.build_model("hiss", **HiSSConfig.small_overrides(), remainder="partial").eval()
    x = torch.randn(2, 14, 3, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        p14 = model(x).prediction
        p12 = model(x[:, :12]).prediction
    assert p14.shape == (2, 4, 2) and p12.shape == (2, 3, 2)
    torch.testing.assert_close(p14[:, :3], p12, rtol=1e-5, atol=1e-6)


def test_too_short_input_is_a_clear_error() -> None:
    model = hierseq.build_model("hiss", **HiSSConfig.small_overrides())
    with pytest.raises(ValueError, match="chunk_size=4"):
        model(torch.randn(1, 3, 3))


def test_low_level_mamba_honours_its_arguments() -> None:
    torch.manual_seed(0)
    low = LowLevelMamba(dim=8, depth=2, dt_rank=3, d_state=5, expand_factor=3, d_conv=6, bias=True, conv_bias=False)
    mixer = low.stack.blocks[0].mixer
    assert len(low.stack.blocks) == 2
    assert mixer.d_inner == 24 and mixer.d_state == 5 and mixer.dt_rank == 3
    assert mixer.conv.kernel_size == 6 and mixer.conv.bias is None
    assert mixer.in_proj.bias is not None and mixer.out_proj.bias is not None
    sequential = LowLevelMamba(
        dim=8, depth=2, dt_rank=3, d_state=5, expand_factor=3, d_conv=6, bias=True, conv_bias=False, pscan=False
    )
    sequential.load_state_dict(low.state_dict())
    assert sequential.stack.blocks[0].mixer.cfg.scan == "reference"
    x = torch.randn(2, 9, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(low(x), sequential(x), rtol=1e-5, atol=1e-5)


def test_low_level_mamba_state_is_a_decoding_state_that_continues() -> None:
    torch.manual_seed(0)
    low = LowLevelMamba(dim=8, depth=2, d_state=4).eval()
    assert all(isinstance(block.mixer, Mamba) for block in low.stack.blocks)
    x = torch.randn(2, 15, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = low(x)
        h1, state = low(x[:, :6], return_state=True)
        assert isinstance(state, DecodingState) and state.length == 6
        assert all(isinstance(s, MambaState) for s in state.layers)
        h2, same = low(x[:, 6:7], state, return_state=True)  # one step: the recurrent path
        h3, same_again = low(x[:, 7:], state, return_state=True)  # a chunk from the carried state
    assert same is state and same_again is state and state.length == 15
    torch.testing.assert_close(torch.cat([h1, h2, h3], 1), full, rtol=1e-4, atol=1e-5)


def test_hsss_argument_errors() -> None:
    lows = [LowLevelMamba(dim=8, depth=1), LowLevelMamba(dim=4, depth=1)]
    with pytest.raises(ValueError, match="layers"):
        HSSS(layers=lows, dim=12, depth=1)
    with pytest.raises(ValueError, match="proj_layer"):
        HSSS(layers=[LowLevelMamba(dim=8, depth=1)], dim=12, depth=1, proj_layer=False)
    with pytest.raises(ValueError, match="chunk_size"):
        HSSS(layers=[LowLevelMamba(dim=8, depth=1)], dim=12, depth=1, chunk_size=0)
    with pytest.raises(TypeError, match="dtype"):
        readme_hsss()(torch.zeros(1, 10, 8, dtype=torch.long))  # the seed README's crash, now a clear error


@pytest.mark.parametrize(
    "field, value",
    [("low_level", "s4"), ("high_level", "gru"), ("chunk_size", 0), ("remainder", "pad"), ("d_low", -1)],
)
def test_config_errors(field: str, value) -> None:
    with pytest.raises(ValueError, match=f"{field}="):
        HiSSConfig(**{field: value})


def test_transformer_level_needs_even_head_dim() -> None:
    with pytest.raises(ValueError, match="n_heads"):
        HiSSConfig(d_model=18, n_heads=2, high_level="transformer")  # head dim 9
