"""The control-plane database of this process: ``control_plane()`` is the one way tasks reach it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine

from tasks.db.engine import engine_for
from worker.settings import worker_settings

__all__ = ["control_plane", "control_plane_transaction"]


def control_plane() -> Engine:
    """The engine for ``UNKEY_DATABASE_PRIMARY`` (or the embedded SQLite file)."""
    return engine_for(worker_settings().database_url())


@contextmanager
def control_plane_transaction() -> Iterator[Connection]:
    """One transaction on the control-plane DB: committed at the end, rolled back on error."""
    with control_plane().begin() as connection:
        yield connection
