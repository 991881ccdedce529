"""Flat masked autoencoder (the HAMA comparison point): config rules, masking arithmetic, the MAE
property (hidden positions never reach the model) and that it learns."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import hierseq
from hierseq.models.flat_mae import FlatMAE, FlatMAEConfig


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small(**extra) -> FlatMAE:
    torch.manual_seed(0)
    return FlatMAE(FlatMAEConfig(**{**FlatMAEConfig.small_overrides(), **extra})).eval()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mask_ratio": 0.0}, r"mask_ratio=0.0: must be a number in \(0, 1\)"),
        ({"mask_ratio": 1.0}, "mask_ratio=1.0"),
        ({"decoder_layers": 0}, "decoder_layers=0: must be a positive integer"),
        ({"input_type": "pixels"}, "input_type='pixels'"),
        ({"d_model": 33, "n_heads": 3}, "d_model=33: must be even"),
        ({"loss_on": "visible"}, "loss_on='visible'"),
    ],
)
def test_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FlatMAEConfig(**kwargs)


def test_masked_count_arithmetic() -> None:
    cfg = FlatMAEConfig(mask_ratio=0.25)
    assert [cfg.n_masked(n) for n in (1, 2, 3, 4, 10, 128)] == [0, 1, 1, 1, 2, 32]
    assert FlatMAEConfig(mask_ratio=0.99).n_masked(10) == 9  # always one visible


def test_mask_counts_and_fresh_random_masks_in_training() -> None:
    model = small(mask_ratio=0.5).train()
    x = torch.randint(0, 256, (3, 40))
    torch.manual_seed(0)
    a = model(x).mask
    b = model(x).mask
    assert a.sum(1).tolist() == [20, 20, 20]
    assert not torch.equal(a, b) and not torch.equal(a[0], a[1])
    model.eval()
    assert torch.equal(model(x).mask, model(x).mask)


def test_masked_inputs_never_reach_the_output_and_visible_ones_do() -> None:
    model = small(input_type="continuous", d_input=4)
    x = torch.randn(2, 30, 4)
    with torch.no_grad():
        base = model(x)
        x2 = x.clone()
        x2[base.mask] = -50.0
        assert torch.equal(model(x2).reconstruction, base.reconstruction)
        x3 = x.clone()
        x3[~base.mask] += 1.0
        assert not torch.allclose(model(x3).reconstruction, base.reconstruction)


def test_loss_on_all_positions() -> None:
    model = small(input_type="continuous", d_input=4, loss_on="all")
    x = torch.randn(2, 16, 4)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out.loss, (out.reconstruction - x).pow(2).mean())


def test_learns_to_reconstruct_a_signal(tmp_path) -> None:
    from hierseq.training import TrainConfig, train

    result = train(
        TrainConfig(
            model="flat_mae",
            model_config=FlatMAEConfig.small_overrides(),
            task="masked_signal",
            task_options={"channels": 2},
            seq_len=32,
            batch_size=8,
            max_steps=150,
            lr=5e-3,
            warmup_steps=10,
            weight_decay=0.01,
            eval_every=0,
            eval_batches=2,
            eval_batch_size=16,
            log_every=50,
            save_every=0,
            out_dir=str(tmp_path),
            progress=False,
        ),
        log=None,
    )
    final = result["val"]
    assert final["masked_mse"] < 0.5 * final["mean_baseline_mse"], final


def test_registered_as_masked_autoencoder() -> None:
    assert hierseq.get_entry("flat_mae").kind == "masked_ae"
    assert isinstance(hierseq.build_model("flat_mae", **FlatMAEConfig.small_overrides()), FlatMAE)
