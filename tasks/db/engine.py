"""The one way to reach the control-plane database: a cached engine per URL and a transaction.

MariaDB/MySQL (PyMySQL) in production, SQLite for the embedded default. SQLite gets WAL and a
busy timeout so that the worker and its flow-run processes can share the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from threading import Lock
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url

__all__ = ["dispose_engines", "engine_for", "is_mysql", "transaction"]

_engines: dict[str, Engine] = {}
_engines_lock = Lock()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def engine_for(url: str) -> Engine:
    """A process-wide engine for ``url`` (created on first use)."""
    with _engines_lock:
        engine = _engines.get(url)
        if engine is not None:
            return engine
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            if parsed.database:
                from pathlib import Path

                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"timeout": 30})
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            # pre_ping + recycle: a MariaDB restart mid-run must cost a retry, not a dead pool.
            engine = create_engine(
                url,
                pool_pre_ping=True,
                pool_recycle=1800,
                pool_size=5,
                max_overflow=10,
            )
        _engines[url] = engine
        return engine


def is_mysql(engine: Engine | Connection) -> bool:
    """True on MySQL/MariaDB, False on SQLite."""
    return engine.dialect.name in {"mysql", "mariadb"}


@contextmanager
def transaction(url: str) -> Iterator[Connection]:
    """One database transaction: committed when the block ends, rolled back if it raises."""
    with engine_for(url).begin() as connection:
        yield connection


def dispose_engines() -> None:
    """Close every pooled connection (shutdown, and after fork)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
