"""The HAMT seed's API: ``HAMTConfig`` (the seed's field names) and ``HAMTModel`` (the ``hamt`` LM)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..config import check_positive_int, config_error
from ..models.causal_lms import HAMTLM, HAMTLMConfig

_SEED_BINDINGS = {
    "elementwise": "elementwise",
    "bipolar": "elementwise",
    "circular": "circular",
    "circular_conv": "circular",
    "circular_convolution": "circular",
    "hrr": "circular",
}


#: seed field -> model field, and the seed fields the model has no use for (documented below).
_RENAMED = {"hidden_dim": "d_model", "num_layers": "n_layers", "binding_type": "binding"}
_SEED_ONLY = ("max_seq_len", "bptt_horizon")


#: The seed's fields, in the seed's order, with the seed's defaults (types follow the defaults).
_SEED_DEFAULTS: dict[str, Any] = {
    **{"vocab_size": 256, "hidden_dim": 512, "hcm_dim": 2048, "num_layers": 8, "num_slots": 8},
    **{"binding_type": "elementwise", "key_type": "bipolar", "use_gating": True, "decay_rate": 0.95},
    **{"aux_loss_weight": 0.01, "dropout": 0.0, "max_seq_len": 2048, "bptt_horizon": 512},
    **{"chunk_size": 32, "conv_kernel": 4},
}


class _SeedConfigMethods:
    def __post_init__(self) -> None:
        if self.binding_type not in _SEED_BINDINGS:
            raise config_error("binding_type", self.binding_type, f"must be one of {sorted(_SEED_BINDINGS)}")
        check_positive_int("max_seq_len", self.max_seq_len)
        check_positive_int("bptt_horizon", self.bptt_horizon)
        self.to_model_config()  # validates every mapped field with the model's own rules

    def to_model_config(self) -> HAMTLMConfig:
        values = {_RENAMED.get(k, k): v for k, v in dataclasses.asdict(self).items() if k not in _SEED_ONLY}
        return HAMTLMConfig(**{**values, "binding": _SEED_BINDINGS[self.binding_type]})


# Built from the table so the seed's field list is written once, not as a second copy of the model's.
HAMTConfig = dataclasses.make_dataclass(
    "HAMTConfig",
    [(name, type(default), dataclasses.field(default=default)) for name, default in _SEED_DEFAULTS.items()],
    bases=(_SeedConfigMethods,),
    namespace={"__module__": __name__},
)
HAMTConfig.__doc__ = """The seed's configuration, by the seed's field names (:data:`_SEED_DEFAULTS`);
:meth:`to_model_config` maps it onto :class:`HAMTLMConfig` (hidden_dim -> d_model, num_layers -> n_layers,
binding_type -> binding, ...).

decay_rate is the per-token retention factor (memory *= decay_rate) of the fastest slot at init.
``max_seq_len`` and ``bptt_horizon`` are accepted for compatibility: the model has no length limit,
and the truncated-BPTT horizon is the trainer's ``seq_len`` with ``tbptt: true``.
The README's demo size is ``HAMTConfig(hidden_dim=256, hcm_dim=1024, num_layers=4, num_slots=8)``.
"""


class HAMTModel(HAMTLM):
    """The registered ``hamt`` LM, built from a seed :class:`HAMTConfig` or a :class:`HAMTLMConfig`
    (``model.config`` is always the latter, so ``hierseq.save`` / ``load`` treat it as ``hamt``)."""

    def __init__(self, config: HAMTLMConfig | HAMTConfig) -> None:
        if isinstance(config, HAMTConfig):
            config = config.to_model_config()
        if not isinstance(config, HAMTLMConfig):
            raise TypeError(f"config: expected HAMTLMConfig or HAMTConfig, got {type(config).__name__}")
        super().__init__(config)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **sampling: Any) -> torch.Tensor:
        """Seed-compatible shortcut for :func:`hierseq.generate` (recurrent, O(1) memory per token)."""
        from ..generation import generate

        return generate(self, input_ids, max_new_tokens, **sampling)
