"""The one ``--set`` parser (``hierseq train`` and ``python -m hierseq.training`` both use it)."""

from __future__ import annotations

import pytest
import yaml
from trainer_helpers import tiny_config

from hierseq.training.__main__ import main as training_main
from hierseq.training.overrides import apply_overrides, parse_overrides


def test_parse_overrides_splits_train_model_and_task_fields() -> None:
    parsed = parse_overrides(
        [
            "lr=3e-4",
            "model.d_model=64",
            "model_config.n_heads=2",
            "data=null",
            "task.n_pairs=8",
            "task_options.filler=x",
        ]
    )
    assert parsed == {
        "train": {"lr": 3e-4, "data": None},
        "model_config": {"d_model": 64, "n_heads": 2},
        "task_options": {"n_pairs": 8, "filler": "x"},
    }
    assert parse_overrides(["task=mqar"])["train"] == {"task": "mqar"}  # the task itself is a train field


@pytest.mark.parametrize(
    "raw, value",
    [
        ("3e-4", 3e-4),  # YAML 1.1 reads it as a string
        ("-2E3", -2000.0),
        ("1.5", 1.5),
        ("7", 7),
        ("true", True),
        ("null", None),
        ("[8, 4]", [8, 4]),
        ("{a: 1}", {"a": 1}),
        ("imu_integration", "imu_integration"),
        ("nan", "nan"),  # a word stays a word
        ("", ""),
    ],
)
def test_values_are_yaml_with_numbers_for_number_strings(raw, value) -> None:
    assert parse_overrides([f"x={raw}"])["train"]["x"] == value


@pytest.mark.parametrize(
    "pair, message",
    [("lr", "key=value"), ("=3", "key=value"), ("lr=[1", "not a valid YAML"), ("task.=1", "field name")],
)
def test_bad_pairs_are_one_line_errors(pair, message) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_overrides([pair])
    assert "\n" not in str(info.value)


def test_apply_overrides_merges_mappings_field_by_field() -> None:
    data = {"lr": 1.0, "model_config": {"d_model": 32, "n_layers": 2}, "task_options": {"n_pairs": 2}}
    out = apply_overrides(data, ["model.d_model=64", "task.stop_at=0.9", "lr=2"])
    assert out == {
        "lr": 2,
        "model_config": {"d_model": 64, "n_layers": 2},
        "task_options": {"n_pairs": 2, "stop_at": 0.9},
    }
    assert data["model_config"] == {"d_model": 32, "n_layers": 2}  # the input is not changed
    assert apply_overrides({}, ["task_options={n_pairs: 3}", "task.filler=random"])["task_options"] == {
        "n_pairs": 3,
        "filler": "random",
    }


def test_python_m_hierseq_training_parses_like_the_cli(tmp_path, capsys) -> None:
    cfg_path = tmp_path / "run.yaml"
    tiny_config(tmp_path / "run", max_steps=1).to_yaml(cfg_path)
    # "1e-1" is a YAML string: the one parser makes it the number a model field needs.
    assert training_main([str(cfg_path), "--set", "model.dropout=1e-1", "--set", "lr=3e-3"]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "train_config.yaml").read_text())
    assert saved["model_config"]["dropout"] == 0.1 and saved["lr"] == 0.003 and saved["max_steps"] == 1
    assert '"step": 1' in capsys.readouterr().out
