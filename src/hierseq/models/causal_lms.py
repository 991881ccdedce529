"""Every causal LM of hierseq: a registration of the shared shell over one mixer (or a per-layer schedule).

A model here is its config (the shell's fields + its mixer's, flat, so ``--set n_heads=2`` works) and the
name of its mixer; ``build_model("tree")`` and ``build_model("transformer")`` differ only in the mixer.
A hybrid is a config: ``build_model("hamt", mixers=["hamt", "attention"], mixer_options={"attention":
{"n_heads": 4}})`` alternates the two mixers over the layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import LMConfig, config_error
from ..mixers.attention import AttentionMixerConfig
from ..mixers.base import get_mixer, resolve_mixer_config
from ..mixers.gated_deltanet import GatedDeltaNetMixerConfig
from ..mixers.hamt import HAMTMixerConfig
from ..mixers.linear_attention import LinearAttentionMixerConfig
from ..mixers.loglinear import LogLinearMixerConfig
from ..mixers.maha import MAHAMixerConfig, describe_parameters
from ..mixers.mamba import MambaMixerConfig
from ..mixers.mamba2 import Mamba2MixerConfig
from ..mixers.tree import TreeMixerConfig
from ..modules.causal_lm import CausalLM
from ..registry import register


@dataclass
class CausalLMConfig(LMConfig):
    """A causal LM's config: the shell's fields, then (in subclasses) its mixer's."""

    #: the mixer every layer uses when ``mixers`` is empty.
    mixer_name: ClassVar[str] = ""
    #: the mixer's fields of a tiny but representative model (conformance suite, smoke tests).
    small_mixer: ClassVar[dict[str, Any]] = {}

    @classmethod
    def small_overrides(cls) -> dict[str, Any]:
        return {"d_model": 32, "n_layers": 2, **cls.small_mixer}

    def layer_mixers(self) -> list[str]:
        """The mixer of every layer: ``mixers`` repeated to ``n_layers``, or the model's own mixer."""
        schedule = list(self.mixers) or [self.mixer_name]
        return schedule * (self.n_layers // len(schedule))

    def mixer_config(self, name: str) -> Any:
        return resolve_mixer_config(name, self, self.mixer_options.get(name))

    def validate(self) -> None:
        super().validate()
        names = set(self.layer_mixers())
        for name in self.mixer_options:
            if name not in names:
                raise config_error("mixer_options", name, f"is not a mixer of this model; its mixers: {sorted(names)}")
        for name in sorted(names):
            try:
                get_mixer(name)
            except ValueError as exc:
                raise config_error("mixers", list(self.mixers), str(exc)) from None
            self.mixer_config(name).check(self.d_model)


class MixerLM(CausalLM):
    """The shell over the mixers its config names (one registration per model name below)."""

    def __init__(self, config: CausalLMConfig) -> None:
        names = config.layer_mixers()
        configs = {name: config.mixer_config(name) for name in set(names)}
        super().__init__(config, lambda i: get_mixer(names[i])(config.d_model, configs[names[i]]))


@dataclass
class TransformerConfig(AttentionMixerConfig, CausalLMConfig):
    """The control: pre-norm, RoPE, SwiGLU, tied embeddings, KV-cache decoding."""

    mixer_name: ClassVar[str] = "attention"
    small_mixer: ClassVar[dict[str, Any]] = {"n_heads": 2}


@dataclass
class TreeConfig(TreeMixerConfig, CausalLMConfig):
    """Tree attention decoder: causal leaf attention + one left sibling per level (``mixers/tree.py``)."""

    mixer_name: ClassVar[str] = "tree"

    # leaf 8 makes the conformance lengths (45, 80 tokens) span 6-10 leaves and 3-4 tree levels.
    small_mixer: ClassVar[dict[str, Any]] = {"n_heads": 2, "leaf_size": 8, "n_summary": 4}


@dataclass
class HAMTLMConfig(HAMTMixerConfig, CausalLMConfig):
    """Holographic associative memory (``mixers/hamt.py``); aux = the retention loss."""

    mixer_name: ClassVar[str] = "hamt"
    aux_loss_weight: float = 0.01

    @property
    def memory_dim(self) -> int:
        """M, the resolved slot size."""
        return self.hcm_dim or self.d_model

    # chunk_size 16 so the conformance lengths (45, 80) cross several chunk boundaries.
    small_mixer: ClassVar[dict[str, Any]] = {"hcm_dim": 32, "num_slots": 2, "chunk_size": 16}


@dataclass
class MAHAConfig(MAHAMixerConfig, CausalLMConfig):
    """Multiscale aggregated attention (``mixers/maha.py``): convex (simplex QP), nash (redundancy game)
    or softmax aggregation of the scales, a reach pyramid over the whole context in O(L log L), no more
    parameters per block than a standard block by default; aux = the scale load-balancing term."""

    mixer_name: ClassVar[str] = "maha"
    aux_loss_weight: float = 0.01

    def validate(self) -> None:
        super().validate()
        if not self.causal:
            raise config_error(
                "causal", self.causal, "the maha language model must be causal; use MAHATransformer(causal=False)"
            )

    def describe(self) -> list[str]:
        """Extra lines for ``hierseq info``: the block's parameters against a standard transformer block's
        at the same width, and whether a flag (``qk_head_dim``, ``per_scale_qk``) exceeds that budget."""
        return describe_parameters(self.mixer_config("maha"), self.d_model)

    # window 8 and r = 2 so that short test sequences (33-100 tokens) cross many windows at every
    # scale, reach the coarsest scale (needs r^(S-1) = 4 tokens) and, past 36 tokens, the pyramid's
    # coarser levels (level S - 1 + m is used once its finer level holds more than 8 tokens).
    small_mixer: ClassVar[dict[str, Any]] = {"n_heads": 2, "n_scales": 3, "downsample": 2, "window": 8}


@dataclass
class LinearAttentionConfig(LinearAttentionMixerConfig, CausalLMConfig):
    """Plain causal linear attention (``mixers/linear_attention.py``)."""

    mixer_name: ClassVar[str] = "linear_attn"
    small_mixer: ClassVar[dict[str, Any]] = {"n_heads": 2, "chunk_size": 16}


@dataclass
class LogLinearConfig(LogLinearMixerConfig, CausalLMConfig):
    """Log-linear attention (``mixers/loglinear.py``): Fenwick-tree levels over a gated linear-attention
    state, O(L log L) to train, O(log L) decoding state."""

    mixer_name: ClassVar[str] = "loglinear"

    # chunk 8 and 5 levels so the conformance lengths (45-90 tokens) span many chunks, several
    # chunk-tree levels, and levels past the shared top weight (level 4 and up).
    small_mixer: ClassVar[dict[str, Any]] = {"n_heads": 2, "chunk_size": 8, "n_levels": 5}


@dataclass
class MambaConfig(MambaMixerConfig, CausalLMConfig):
    """The second control: Mamba blocks (``mixers/mamba.py``), no MLP by default as in the reference."""

    mixer_name: ClassVar[str] = "mamba"
    mlp: str = "none"

    small_mixer: ClassVar[dict[str, Any]] = {"d_state": 8}


@dataclass
class Mamba2Config(Mamba2MixerConfig, CausalLMConfig):
    """Mamba-2 (SSD) blocks (``mixers/mamba2.py``), no MLP by default as in the reference."""

    mixer_name: ClassVar[str] = "mamba2"
    mlp: str = "none"

    # d_model 32 -> 4 heads of 16; chunk 16 so the conformance lengths (45, 80 tokens) cross 3-5 chunks.
    small_mixer: ClassVar[dict[str, Any]] = {"d_state": 8, "headdim": 16, "chunk_size": 16}


@dataclass
class GatedDeltaNetConfig(GatedDeltaNetMixerConfig, CausalLMConfig):
    """Gated DeltaNet (``mixers/gated_deltanet.py``): the delta-rule recurrent control, chunked WY/UT
    training, O(1) decoding state."""

    mixer_name: ClassVar[str] = "gated_deltanet"

    # chunk 16 so the conformance lengths (45, 80 tokens) cross several chunks and a partial last one.
    small_mixer: ClassVar[dict[str, Any]] = {"n_heads": 2, "chunk_size": 16}


def _register(name: str, config: type[CausalLMConfig], class_name: str) -> type[MixerLM]:
    """Register model ``name``: the shell over the mixers ``config`` names (a class of its own, so a
    loaded model's type says what it is)."""
    cls = type(class_name, (MixerLM,), {"__module__": __name__, "__qualname__": class_name, "__doc__": config.__doc__})
    return register(name, config=config)(cls)


TransformerLM = _register("transformer", TransformerConfig, "TransformerLM")
TreeLM = _register("tree", TreeConfig, "TreeLM")
HAMTLM = _register("hamt", HAMTLMConfig, "HAMTLM")
MAHALM = _register("maha", MAHAConfig, "MAHALM")
LinearAttentionLM = _register("linear_attn", LinearAttentionConfig, "LinearAttentionLM")
MambaLM = _register("mamba", MambaConfig, "MambaLM")
LogLinearLM = _register("loglinear", LogLinearConfig, "LogLinearLM")
GatedDeltaNetLM = _register("gated_deltanet", GatedDeltaNetConfig, "GatedDeltaNetLM")
Mamba2LM = _register("mamba2", Mamba2Config, "Mamba2LM")
