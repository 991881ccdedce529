"""Token mixers: one file each, one signature (``mixers/base.py``), registered by name."""

from .base import MIXERS, Mixer, MixerConfig, get_mixer, register_mixer, resolve_mixer_config

__all__ = ["MIXERS", "Mixer", "MixerConfig", "get_mixer", "register_mixer", "resolve_mixer_config"]


def _ensure_imported() -> None:
    # Importing each mixer module runs its @register_mixer.
    from . import attention, gated_deltanet, hamt, linear_attention, loglinear, maha, mamba, mamba2, tree  # noqa: F401
