"""Mamba (Gu & Dao 2023): the flat selective-state-space control, as a causal LM.

Pre-norm residual blocks ``x + MambaMixer(norm(x))`` (the mixer, its scan and its step live in
``layers/ssm.py`` and ``layers/selective_scan.py``), a final norm and an LM head tied to the token
embedding. The cache is the recurrent state (per layer: conv state [B, d_inner, d_conv - 1] and SSM
state [B, d_inner, d_state]), so decoding costs O(1) time and memory per token at any context length.

:class:`MambaStack` (blocks + final norm on continuous features [B, L, d_model]) is reused by
``models/hiss.py`` for the low and high levels of HiSS and for the flat regression control.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import BaseConfig, check_choice, check_positive_float, check_positive_int
from ..layers.norms import make_norm
from ..layers.ssm import MambaMixer, MambaState
from ..layers.state_cache import LayerStateCache
from ..losses import causal_lm_loss
from ..outputs import CausalLMOutput
from ..registry import register
from ..validation import check_input_ids, check_labels


def check_mamba_fields(cfg: object, prefix: str = "") -> None:
    """Validate the SSM fields shared by every Mamba config (names optionally prefixed, e.g. 'low_')."""
    for name in ("d_state", "d_conv", "expand"):
        check_positive_int(prefix + name, getattr(cfg, prefix + name))
    dt_rank = getattr(cfg, prefix + "dt_rank", 0)
    if isinstance(dt_rank, bool) or not isinstance(dt_rank, int) or dt_rank < 0:
        raise ValueError(f"{prefix}dt_rank={dt_rank!r}: must be 0 (auto: ceil(d_model/16)) or a positive integer")


@dataclass
class MambaConfig(BaseConfig):
    """Mamba LM. ``dt_rank=0`` means ceil(d_model / 16); ``scan`` picks the fast parallel scan or the
    sequential reference (for checking only)."""

    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init: str = "random"
    dt_scale: float = 1.0
    dt_init_floor: float = 1e-4
    bias: bool = False
    conv_bias: bool = True
    norm: str = "rmsnorm"
    tie_embeddings: bool = True
    scan: str = "fast"
    init_std: float = 0.02

    @classmethod
    def small_overrides(cls) -> dict:
        return {**super().small_overrides(), "d_state": 8}

    def validate(self) -> None:
        super().validate()
        check_mamba_fields(self)
        for name in ("dt_min", "dt_max", "dt_scale", "dt_init_floor", "init_std"):
            check_positive_float(name, getattr(self, name))
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min={self.dt_min!r}: must be <= dt_max={self.dt_max!r}")
        check_choice("dt_init", self.dt_init, ("random", "constant"))
        check_choice("norm", self.norm, ("rmsnorm", "layernorm"))
        check_choice("scan", self.scan, ("fast", "reference"))


def make_mixer(cfg: MambaConfig | object, d_model: int) -> MambaMixer:
    """A mixer from any object carrying the Mamba SSM fields (MambaConfig or a HiSS level spec)."""
    return MambaMixer(
        d_model,
        d_state=cfg.d_state,
        d_conv=cfg.d_conv,
        expand=cfg.expand,
        dt_rank=cfg.dt_rank,
        dt_min=getattr(cfg, "dt_min", 1e-3),
        dt_max=getattr(cfg, "dt_max", 0.1),
        dt_init=getattr(cfg, "dt_init", "random"),
        dt_scale=getattr(cfg, "dt_scale", 1.0),
        dt_init_floor=getattr(cfg, "dt_init_floor", 1e-4),
        bias=getattr(cfg, "bias", False),
        conv_bias=getattr(cfg, "conv_bias", True),
        scan=getattr(cfg, "scan", "fast"),
    )


class MambaBlock(nn.Module):
    """x + mixer(norm(x)). x: [B, L, D]."""

    def __init__(self, mixer: MambaMixer, norm: str = "rmsnorm") -> None:
        super().__init__()
        self.norm = make_norm(norm, mixer.d_model)
        self.mixer = mixer

    def forward(
        self, x: torch.Tensor, state: MambaState | None = None, return_state: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, MambaState]:
        out = self.mixer(self.norm(x), state, return_state=return_state)
        if return_state:
            return x + out[0], out[1]
        return x + out


class MambaStack(nn.Module):
    """n_layers Mamba blocks and a final norm on continuous features. x: [B, L, d_model] -> same shape.

    States: a list with one :class:`MambaState` per layer (None = start of sequence).
    """

    def __init__(self, mixers: list[MambaMixer], norm: str = "rmsnorm") -> None:
        super().__init__()
        if not mixers:
            raise ValueError("mixers=[]: a Mamba stack needs at least one layer")
        self.d_model = mixers[0].d_model
        self.blocks = nn.ModuleList(MambaBlock(m, norm) for m in mixers)
        self.final_norm = make_norm(norm, self.d_model)
        # Pre-norm residual rescale (as in the reference): each block's output projection / sqrt(depth).
        with torch.no_grad():
            for m in mixers:
                m.out_proj.weight.div_(math.sqrt(len(mixers)))

    def forward(
        self, x: torch.Tensor, states: list[MambaState] | None = None, return_states: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[MambaState]]:
        new_states = []
        for i, block in enumerate(self.blocks):
            state = states[i] if states is not None else None
            if return_states:
                x, s = block(x, state, return_state=True)
                new_states.append(s)
            else:
                x = block(x, state)
        x = self.final_norm(x)
        return (x, new_states) if return_states else x


class MambaCache(LayerStateCache):
    """Decoding state of :class:`MambaLM`: one :class:`MambaState` per layer, ``length`` tokens seen.

    Memory is constant in the number of tokens. ``detach()`` cuts the autograd graph in place (TBPTT).
    """

    layer_state_type = MambaState


@register("mamba", config=MambaConfig, kind="causal_lm")
class MambaLM(nn.Module):
    """input_ids: [B, L] -> CausalLMOutput(logits [B, L, V], loss, aux_loss=0, cache: MambaCache)."""

    #: the recurrent state it returns; the trainer rebuilds a checkpointed TBPTT state with it.
    cache_class = MambaCache

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.embed.weight, std=config.init_std)
        self.drop = nn.Dropout(config.dropout)
        self.backbone = MambaStack([make_mixer(config, config.d_model) for _ in range(config.n_layers)], config.norm)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=config.init_std)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        cache: MambaCache | None = None,
        use_cache: bool = False,
    ) -> CausalLMOutput:
        """input_ids: [B, L] long; labels: [B, L] next-token targets (-100 ignored); ``cache``: the state
        after earlier tokens (continues from it); ``use_cache``: return the state after these tokens
        (the given cache is updated in place and returned)."""
        input_ids = check_input_ids(input_ids, self.config.vocab_size)
        check_labels(labels, input_ids, self.config.vocab_size)
        if cache is not None and not isinstance(cache, MambaCache):
            raise TypeError(f"cache: expected a MambaCache, got {type(cache).__name__}")
        if cache is not None and cache.layers[0] is not None and cache.layers[0].ssm.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"cache: batch={cache.layers[0].ssm.shape[0]}: must match input_ids batch {input_ids.shape[0]}"
            )
        if use_cache and cache is None:
            cache = MambaCache(self.config.n_layers)
        x = self.drop(self.embed(input_ids))
        states = cache.layers if cache is not None and cache.layers[0] is not None else None
        if use_cache:
            x, new_states = self.backbone(x, states, return_states=True)
            cache.layers = list(new_states)
            cache.length += input_ids.shape[1]
        else:
            x = self.backbone(x, states)
        logits = self.lm_head(x)
        zero = logits.new_zeros(())
        loss = lm_loss = None
        if labels is not None:
            lm_loss = causal_lm_loss(logits, labels)
            loss = lm_loss
        return CausalLMOutput(logits=logits, loss=loss, lm_loss=lm_loss, aux_loss=zero, cache=cache)
