"""Install worker settings for a block and put back whatever was installed before (the
session's ``control_db`` settings, say): ``use_settings(None)`` would drop those for every later
test of the same process."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import worker.settings as settings_module
from worker.settings import Settings, use_settings, worker_settings

__all__ = ["changed_settings", "installed_settings"]


@contextmanager
def installed_settings(settings: Settings) -> Iterator[Settings]:
    """``settings`` are this process's worker settings inside the block."""
    previous = settings_module._current
    use_settings(settings)
    try:
        yield settings
    finally:
        use_settings(previous)


@contextmanager
def changed_settings(**update: Any) -> Iterator[Settings]:
    """This process's current worker settings with ``update`` applied, inside the block."""
    with installed_settings(worker_settings().model_copy(update=update)) as settings:
        yield settings
