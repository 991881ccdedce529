"""The masked-autoencoder tasks: options, data, metrics and short runs through the one loop."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import hierseq
from hierseq.models.hama import HAMAConfig
from hierseq.training import TrainConfig, train
from hierseq.training.metrics import read_metrics
from hierseq.training.tasks.masked import MaskedBytesTask, MaskedSignalTask, SinusoidSignals, evaluate_masked


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task": "masked_bytes"}, "task='masked_bytes': trains masked_ae models; transformer is a causal_lm"),
        ({"model": "hama", "task": "images"}, "task='images'"),
        ({"model": "hama", "seq_len": 0}, "seq_len=0: must be a positive integer"),
        ({"model": "hama", "lr": 0.0}, "lr=0.0"),
        ({"model": "hama", "model_config": {"d_modle": 3}}, "d_modle=3: unknown config field"),
        ({"model": "hama", "model_config": {"n_masks": [1, 2]}}, "explicit configuration needs all"),
        ({"model": "hama", "task": "masked_signal", "task_options": {"channels": 0}}, "task_options.channels=0"),
    ],
)
def test_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_config_yaml_and_signal_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: flat_mae\ntask: masked_signal\nlr: 1e-3\ntask_options:\n  channels: 5\n")
    cfg = TrainConfig.from_yaml(path)
    assert cfg.lr == 1e-3 and cfg.model_overrides() == {"input_type": "continuous", "d_input": 5}
    with pytest.raises(ValueError, match="stepz=3: unknown TrainConfig field"):
        TrainConfig.from_dict({"model": "flat_mae", "stepz": 3})


def test_every_masked_yaml_config_in_configs_is_valid() -> None:
    root = Path(__file__).resolve().parents[2] / "configs"
    paths = sorted(root.glob("hama*.yaml")) + sorted(root.glob("flat_mae*.yaml"))
    assert len(paths) == 4, paths
    for path in paths:
        cfg = TrainConfig.from_yaml(path)
        assert cfg.task in ("masked_bytes", "masked_signal"), path
        hierseq.build_config(cfg.model, **cfg.model_overrides())


def test_signal_task_is_seeded_and_unit_scale() -> None:
    signals = SinusoidSignals(4)
    a = signals.sample(64, 256, torch.Generator().manual_seed(0))
    b = signals.sample(64, 256, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (64, 256, 4)
    assert 0.8 < float(a.var()) < 1.2
    assert float((a[:, 1:] - a[:, :-1]).pow(2).mean()) < 0.5 * float(a.var()), "signals must be smooth"


def test_signal_validation_data_never_come_from_a_training_seed() -> None:
    cfg = TrainConfig(model="flat_mae", task="masked_signal", seq_len=16, batch_size=2, eval_batches=1, seed=3)
    task = MaskedSignalTask(cfg)
    task.setup(0, 1, torch.device("cpu"))
    expected = SinusoidSignals(8).sample(2, 16, torch.Generator().manual_seed(10_003))
    assert torch.equal(task.eval_inputs[0], expected)
    assert not torch.equal(task.next_batch()[0], expected)


def test_evaluate_masked_metrics_match_a_hand_computation() -> None:
    torch.manual_seed(0)
    model = hierseq.build_model("flat_mae", **{**hierseq.get_entry("flat_mae").config_cls.small_overrides()}).eval()
    x = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        out = model(x)
    metrics = evaluate_masked(model, [x])
    mask = out.mask
    acc = (out.reconstruction.argmax(-1) == x)[mask].float().mean()
    ce = torch.nn.functional.cross_entropy(out.reconstruction[mask], x[mask])
    assert metrics["masked_acc"] == pytest.approx(float(acc))
    assert metrics["masked_ce"] == pytest.approx(float(ce), rel=1e-5)
    assert metrics["mask_fraction"] == pytest.approx(4 / 20)
    assert model.training is False


def test_short_byte_run_on_a_local_file_improves_and_saves(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 400)
    cfg = TrainConfig(
        model="hama",
        model_config=HAMAConfig.small_overrides(),
        data=str(text),
        seq_len=32,
        batch_size=8,
        max_steps=40,
        lr=3e-3,
        warmup_steps=5,
        log_every=20,
        eval_every=0,
        eval_batches=2,
        eval_batch_size=4,
        out_dir=str(tmp_path / "run"),
        progress=False,
    )
    result = train(cfg, log=None)
    final = result["val"]
    assert result["step"] == 40 and 0.0 <= final["masked_acc"] <= 1.0
    losses = [e["loss"] for e in read_metrics(tmp_path / "run" / "metrics.jsonl") if e["loss"] is not None]
    assert losses[-1] < losses[0] - 1.0, losses  # from ~ln 256 toward the small alphabet of the text
    loaded = hierseq.load(tmp_path / "run" / "final")
    assert loaded.config == hierseq.build_config("hama", **HAMAConfig.small_overrides())
    # The saved model scores exactly what the run reported, on the task's validation windows.
    task = MaskedBytesTask(cfg)
    task.setup(0, 1, torch.device("cpu"))
    assert evaluate_masked(loaded, task.eval_inputs) == final
