"""Model registry: name -> (config class, model class, kind).

A model registers itself with ``@register("name", config=MyConfig, kind="causal_lm")``.  Training,
benchmarks, the CLI and the conformance suite only ever reach models through this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .config import BaseConfig

KINDS = ("causal_lm", "masked_ae", "seq_regression")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    config_cls: type[BaseConfig]
    model_cls: type[nn.Module]
    kind: str


_REGISTRY: dict[str, ModelEntry] = {}


def register(name: str, *, config: type[BaseConfig], kind: str = "causal_lm") -> Callable:
    """Class decorator registering ``model_cls`` under ``name``. ``model_cls(config)`` must build it."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: must be one of {list(KINDS)}")

    def deco(model_cls: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY and _REGISTRY[name].model_cls is not model_cls:
            raise ValueError(f"name={name!r}: a different model is already registered under it")
        config.model_type = name
        _REGISTRY[name] = ModelEntry(name, config, model_cls, kind)
        model_cls.config_class = config  # type: ignore[attr-defined]
        model_cls.model_kind = kind  # type: ignore[attr-defined]
        return model_cls

    return deco


def _ensure_models_imported() -> None:
    # Importing the models package runs every @register.
    from . import models  # noqa: F401


def list_models(kind: str | None = None) -> list[str]:
    """Registered model names, sorted; optionally only those of one kind."""
    _ensure_models_imported()
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind={kind!r}: must be one of {list(KINDS)}")
    return sorted(n for n, e in _REGISTRY.items() if kind is None or e.kind == kind)


def get_entry(name: str) -> ModelEntry:
    _ensure_models_imported()
    if name not in _REGISTRY:
        raise ValueError(f"model={name!r}: unknown model; registered models: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def build_config(name: str, **overrides: Any) -> BaseConfig:
    """The default config of model ``name`` with ``overrides`` applied (validated)."""
    entry = get_entry(name)
    unknown = sorted(set(overrides) - set(entry.config_cls.field_names()))
    if unknown:
        raise ValueError(
            f"{unknown[0]}={overrides[unknown[0]]!r}: unknown config field for model {name!r}; "
            f"known fields: {entry.config_cls.field_names()}"
        )
    return entry.config_cls(**overrides)


def build_model(name: str, config: BaseConfig | None = None, **overrides: Any) -> nn.Module:
    """Build model ``name`` from its default config (or ``config``) with ``overrides`` applied."""
    entry = get_entry(name)
    if config is None:
        config = build_config(name, **overrides)
    else:
        if not isinstance(config, entry.config_cls):
            raise ValueError(f"config={type(config).__name__}: model {name!r} needs a {entry.config_cls.__name__}")
        if overrides:
            config = config.replace(**overrides)
    return entry.model_cls(config)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters; a tied weight counts once (``parameters()`` de-duplicates shared tensors)."""
    return sum(p.numel() for p in model.parameters())


def model_kind(model: nn.Module) -> str:
    return model.model_kind
