"""What every token mixer is: one signature, one config convention, one registry.

A mixer maps x: [B, L, D] to y: [B, L, D], causally, and may carry a decoding state::

    y, state, aux = mixer(x, state=None, use_cache=False, need_aux=False)

* ``state`` is the mixer's :class:`~hierseq.modules.state.LayerState` after earlier tokens (None: an
  empty past). Given a state, or with ``use_cache=True``, the mixer returns the state after x (it may
  advance the given object in place); otherwise it returns None.
* ``aux`` is a scalar auxiliary loss (before weighting) or None; mixers without one return None, and
  mixers whose aux costs a pass of its own compute it only when ``need_aux`` is true.

Every mixer names its residual output projection ``out_proj`` (the shell's init scales it by depth,
by that role, whatever the mixer calls its other layers) and may override :meth:`reset_special_parameters`
for the inits the generic one must not touch (conv taps, decay rates, dt, ...).

A mixer's options are a :class:`MixerConfig` dataclass. A causal LM's config inherits its mixer's
config, so the fields sit flat in the model config (``n_heads``, ``leaf_size``, ...); in a per-layer
schedule a mixer reads its fields from the model config where the names exist, and from
``mixer_options[name]`` over its own defaults (see :func:`resolve_mixer_config`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import (
    check_bool,
    check_nonneg_int,
    check_positive_float,
    check_positive_int,
    check_probability,
    config_error,
)

__all__ = [
    "MIXERS",
    "Mixer",
    "MixerConfig",
    "get_mixer",
    "init_decay_rates",
    "register_mixer",
    "resolve_mixer_config",
]


@dataclasses.dataclass
class MixerConfig:
    """Base of every mixer's options. ``check(d_model)`` validates them (ValueError: field, value, rule).

    The simple rules are data: fields named in ``positive_ints``, ``nonneg_ints``, ``positive_floats``,
    ``probabilities`` or ``flags``, and the (low, high) field pairs of ``ordered`` (low <= high), are
    checked here; a subclass's ``check`` adds the rest."""

    positive_ints: ClassVar[tuple[str, ...]] = ()
    nonneg_ints: ClassVar[tuple[str, ...]] = ()
    positive_floats: ClassVar[tuple[str, ...]] = ()
    probabilities: ClassVar[tuple[str, ...]] = ()
    flags: ClassVar[tuple[str, ...]] = ()
    ordered: ClassVar[tuple[tuple[str, str], ...]] = ()

    def check(self, d_model: int) -> None:
        """Raise ValueError when a field is invalid for this width."""
        rules = (
            (self.positive_ints, check_positive_int),
            (self.nonneg_ints, check_nonneg_int),
            (self.positive_floats, check_positive_float),
            (self.probabilities, check_probability),
            (self.flags, check_bool),
        )
        for names, rule in rules:
            for name in names:
                rule(name, getattr(self, name))
        for low, high in self.ordered:
            if getattr(self, low) > getattr(self, high):
                raise config_error(low, getattr(self, low), f"must be <= {high}={getattr(self, high)!r}")


class Mixer(nn.Module):
    """Base class: subclasses set ``config_class`` (via :func:`register_mixer`) and implement forward."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MixerConfig]] = MixerConfig
    out_proj: nn.Linear

    def __init__(self, d_model: int, cfg: MixerConfig) -> None:
        super().__init__()
        self.d_model = d_model
        self.cfg = cfg

    def forward(self, x: torch.Tensor, state: Any = None, use_cache: bool = False, need_aux: bool = False) -> tuple:
        """x: [B, L, D] -> (y [B, L, D], the state after x or None, aux scalar or None); see the module."""
        raise NotImplementedError

    def reset_special_parameters(self) -> None:
        """Re-apply inits the shell's generic init (normal weights, zero biases) must not override."""

    def state_size(self, seq_len: int) -> int:
        """Floats of decoding state per batch row after ``seq_len`` tokens."""
        raise NotImplementedError(f"{type(self).__name__}.state_size")

    def tbptt_refusal(self) -> str | None:
        """Why this mixer cannot carry its state across truncated-BPTT segments (None: it can)."""
        return None


def init_decay_rates(
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    a_range: tuple[float, float] = (1.0, 16.0),
    dt_range: tuple[float, float] = (1e-3, 1e-1),
    dt_floor: float = 1e-4,
) -> None:
    """The Mamba-2 init of a per-head decay log a = -exp(A_log) * softplus(. + dt_bias), in place:
    A uniform in ``a_range`` and dt log-uniform in ``dt_range`` (floored), so the initial half-lives
    span a few to a few hundred tokens. A_log, dt_bias: [H]."""
    with torch.no_grad():
        A_log.copy_(torch.empty_like(A_log).uniform_(*a_range).log())
        log_lo, log_hi = math.log(dt_range[0]), math.log(dt_range[1])
        dt = torch.exp(torch.empty_like(dt_bias).uniform_(log_lo, log_hi)).clamp(min=dt_floor)
        dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) == dt


MIXERS: dict[str, type[Mixer]] = {}


def register_mixer(name: str, config: type[MixerConfig]) -> Callable[[type[Mixer]], type[Mixer]]:
    """Class decorator: ``@register_mixer("attention", config=AttentionConfig)``."""

    def deco(cls: type[Mixer]) -> type[Mixer]:
        if name in MIXERS and MIXERS[name] is not cls:
            raise ValueError(f"mixer={name!r}: a different mixer is already registered under it")
        cls.name, cls.config_class = name, config
        MIXERS[name] = cls
        return cls

    return deco


def get_mixer(name: str) -> type[Mixer]:
    from . import _ensure_imported

    _ensure_imported()
    if name not in MIXERS:
        raise ValueError(f"mixers: {name!r}: unknown mixer; registered mixers: {sorted(MIXERS)}")
    return MIXERS[name]


def resolve_mixer_config(name: str, model_config: Any, options: dict[str, Any] | None = None) -> MixerConfig:
    """Mixer ``name``'s config: its defaults, then same-named fields of ``model_config``, then ``options``."""
    cls = get_mixer(name).config_class
    fields = [f.name for f in dataclasses.fields(cls)]
    values = {f: getattr(model_config, f) for f in fields if hasattr(model_config, f)}
    options = dict(options or {})
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"mixer_options.{name}.{unknown[0]}={options[unknown[0]]!r}: unknown field; known: {fields}")
    values.update(options)
    return cls(**values)
