"""TrainConfig: validation errors name the field, dict/YAML round trips, YAML number quirks."""

import pytest

import hierseq
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


# ------------------------------------------------------------------------------------------- tasks
@pytest.mark.parametrize(
    "model, task",
    [("transformer", "lm"), ("hama", "masked_bytes"), ("flat_mae", "masked_bytes"), ("hiss", "regression")],
)
def test_every_kind_gets_its_default_task(model, task):
    cfg = TrainConfig(model=model)
    assert cfg.task == task
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task": "images"}, r"^task='images': must be one of \['lm', 'masked_bytes'"),
        ({"model": "hama", "task": "lm"}, r"^task='lm': trains causal_lm models; hama is a masked_ae"),
        ({"model": "hiss", "task": "mqar"}, r"^task='mqar': trains causal_lm models; hiss is a seq_regression"),
        ({"task": "mqar", "task_options": [1]}, r"^task_options=\[1\]: must be a mapping of options of the mqar task"),
        ({"task_options": {"n_pairs": 2}}, r"^task_options.n_pairs=2: unknown option of the lm task; known: \[\]"),
        ({"task": "mqar", "task_options": {"n_pairs": 0}}, r"^task_options.n_pairs=0: must be a positive integer"),
        ({"task": "mqar", "task_options": {"nope": 1}}, r"^task_options.nope=1: unknown option of the mqar task"),
        ({"task": "mqar", "task_options": {"stop_at": 1.5}}, r"^task_options.stop_at=1.5: must be a number in \(0.0"),
        ({"task": "mqar", "task_options": {"filler": "x"}}, r"^task_options.filler='x': must be one of \['zeros'"),
        ({"task": "mqar", "seq_len": 8}, r"^seq_len=8: too short for n_pairs=4"),
        ({"task": "mqar", "model_config": {"vocab_size": 8}}, r"^n_pairs=4: needs vocab_size // 2 - 1 >= n_pairs"),
        ({"model": "hiss", "loader": "stream"}, r"^loader='stream': is an lm task field; the regression task"),
        ({"model": "hama", "tbptt": True, "loader": "stream"}, r"^loader='stream': is an lm task field"),
        ({"model": "hiss", "data": "x.txt"}, r"^data='x.txt': the regression task reads no text corpus"),
        (
            {"model": "hiss", "seq_len": 5},
            r"^seq_len=5: the regression task needs seq_len >= task_options.chunk_size=10",
        ),
        ({"model": "hiss", "batch_size": 2048}, r"^batch_size=2048: must be <= task_options.n_train=1024"),
        ({"model": "hiss", "task_options": {"signal": "x"}}, r"^task_options.signal='x': must be one of \['hidden_dyn"),
        (
            {"model": "hiss", "model_config": {"d_in": 3}},
            r"^model_config.d_in=3: follows from the regression task \(signal 'imu_integration'.*d_in=6",
        ),
        (
            {"model": "hiss", "model_config": {"chunk_size": 7}},
            r"^model_config.chunk_size=7: the regression task sets it from task_options.chunk_size=10 .*"
            r"--set task.chunk_size=7 instead",
        ),
        ({"model": "hama", "task": "masked_signal", "model_config": {"d_input": 3}}, r"^d_input=3: .*channels=8"),
        ({"model": "hama", "model_config": {"input_type": "continuous"}}, r"^input_type='continuous': .*'tokens'"),
        ({"model": "flat_mae", "model_config": {"vocab_size": 100}}, r"^vocab_size=100: the masked_bytes task needs"),
        ({"keep_best": "yes"}, r"^keep_best='yes': must be true or false"),
        ({"eval_batch_size": -1}, r"^eval_batch_size=-1: must be an integer >= 0"),
    ],
)
def test_task_and_option_errors_are_one_line_and_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        TrainConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_tasks_imply_their_model_fields_and_coerce_yaml_numbers(tmp_path):
    cfg = TrainConfig(model="hama", task="masked_signal", task_options={"channels": 3, "noise": "1e-2"})
    assert cfg.task_opts == {"channels": 3, "components": 3, "noise": 0.01}
    assert cfg.model_overrides() == {"input_type": "continuous", "d_input": 3}
    assert cfg.task_options == {"channels": 3, "noise": "1e-2"}  # as written; task_opts is the checked form
    hiss = TrainConfig(model="hiss", task_options={"signal": "hidden_dynamics", "first_differences": False})
    assert hiss.model_overrides() == {"d_in": 3, "d_out": 2, "chunk_size": 10}
    assert hierseq.build_config("hiss", **hiss.model_overrides()).d_out == 2
    path = tmp_path / "cfg.yaml"
    path.write_text("model: transformer\ntask: mqar\ntask_options: {n_pairs: 2, stop_at: 1}\nseq_len: 32\n")
    mqar = TrainConfig.from_yaml(path)
    assert mqar.task_opts["stop_at"] == 1.0 and mqar.task_opts["n_pairs"] == 2
    assert TrainConfig.from_dict({**mqar.to_dict(), "task_options": None}).task_opts["n_pairs"] == 4
    assert mqar.replace(task="lm", task_options={}).task == "lm"


def test_every_shipped_config_is_one_train_config():
    from pathlib import Path

    paths = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    tasks = {}
    for path in paths:
        cfg = TrainConfig.from_yaml(path)
        hierseq.build_config(cfg.model, **cfg.model_overrides())
        tasks[path.name] = cfg.task
    assert {tasks["hiss_imu.yaml"], tasks["hama.yaml"], tasks["hama_signal.yaml"], tasks["tree.yaml"]} == {
        "regression",
        "masked_bytes",
        "masked_signal",
        "lm",
    }
    models = {TrainConfig.from_yaml(path).model for path in paths}
    assert {"transformer", "mamba", "gated_deltanet", "hamt", "maha", "tree", "hama", "hiss"} <= models
