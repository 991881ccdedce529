"""The Hugging Face hub as a source of tokenizers and datasets: telling a hub name from a local path, and
whether the hub is switched off."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

#: A hub repository id: ``name`` or ``owner/name``.
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def written_as_path(source: str, suffixes: Iterable[str] = ()) -> bool:
    """Whether ``source`` names a local path rather than a hub repository: it exists, or it is written like
    a path (absolute, ``./``, ``~``, several folders, or one of the file ``suffixes``)."""
    if Path(source).expanduser().exists():
        return True
    if source.startswith(("/", ".", "~")) or source.count("/") > 1:
        return True
    return Path(source).suffix.lower() in set(suffixes)


def hub_offline() -> bool:
    """Whether the hub is switched off (``HF_HUB_OFFLINE``), read when asked: the hub libraries read it once
    at import, which would miss a setting made later in the process."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
