"""Configs: JSON / YAML round trips, unknown fields, tuple restoration and validation on load."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hierseq
from hierseq.config import BaseConfig, check_positive_int


@dataclass
class LevelsConfig(BaseConfig):
    """A test-only config with a tuple field (JSON and YAML have no tuples)."""

    levels: tuple[int, ...] = (2, 4, 8)
    name: str = "x"

    def validate(self) -> None:
        super().validate()
        for i, level in enumerate(self.levels):
            check_positive_int(f"levels[{i}]", level)


def transformer_config(**overrides: object) -> BaseConfig:
    return hierseq.build_config("transformer", **overrides)


def test_to_dict_starts_with_model_type_and_has_every_field() -> None:
    data = transformer_config().to_dict()
    assert next(iter(data)) == "model_type" and data["model_type"] == "transformer"
    assert set(data) == {"model_type", *type(transformer_config()).field_names()}


def test_json_round_trip_text_and_file(tmp_path: Path) -> None:
    cfg = transformer_config(vocab_size=77, d_model=48, n_heads=3, dropout=0.125, tie_embeddings=False)
    cls = type(cfg)
    assert cls.from_json(cfg.to_json()) == cfg
    path = tmp_path / "cfg.json"
    cfg.to_json(path)
    assert cls.from_json(path) == cfg
    assert cls.from_json(str(path)) == cfg


def test_yaml_round_trip_text_and_file(tmp_path: Path) -> None:
    cfg = transformer_config(vocab_size=77, rope_base=500.0, norm="layernorm", mlp="gelu", mlp_hidden=100)
    cls = type(cfg)
    assert cls.from_yaml(cfg.to_yaml()) == cfg
    path = tmp_path / "cfg.yaml"
    cfg.to_yaml(path)
    assert cls.from_yaml(path) == cfg


def test_tuples_are_restored_from_json_and_yaml() -> None:
    cfg = LevelsConfig(levels=(3, 5))
    for restored in (LevelsConfig.from_json(cfg.to_json()), LevelsConfig.from_yaml(cfg.to_yaml())):
        assert restored == cfg and isinstance(restored.levels, tuple) and restored.levels == (3, 5)


def test_from_dict_rejects_unknown_fields() -> None:
    data = {**transformer_config().to_dict(), "n_experts": 4}
    with pytest.raises(ValueError, match="n_experts=4: unknown field for TransformerConfig"):
        type(transformer_config()).from_dict(data)


def test_from_dict_rejects_another_model_type() -> None:
    data = {**transformer_config().to_dict(), "model_type": "mamba"}
    with pytest.raises(ValueError, match="model_type='mamba': this config is for 'transformer'"):
        type(transformer_config()).from_dict(data)


def test_loading_validates_values() -> None:
    cls = type(transformer_config())
    with pytest.raises(ValueError, match="d_model=0: must be a positive integer"):
        cls.from_json('{"model_type": "transformer", "d_model": 0}')
    with pytest.raises(ValueError, match="levels\\[1\\]=0: must be a positive integer"):
        LevelsConfig.from_yaml("levels: [2, 0]\n")


def test_yaml_top_level_must_be_a_mapping() -> None:
    with pytest.raises(ValueError, match="yaml='list': top level must be a mapping"):
        LevelsConfig.from_yaml("- 1\n- 2\n")


def test_missing_fields_take_defaults() -> None:
    cfg = type(transformer_config()).from_dict({"model_type": "transformer", "vocab_size": 64})
    assert cfg == transformer_config(vocab_size=64)


def test_replace_validates_and_rejects_unknown_fields() -> None:
    cfg = transformer_config()
    assert cfg.replace(n_layers=7).n_layers == 7 and cfg.n_layers != 7
    with pytest.raises(ValueError, match="depth=3: unknown field"):
        cfg.replace(depth=3)
    with pytest.raises(ValueError, match="dropout=2.0"):
        cfg.replace(dropout=2.0)


@settings(max_examples=30, deadline=None)
@given(
    vocab_size=st.integers(1, 100_000),
    heads_and_head_dim=st.tuples(st.integers(1, 8), st.sampled_from([2, 4, 16, 64])),
    n_layers=st.integers(1, 48),
    dropout=st.floats(0.0, 0.999, allow_nan=False),
    rope_base=st.floats(1e-3, 1e7, allow_nan=False),
    tie=st.booleans(),
)
def test_round_trips_hold_for_any_valid_config(
    vocab_size: int, heads_and_head_dim: tuple[int, int], n_layers: int, dropout: float, rope_base: float, tie: bool
) -> None:
    n_heads, head_dim = heads_and_head_dim
    cfg = transformer_config(
        vocab_size=vocab_size,
        d_model=n_heads * head_dim,
        n_heads=n_heads,
        n_layers=n_layers,
        dropout=dropout,
        rope_base=rope_base,
        tie_embeddings=tie,
    )
    cls = type(cfg)
    assert cls.from_json(cfg.to_json()) == cfg
    assert cls.from_yaml(cfg.to_yaml()) == cfg
