"""The registry: listing, building with overrides, and the errors for unknown names and bad values."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import hierseq
from hierseq import registry
from hierseq.config import BaseConfig


def test_list_models_is_sorted_and_filters_by_kind() -> None:
    names = hierseq.list_models()
    assert names == sorted(names) and "transformer" in names
    causal = hierseq.list_models(kind="causal_lm")
    assert "transformer" in causal and set(causal) <= set(names)
    for kind in registry.KINDS:
        assert all(hierseq.get_entry(n).kind == kind for n in hierseq.list_models(kind=kind))


def test_list_models_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="kind='bogus': must be one of"):
        hierseq.list_models(kind="bogus")


def test_every_entry_builds_its_config_class() -> None:
    for name in hierseq.list_models():
        entry = hierseq.get_entry(name)
        assert entry.name == name and entry.config_cls.model_type == name
        assert isinstance(hierseq.build_config(name), entry.config_cls)


def test_build_model_applies_overrides() -> None:
    torch.manual_seed(0)
    model = hierseq.build_model("transformer", vocab_size=40, d_model=48, n_layers=3, n_heads=3)
    cfg = model.config
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads) == (40, 48, 3, 3)
    assert type(cfg) is hierseq.get_entry("transformer").config_cls
    logits = model(torch.zeros(1, 4, dtype=torch.long)).logits
    assert logits.shape == (1, 4, 40)


def test_build_model_from_config_plus_overrides() -> None:
    config = hierseq.build_config("transformer", d_model=32, n_heads=2, n_layers=1)
    model = hierseq.build_model("transformer", config=config, vocab_size=20)
    assert model.config.vocab_size == 20 and model.config.d_model == 32 and model.config.n_layers == 1
    assert config.vocab_size == 256, "the passed config must not be mutated"


def test_build_model_rejects_a_config_of_another_class() -> None:
    @dataclass
    class OtherConfig(BaseConfig):
        pass

    with pytest.raises(ValueError, match="config=OtherConfig"):
        hierseq.build_model("transformer", config=OtherConfig())


def test_unknown_model_names_the_model_and_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="model='no_such_model': unknown model.*transformer"):
        hierseq.build_model("no_such_model")


def test_unknown_field_names_the_field_and_the_model() -> None:
    with pytest.raises(ValueError, match="bogus_field=3: unknown config field for model 'transformer'"):
        hierseq.build_model("transformer", bogus_field=3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"vocab_size": 0}, "vocab_size=0: must be a positive integer"),
        ({"vocab_size": True}, "vocab_size=True: must be a positive integer"),
        ({"d_model": -8}, "d_model=-8: must be a positive integer"),
        ({"n_layers": 2.0}, "n_layers=2.0: must be a positive integer"),
        ({"dropout": 1.0}, "dropout=1.0: must be a float in \\[0, 1\\)"),
        ({"n_heads": 0}, "n_heads=0: must be a positive integer"),
        ({"d_model": 30, "n_heads": 4}, "d_model=30: must be divisible by n_heads=4"),
        ({"d_model": 36, "n_heads": 4}, "n_heads=4: head dim .*9 must be even"),
        ({"mlp": "relu"}, "mlp='relu': must be one of"),
    ],
)
def test_config_validation_names_argument_value_and_rule(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hierseq.build_model("transformer", **overrides)


def test_register_rejects_unknown_kind() -> None:
    @dataclass
    class ToyConfig(BaseConfig):
        pass

    with pytest.raises(ValueError, match="kind='decoder': must be one of"):
        hierseq.register("toy_bad_kind", config=ToyConfig, kind="decoder")
    assert "toy_bad_kind" not in hierseq.list_models()


def test_register_refuses_a_second_model_under_a_taken_name() -> None:
    @dataclass
    class ToyConfig(BaseConfig):
        pass

    class Impostor(nn.Module):
        pass

    with pytest.raises(ValueError, match="name='transformer': a different model is already registered"):
        hierseq.register("transformer", config=ToyConfig)(Impostor)
    assert hierseq.get_entry("transformer").model_cls is not Impostor
    assert hierseq.get_entry("transformer").config_cls.model_type == "transformer"


def test_register_then_build_a_new_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # Work on a copy of the registry so the toy never reaches other tests.
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @dataclass
    class ToyConfig(BaseConfig):
        width: int = 3

    @hierseq.register("toy_registered", config=ToyConfig, kind="seq_regression")
    class Toy(nn.Module):
        def __init__(self, config: ToyConfig) -> None:
            super().__init__()
            self.config = config
            self.proj = nn.Linear(config.width, 1)

    assert "toy_registered" in hierseq.list_models(kind="seq_regression")
    assert "toy_registered" not in hierseq.list_models(kind="causal_lm")
    model = hierseq.build_model("toy_registered", width=5)
    assert isinstance(model, Toy) and model.config.width == 5 and model.config.model_type == "toy_registered"
    assert Toy.model_kind == "seq_regression" and Toy.config_class is ToyConfig
