"""Every architecture; importing this package registers them all."""

from . import causal_lms, flat_mae, hama, hiss  # noqa: F401
