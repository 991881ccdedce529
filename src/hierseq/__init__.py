"""hierseq: hierarchical and sub-quadratic sequence models, measured honestly."""

from .config import BaseConfig
from .registry import build_config, build_model, count_parameters, get_entry, list_models, register
from .serialization import load, save

__version__ = "0.1.0"

__all__ = [
    "BaseConfig",
    "build_config",
    "build_model",
    "count_parameters",
    "generate",
    "get_entry",
    "list_models",
    "load",
    "register",
    "save",
]


def generate(*args, **kwargs):
    """See :func:`hierseq.generation.generate` (imported lazily to keep ``import hierseq`` light)."""
    from .generation import generate as _generate

    return _generate(*args, **kwargs)
