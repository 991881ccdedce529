"""Every architecture; importing this package registers them all."""

from . import (  # noqa: F401
    flat_mae,
    hama,
    hamt,
    hiss,
    linear_attention,
    maha,
    mamba,
    transformer,
    tree,
)
