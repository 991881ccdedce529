"""The masked-autoencoder contract, checked for every model registered with ``kind="masked_ae"`` and for
both input types (byte ids and continuous features).

``forward(x) -> MaskedAEOutput(reconstruction, loss, mask, aux_loss)``: ids [B, L] -> logits [B, L, V]
(or features [B, L, C] -> [B, L, C]), mask [B, L] bool (True = hidden from the encoder), scalar loss.
Models are built through the registry at ``small_overrides()`` size, seeded, in eval mode unless a test
needs training mode. In eval mode masks are deterministic, which the exactness checks rely on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hierseq

from .conftest import MASKED_AES

VOCAB = 32
CHANNELS = 3
INPUT_TYPES = ("tokens", "continuous")
CASES = [(name, kind) for name in MASKED_AES for kind in INPUT_TYPES]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # The CI box has 2 cores shared with other jobs; one thread is both faster and steadier there.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def overrides(name: str, input_type: str) -> dict:
    extra = {"vocab_size": VOCAB} if input_type == "tokens" else {"input_type": "continuous", "d_input": CHANNELS}
    return {**hierseq.get_entry(name).config_cls.small_overrides(), **extra}


def build(name: str, input_type: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return hierseq.build_model(name, **overrides(name, input_type)).eval()


def make_input(input_type: str, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if input_type == "tokens":
        return torch.randint(0, VOCAB, (batch, length), generator=gen)
    return torch.randn(batch, length, CHANNELS, generator=gen)


def run(model: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("name,input_type", CASES)
def test_output_shapes_mask_and_loss(name: str, input_type: str) -> None:
    model = build(name, input_type)
    out_dim = VOCAB if input_type == "tokens" else CHANNELS
    for length in (1, 7, 33, 100):
        for batch in (1, 3):
            x = make_input(input_type, batch, length, seed=length + batch)
            out = run(model, x)
            assert tuple(out.reconstruction.shape) == (batch, length, out_dim)
            assert torch.isfinite(out.reconstruction).all()
            assert out.mask.dtype == torch.bool and tuple(out.mask.shape) == (batch, length)
            n_masked = out.mask.sum(1)
            assert (n_masked == n_masked[0]).all(), "every row must hide the same number of positions"
            assert int(n_masked[0]) < length, "at least one position must stay visible"
            if length > 1:
                assert int(n_masked[0]) >= 1, f"L={length}: nothing masked"
            assert out.loss.dim() == 0 and torch.isfinite(out.loss)
            assert float(out.aux_loss) == 0.0


@pytest.mark.parametrize("name,input_type", CASES)
def test_loss_is_the_masked_reconstruction_loss(name: str, input_type: str) -> None:
    model = build(name, input_type)
    x = make_input(input_type, 2, 40, seed=3)
    out = run(model, x)
    rec, mask = out.reconstruction, out.mask
    if input_type == "tokens":
        expected = F.cross_entropy(rec[mask], x[mask])
    else:
        expected = F.mse_loss(rec[mask], x[mask])
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,input_type", CASES)
def test_save_load_round_trip_is_exact(name: str, input_type: str, tmp_path: Path) -> None:
    model = build(name, input_type)
    hierseq.save(model, tmp_path / "m")
    loaded = hierseq.load(tmp_path / "m").eval()
    assert loaded.config == model.config
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    x = make_input(input_type, 2, 29, seed=4)
    a, b = run(model, x), run(loaded, x)
    assert torch.equal(a.reconstruction, b.reconstruction) and torch.equal(a.mask, b.mask)


@pytest.mark.parametrize("name,input_type", CASES)
def test_deterministic_under_seed_and_in_eval(name: str, input_type: str) -> None:
    x = make_input(input_type, 2, 30, seed=5)
    a, b = build(name, input_type, seed=7), build(name, input_type, seed=7)
    out_a, out_a2, out_b = run(a, x), run(a, x), run(b, x)
    assert torch.equal(out_a.reconstruction, out_a2.reconstruction), "eval forward is not repeatable"
    assert torch.equal(out_a.mask, out_a2.mask)
    assert torch.equal(out_a.reconstruction, out_b.reconstruction), "same seed, different model"
    c = build(name, input_type, seed=8)
    assert not torch.equal(run(c, x).reconstruction, out_a.reconstruction), "the seed has no effect"
    # Training mode: the same global seed gives the same masks and loss.
    a.train()
    torch.manual_seed(11)
    t1 = a(x)
    torch.manual_seed(11)
    t2 = a(x)
    assert torch.equal(t1.mask, t2.mask) and torch.equal(t1.loss, t2.loss)


@pytest.mark.parametrize("name,input_type", CASES)
def test_batch_rows_are_independent(name: str, input_type: str) -> None:
    model = build(name, input_type)
    x = make_input(input_type, 4, 37, seed=6)
    full = run(model, x)
    for row in range(4):
        alone = run(model, x[row : row + 1])
        torch.testing.assert_close(full.reconstruction[row : row + 1], alone.reconstruction, rtol=1e-4, atol=1e-5)
        assert torch.equal(full.mask[row : row + 1], alone.mask)


@pytest.mark.parametrize("name,input_type", CASES)
def test_masked_inputs_do_not_reach_the_output(name: str, input_type: str) -> None:
    """Hidden positions are dropped before the encoder: changing them (with the mask held fixed) changes
    nothing, while changing a visible position changes the reconstruction."""
    torch.manual_seed(0)
    over = overrides(name, input_type)
    if "mask_strategy" in hierseq.get_entry(name).config_cls.field_names():
        over["mask_strategy"] = "random"  # a fixed eval mask; the learned scorer is tested in test_hama
    model = hierseq.build_model(name, **over).eval()
    x = make_input(input_type, 2, 48, seed=7)
    base = run(model, x)
    perturbed = x.clone()
    if input_type == "tokens":
        perturbed[base.mask] = (perturbed[base.mask] + 1) % VOCAB
    else:
        perturbed[base.mask] += 5.0
    out = run(model, perturbed)
    assert torch.equal(out.mask, base.mask)
    assert torch.equal(out.reconstruction, base.reconstruction), "masked inputs influenced the output"
    visible = x.clone()
    pos = int((~base.mask[0]).nonzero()[0])
    if input_type == "tokens":
        visible[0, pos] = (visible[0, pos] + 1) % VOCAB
    else:
        visible[0, pos] += 5.0
    assert not torch.equal(run(model, visible).reconstruction[0], base.reconstruction[0]), "output ignores input"


@pytest.mark.parametrize("name,input_type", CASES)
def test_outputs_differ_across_positions(name: str, input_type: str) -> None:
    """Even for a constant input, positional output queries give different outputs per position."""
    model = build(name, input_type)
    x = make_input(input_type, 1, 32, seed=8)
    x = x[:, :1].expand_as(x).contiguous()
    rec = run(model, x).reconstruction[0]
    spread = (rec - rec.mean(0, keepdim=True)).abs().amax(-1)  # [L]
    assert float(spread.min()) > 1e-4 or float(spread.max()) > 1e-2
    distinct = torch.unique(rec.round(decimals=4), dim=0).shape[0]
    assert distinct >= 16, f"only {distinct} distinct output rows of 32"


@pytest.mark.parametrize("name,input_type", CASES)
def test_bad_inputs_raise_clear_errors(name: str, input_type: str) -> None:
    model = build(name, input_type)
    bad: list[object]
    if input_type == "tokens":
        bad = [
            torch.randn(2, 8),  # float ids
            torch.zeros(2, 8, 3, dtype=torch.long),  # rank 3
            torch.full((2, 8), VOCAB),  # out of range
            torch.full((2, 8), -1),
            torch.zeros(2, 0, dtype=torch.long),  # empty
            [[1, 2, 3]],  # not a tensor
        ]
    else:
        bad = [
            torch.zeros(2, 8, CHANNELS, dtype=torch.long),  # integer features
            torch.randn(2, 8),  # rank 2
            torch.randn(2, 8, CHANNELS + 1),  # wrong feature size
            torch.randn(2, 0, CHANNELS),
        ]
    for x in bad:
        with pytest.raises((ValueError, TypeError), match="x"):
            model(x)


@pytest.mark.parametrize("name,input_type", CASES)
def test_gradients_reach_every_parameter(name: str, input_type: str) -> None:
    model = build(name, input_type).train()
    torch.manual_seed(0)
    model(make_input(input_type, 3, 40, seed=9)).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no finite gradient for {missing[:5]}"
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    if input_type == "tokens":
        zero = [n for n in zero if "embed" not in n]  # rows of absent tokens may stay 0, but not all
    assert not zero, f"zero gradient for {zero[:5]}"


def test_registry_lists_the_masked_autoencoders() -> None:
    assert {"hama", "flat_mae"} <= set(MASKED_AES)
    for name in MASKED_AES:
        assert hierseq.get_entry(name).kind == "masked_ae"
