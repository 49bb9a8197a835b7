"""Install worker settings for a block and put back whatever was installed before (the
session's ``control_db`` settings, say): ``use_settings(None)`` would drop those for every later
test of the same process."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import worker.settings as settings_module
from worker.settings import Settings, use_settings

__all__ = ["installed_settings"]


@contextmanager
def installed_settings(settings: Settings) -> Iterator[Settings]:
    """``settings`` are this process's worker settings inside the block."""
    previous = settings_module._current
    use_settings(settings)
    try:
        yield settings
    finally:
        use_settings(previous)
