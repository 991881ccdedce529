"""Every architecture; importing this package registers them all."""

from . import transformer  # noqa: F401
from . import mamba  # noqa: F401
from . import tree  # noqa: F401
from . import hiss  # noqa: F401
from . import maha  # noqa: F401
from . import hama  # noqa: F401
from . import flat_mae  # noqa: F401
from . import hamt  # noqa: F401
from . import linear_attention  # noqa: F401
