"""Base configuration: a validated dataclass with dict / JSON / YAML round trips.

Every model config subclasses :class:`BaseConfig`.  Validation happens in ``__post_init__`` and
raises ``ValueError`` naming the argument, the offending value and the rule, so a bad config fails
where it is written rather than deep inside a forward pass.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
import yaml

from .validation import check_features, check_input_ids

C = TypeVar("C", bound="BaseConfig")


def config_error(name: str, value: Any, rule: str) -> ValueError:
    """The one error format used across hierseq: argument, value, rule."""
    return ValueError(f"{name}={value!r}: {rule}")


class RunStopped(RuntimeError):
    """A run that stopped itself (a non-finite loss or gradient): the message says at which step, why, and
    what was kept. Entry points report it in one line, like bad input (:func:`hierseq.cli.run_entry_point`)."""


class MissingExtra(ImportError):
    """A feature needs an optional extra that is not installed; the message names it (``pip install
    'hierseq[data]'``). Entry points report it in one line, as bad input (the fix is the user's)."""


def import_extra(module: str, extra: str, what: str) -> Any:
    """The module ``module`` of the optional ``extra``, imported; else :class:`MissingExtra` saying ``what``
    (e.g. ``data='hf:x': reading Hugging Face datasets``) needs it and how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{what} needs the optional {extra!r} extra: pip install 'hierseq[{extra}]'") from None


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise config_error(name, value, "must be a positive integer")


def check_nonneg_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise config_error(name, value, "must be a non-negative integer")


def check_probability(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise config_error(name, value, "must be a float in [0, 1)")


def check_positive_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise config_error(name, value, "must be a positive number")


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise config_error(name, value, f"must be one of {list(choices)}")


def check_divisible(name: str, value: int, by_name: str, by: int) -> None:
    if value % by != 0:
        raise config_error(name, value, f"must be divisible by {by_name}={by}")


@dataclasses.dataclass
class BaseConfig:
    """Shared fields (contract): ``vocab_size``, ``d_model``, ``n_layers``, ``dropout``.

    Subclasses add ``n_heads`` / ``max_seq_len`` where the model has them, then their own fields,
    and extend :meth:`validate` (calling ``super().validate()``).
    """

    #: registry name of the model this config builds; set by ``@register``.
    model_type: ClassVar[str] = ""

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_positive_int("vocab_size", self.vocab_size)
        check_positive_int("d_model", self.d_model)
        check_positive_int("n_layers", self.n_layers)
        check_probability("dropout", self.dropout)

    @classmethod
    def small_overrides(cls) -> dict[str, Any]:
        """Overrides giving a tiny but representative model: used by the conformance suite and smoke
        tests. Models with more structure (heads, chunks, levels) extend this."""
        return {"d_model": 32, "n_layers": 2}

    # ------------------------------------------------------------------ dict / JSON / YAML
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {"model_type": self.model_type, **out}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        data = dict(data)
        model_type = data.pop("model_type", cls.model_type)
        if cls.model_type and model_type != cls.model_type:
            raise config_error("model_type", model_type, f"this config is for {cls.model_type!r}")
        cls._check_known(data)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                value = data[f.name]
                # JSON has no tuples; restore them where the default is a tuple.
                default = f.default if f.default is not dataclasses.MISSING else None
                if isinstance(default, tuple) and isinstance(value, list):
                    value = tuple(value)
                kwargs[f.name] = value
        return cls(**kwargs)

    @classmethod
    def _check_known(cls, values: dict[str, Any]) -> None:
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            rule = f"unknown field for {cls.__name__}; known fields: {cls.field_names()}"
            raise config_error(unknown[0], values[unknown[0]], rule)

    def replace(self: C, **overrides: Any) -> C:
        self._check_known(overrides)
        return dataclasses.replace(self, **overrides)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls: type[C], source: str | Path) -> C:
        text = Path(source).read_text() if _looks_like_path(source) else str(source)
        return cls.from_dict(json.loads(text))

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls: type[C], source: str | Path) -> C:
        text = Path(source).read_text() if _looks_like_path(source) else str(source)
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise config_error("yaml", type(data).__name__, "top level must be a mapping")
        return cls.from_dict(data)


def _looks_like_path(source: str | Path) -> bool:
    if isinstance(source, Path):
        return True
    s = str(source)
    return "\n" not in s and not s.lstrip().startswith(("{", "[")) and Path(s).exists()


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise config_error(name, value, "must be true or false")


def check_nonneg_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise config_error(name, value, "must be a number >= 0")


@dataclasses.dataclass
class LMConfig(BaseConfig):
    """Fields of the causal-LM shell, the same for every mixer (so one command sizes every model alike).

    mlp: "swiglu", "gelu" or "none" (a block with no MLP, as in Mamba); mlp_hidden: 0 = the SwiGLU width
    with the parameters of a 4x GELU MLP (4 d_model for GELU). aux_loss_weight: weight of the mixers'
    auxiliary loss in ``loss``. mixers: a per-layer mixer schedule, e.g. ``["hamt", "attention"]``
    repeated to ``n_layers`` (empty: every layer uses the model's own mixer); mixer_options: per-mixer
    field overrides for the mixers of a schedule, e.g. ``{"attention": {"n_heads": 4}}``.
    """

    mlp: str = "swiglu"
    mlp_hidden: int = 0
    norm: str = "rmsnorm"
    tie_embeddings: bool = True
    init_std: float = 0.02
    aux_loss_weight: float = 0.0
    mixers: tuple[str, ...] = ()
    mixer_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        check_choice("mlp", self.mlp, ("swiglu", "gelu", "none"))
        check_nonneg_int("mlp_hidden", self.mlp_hidden)
        check_choice("norm", self.norm, ("rmsnorm", "layernorm"))
        check_bool("tie_embeddings", self.tie_embeddings)
        check_positive_float("init_std", self.init_std)
        check_nonneg_float("aux_loss_weight", self.aux_loss_weight)
        if isinstance(self.mixers, list):
            self.mixers = tuple(self.mixers)
        if not isinstance(self.mixers, tuple) or not all(isinstance(m, str) for m in self.mixers):
            raise config_error("mixers", self.mixers, "must be a list of mixer names")
        if self.mixers and self.n_layers % len(self.mixers):
            raise config_error("mixers", list(self.mixers), f"its length must divide n_layers={self.n_layers}")
        if not isinstance(self.mixer_options, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) for k, v in self.mixer_options.items()
        ):
            raise config_error("mixer_options", self.mixer_options, "must map mixer names to dicts of fields")

    def stack_kwargs(self) -> dict[str, Any]:
        """The :class:`~hierseq.modules.stack.MixerStack` arguments this config sets."""
        names = ("d_model", "n_layers", "mlp", "mlp_hidden", "norm", "dropout", "init_std")
        return {name: getattr(self, name) for name in names}


@dataclasses.dataclass
class MaskedAEConfig(BaseConfig):
    """Fields every masked autoencoder shares. input_type: "tokens" (ids [B, L], masked-token
    cross-entropy) or "continuous" ([B, L, d_input], MSE); d_input: continuous feature size (0 = d_model);
    loss_on: the reconstruction loss on "masked" positions only or on "all"; mask_seed: seed of the fixed
    mask used in eval mode."""

    n_heads: int = 4
    input_type: str = "tokens"
    d_input: int = 0
    loss_on: str = "masked"
    mlp: str = "gelu"
    norm: str = "layernorm"
    mask_seed: int = 0

    @property
    def input_dim(self) -> int:
        """Feature size of continuous inputs."""
        return self.d_input or self.d_model

    @property
    def output_dim(self) -> int:
        """Width of the reconstruction: logits over the vocabulary, or the input features."""
        return self.vocab_size if self.input_type == "tokens" else self.input_dim

    def check_input(self, x: Any) -> torch.Tensor:
        """x: token ids [B, L] or features [B, L, input_dim], checked (one clear error, named ``x``)."""
        if self.input_type == "tokens":
            return check_input_ids(x, self.vocab_size, name="x")
        return check_features(x, self.input_dim, name="x")

    def validate(self) -> None:
        super().validate()
        check_positive_int("n_heads", self.n_heads)
        check_divisible("d_model", self.d_model, "n_heads", self.n_heads)
        if self.d_model % 2:
            raise config_error("d_model", self.d_model, "must be even (sinusoidal positions)")
        check_choice("input_type", self.input_type, ("tokens", "continuous"))
        check_nonneg_int("d_input", self.d_input)
        check_choice("loss_on", self.loss_on, ("masked", "all"))
        check_choice("mlp", self.mlp, ("gelu", "swiglu"))
        check_choice("norm", self.norm, ("layernorm", "rmsnorm"))
        check_nonneg_int("mask_seed", self.mask_seed)
