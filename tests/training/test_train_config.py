"""TrainConfig: validation errors name the field, dict/YAML round trips, YAML number quirks."""

import pytest

from hierseq.training import TrainConfig


@pytest.mark.parametrize(
    "field, value, rule",
    [
        ("seq_len", 0, "positive integer"),
        ("batch_size", -4, "positive integer"),
        ("batch_size", 2.5, "positive integer"),
        ("grad_accum", 0, "positive integer"),
        ("max_steps", True, "positive integer"),
        ("warmup_steps", -1, ">= 0"),
        ("save_every", -1, ">= 0"),
        ("lr", 0.0, r"\(0.0, inf\]"),
        ("lr", "fast", "number"),
        ("min_lr_ratio", 1.5, r"\[0.0, 1.0\]"),
        ("beta2", 1.0, r"\[0.0, 1.0\)"),
        ("grad_clip", -1.0, "number"),
        ("max_time_s", float("nan"), "number"),
        ("loader", "shuffle", "random"),
        ("device", "tpu", "cuda"),
        ("progress", "yes", "true or false"),
        ("model_config", [1], "mapping"),
    ],
)
def test_bad_values_name_the_field(field, value, rule):
    with pytest.raises(ValueError, match=rf"^{field}=.*{rule}"):
        TrainConfig(**{field: value})


def test_cross_field_rules():
    with pytest.raises(ValueError, match=r"^batch_size=6: must be divisible by grad_accum=4"):
        TrainConfig(batch_size=6, grad_accum=4)
    with pytest.raises(ValueError, match=r"^tbptt=True: needs loader='stream'"):
        TrainConfig(tbptt=True)


def test_model_errors_come_from_the_registry():
    with pytest.raises(ValueError, match=r"model='nope': unknown model; registered models: \[.*'transformer'"):
        TrainConfig(model="nope")
    with pytest.raises(ValueError, match=r"d_modle=64: unknown config field for model 'transformer'"):
        TrainConfig(model_config={"d_modle": 64})
    with pytest.raises(ValueError, match=r"^d_model=64: must be divisible by n_heads=3"):
        TrainConfig(model_config={"d_model": 64, "n_heads": 3})


def test_from_dict_unknown_key_lists_known_fields():
    with pytest.raises(ValueError, match=r"^learning_rate=0.1: unknown TrainConfig field; known fields: \['model'"):
        TrainConfig.from_dict({"learning_rate": 0.1})


def test_yaml_round_trip_and_number_coercion(tmp_path):
    path = tmp_path / "cfg.yaml"
    # PyYAML reads "1e-3" as a string and "2" as an int: both must become floats.
    path.write_text("model: transformer\nmodel_config: {d_model: 64, n_heads: 2}\nlr: 1e-3\ngrad_clip: 2\n")
    cfg = TrainConfig.from_yaml(path)
    assert cfg.lr == 0.001 and isinstance(cfg.grad_clip, float) and cfg.grad_clip == 2.0
    assert cfg.model_config == {"d_model": 64, "n_heads": 2}
    cfg.to_yaml(tmp_path / "out.yaml")
    assert TrainConfig.from_yaml(tmp_path / "out.yaml") == cfg
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(FileNotFoundError, match="no such file"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")
