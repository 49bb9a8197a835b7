"""ClickHouse: one small client interface over a server (clickhouse-connect) or chdb (in process).

``UNKEY_CLICKHOUSE_URL`` / ``UNKEY_CLICKHOUSE_ADMIN_URL`` name either a server,
``http(s)://user:password@host:8123/database``, or a chdb directory, ``chdb:///abs/dir`` (the real
ClickHouse 26.9 engine, in process). ``clickhouse_from_url`` and the ``ClickHouse`` block build
either; ``analytics_client()`` / ``admin_client()`` are this process's cached ones.

The SQL is the same for both. Parameters use ClickHouse's server-side syntax ``{name:Type}``;
chdb gets the values serialised exactly as clickhouse-connect sends them over HTTP, so a value
is always data, never SQL. ``insert`` sends one batch (Native over HTTP, JSONEachRow data on
chdb); table and column names must be plain identifiers. Rows come back as tuples; on chdb they
are decoded from ``JSONCompact``, so Date/DateTime/Decimal/UUID arrive as their ClickHouse
text where clickhouse-connect returns Python objects (the tables here use Int64 unix-ms times).

Concurrency: a server client is thread-safe (no HTTP session, its own connection pool). A chdb
client opens a session per operation under a process lock and a file lock in the directory,
because the engine lets only one process open a directory at a time; ``blocks.chdb`` has the
measurements and the fork-safety rule (chdb is imported only when a chdb operation runs). The
cached clients are per process id: a forked child never reuses its parent's connections.

Security: the URL is a secret (it holds the password). Messages, reprs and exceptions name the
variable, the host and port or the directory, never the URL or the password; the password and
long string parameters are masked in server error texts, and causes are suppressed.

Error handling (``blocks.clickhouse_errors``): a bad URL is a ``ConfigError`` naming the
variable; a SQL error (syntax, unknown table, bad parameter, access denied) or a 4xx is a
``ClickHouseQueryError`` (terminal); network errors, timeouts, 5xx/408/429, a busy chdb
directory and any other server error code are ``ClickHouseUnavailableError`` (retryable).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from blocks.chdb import ChdbClient, ChdbForkError
from blocks.clickhouse_errors import (
    ClickHouseQueryError,
    ClickHouseUnavailableError,
    check_insert,
    classify,
    error_code,
    mask,
    secrets_in,
)
from worker.kernel.errors import ConfigError, RetryableError, TerminalError
from worker.settings import env_name, worker_settings

__all__ = [
    "ChdbForkError",
    "ClickHouse",
    "ClickHouseClient",
    "ClickHouseQueryError",
    "ClickHouseUnavailableError",
    "admin_client",
    "analytics_client",
    "clickhouse_from_url",
    "close_cached_clients",
]

DEFAULT_TIMEOUT_SECONDS = 30.0
_HTTP_STATUS = re.compile(r"HTTP status (\d{3})")


@runtime_checkable
class ClickHouseClient(Protocol):
    """What tasks need from ClickHouse (sync; safe to share between threads)."""

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """Run a SELECT; ``{name:Type}`` placeholders take ``parameters``."""
        ...

    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> None:
        """Run a statement whose result is not needed (DDL, ALTER, INSERT … SELECT)."""
        ...

    def insert(
        self, table: str, rows: Sequence[Sequence[Any]], column_names: Sequence[str]
    ) -> None:
        """Insert ``rows`` (values in ``column_names`` order) into ``table`` in one batch."""
        ...

    def close(self) -> None:
        """Release connections; a later call opens new ones."""
        ...


# -- URLs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Server:
    host: str
    port: int
    username: str
    password: str = field(repr=False)
    database: str
    secure: bool

    @property
    def where(self) -> str:
        return f"ClickHouse at {'https' if self.secure else 'http'}://{self.host}:{self.port}"


def _parse_url(url: str, variable: str) -> _Server | str:
    """A server, or the absolute chdb directory, that ``url`` names (never echoing it)."""
    shape = "http(s)://user:password@host:port/database or chdb:///absolute/directory"
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ConfigError(f"{variable} is not a valid URL (expected {shape})") from None
    if parts.query or parts.fragment:
        raise ConfigError(f"{variable} must not have a query string or fragment")
    if parts.scheme == "chdb":
        path = unquote(parts.path)
        if parts.netloc or not path.startswith("/"):
            raise ConfigError(f"{variable} must name an absolute directory: chdb:///abs/dir")
        return os.path.realpath(path)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{variable} must be {shape}")
    secure = parts.scheme == "https"
    database = unquote(parts.path.strip("/")) or "default"
    if "/" in database:
        raise ConfigError(f"{variable} must name one database after the port")
    return _Server(
        host=parts.hostname,
        port=port or (8443 if secure else 8123),
        username=unquote(parts.username or "") or "default",
        password=unquote(parts.password or ""),
        database=database,
        secure=secure,
    )


# -- the server client (clickhouse-connect) -------------------------------------------------------


class _ServerClient:
    """clickhouse-connect over HTTP(S); connects on first use (its handshake is a query)."""

    def __init__(self, server: _Server, timeout_seconds: float) -> None:
        self._server = server
        self._timeout = timeout_seconds
        self._lock = threading.Lock()
        self._client: Any = None

    def __repr__(self) -> str:
        return f"<ClickHouse client: {self._server.where}>"

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """See ``ClickHouseClient.query``."""
        with self._errors(parameters):
            result = self._connected().query(sql, parameters=parameters)
            return [tuple(row) for row in result.result_rows]

    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> None:
        """See ``ClickHouseClient.command``."""
        with self._errors(parameters):
            self._connected().command(sql, parameters=parameters)

    def insert(
        self, table: str, rows: Sequence[Sequence[Any]], column_names: Sequence[str]
    ) -> None:
        """See ``ClickHouseClient.insert``."""
        check_insert(table, rows, column_names)
        if rows:
            with self._errors(None):
                self._connected().insert(
                    table, [list(r) for r in rows], column_names=list(column_names)
                )

    def close(self) -> None:
        """See ``ClickHouseClient.close``."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def _connected(self) -> Any:
        with self._lock:
            if self._client is None:
                # Imported on first use: importing this module stays cheap for processes that
                # never talk to a server.
                import clickhouse_connect

                s = self._server
                self._client = clickhouse_connect.get_client(
                    host=s.host,
                    port=s.port,
                    username=s.username,
                    password=s.password,
                    database=s.database,
                    secure=s.secure,
                    connect_timeout=min(self._timeout, 10.0),
                    send_receive_timeout=self._timeout,
                    # The step that calls us retries with backoff: no second retry layer.
                    query_retries=0,
                    # No HTTP session: concurrent queries of one session are refused (373).
                    autogenerate_session_id=False,
                    # Its own connection pool, not the module-wide one a fork would share.
                    dedicated_pool=True,
                    show_clickhouse_errors="scrub",
                )
            return self._client

    @contextlib.contextmanager
    def _errors(self, parameters: dict[str, Any] | None) -> Iterator[None]:
        from clickhouse_connect.driver import exceptions as cc

        where = self._server.where
        try:
            yield
        except (TerminalError, RetryableError):
            raise
        except cc.OperationalError as exc:
            detail = mask(str(exc), secrets_in(self._server.password, parameters))
            raise ClickHouseUnavailableError(f"{where} is unavailable: {detail}") from None
        except (cc.ProgrammingError, cc.DataError) as exc:
            detail = mask(str(exc), secrets_in(self._server.password, parameters))
            raise ClickHouseQueryError(f"{where} refused the statement: {detail}") from None
        except cc.DatabaseError as exc:
            text = str(exc)
            status = _HTTP_STATUS.search(text)
            code = exc.code if exc.code is not None else error_code(text)
            detail = mask(text, secrets_in(self._server.password, parameters))
            raise classify(where, code, detail, int(status.group(1)) if status else None) from None
        except Exception as exc:  # urllib3/socket errors that clickhouse-connect let through
            raise ClickHouseUnavailableError(f"{where} failed: {type(exc).__name__}") from None


# -- building clients ----------------------------------------------------------------------------


def clickhouse_from_url(
    url: str,
    *,
    variable: str = "UNKEY_CLICKHOUSE_URL",
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
) -> ClickHouseClient:
    """A client for ``url``; it connects on its first operation, not here.

    Args:
        url: ``http(s)://user:password@host:port/database`` or ``chdb:///absolute/directory``.
        variable: the setting ``url`` came from, named in errors (never the URL itself).
        timeout_seconds: HTTP send/receive timeout, or how long chdb waits for its directory.

    Returns:
        A ``ClickHouseClient``.

    Raises:
        ConfigError: the URL is malformed, has another scheme, or a chdb path is not absolute.
    """
    target = _parse_url(url, variable)
    if isinstance(target, str):
        return ChdbClient(target, timeout_seconds)
    return _ServerClient(target, timeout_seconds)


class ClickHouse(Block):
    """A ClickHouse connection: a server over HTTP(S) or a chdb directory.

    Args:
        url: ``http(s)://user:password@host:port/database`` or ``chdb:///absolute/directory``.
        timeout_seconds: HTTP send/receive timeout, or how long chdb waits for its directory.
    """

    _block_type_name = "Ctrl ClickHouse"

    url: SecretStr = Field(description="http(s)://user:password@host:port/db or chdb:///dir")
    timeout_seconds: float = Field(default=DEFAULT_TIMEOUT_SECONDS, gt=0)

    def get_client(self) -> ClickHouseClient:
        """A client for this block's URL (a new one per call; close it when done).

        Raises:
            ConfigError: the URL is malformed or not http(s)/chdb.
        """
        return clickhouse_from_url(
            self.url.get_secret_value(),
            variable="the ClickHouse block's url",
            timeout_seconds=self.timeout_seconds,
        )


_cache_lock = threading.Lock()
_cache: dict[str, tuple[int, str, ClickHouseClient]] = {}


def _cached(setting: str) -> ClickHouseClient | None:
    settings = worker_settings()
    if setting == "clickhouse_url":  # with its embedded default (``analytics_clickhouse_url``)
        url = settings.analytics_clickhouse_url() or ""
    else:
        secret: SecretStr | None = getattr(settings, setting)
        url = secret.get_secret_value() if secret is not None else ""
    if not url:
        return None
    pid, digest = os.getpid(), hashlib.sha256(url.encode()).hexdigest()
    with _cache_lock:
        entry = _cache.get(setting)
        if entry is not None and entry[0] == pid and entry[1] == digest:
            return entry[2]
        if entry is not None and entry[0] == pid:
            entry[2].close()  # the setting changed (tests, use_settings)
        # Another pid's entry belongs to the parent: dropped, never closed or used here.
        client = clickhouse_from_url(url, variable=env_name(setting))
        _cache[setting] = (pid, digest, client)
        return client


def analytics_client() -> ClickHouseClient | None:
    """This process's client for ``UNKEY_CLICKHOUSE_URL``, or None when ClickHouse is off.

    Unset on the embedded defaults, the URL is the state directory's chdb
    (``Settings.analytics_clickhouse_url``); set to the empty string, ClickHouse is off.

    Returns:
        The cached client (one per process id and URL), or None.

    Raises:
        ConfigError: the settings or the URL are invalid.
    """
    return _cached("clickhouse_url")


def admin_client() -> ClickHouseClient | None:
    """This process's client for ``UNKEY_CLICKHOUSE_ADMIN_URL``, or None when it is not set.

    Returns:
        The cached client (one per process id and URL), or None.

    Raises:
        ConfigError: the settings or the URL are invalid.
    """
    return _cached("clickhouse_admin_url")


def close_cached_clients() -> None:
    """Close and forget this process's cached clients (tests; settings that changed)."""
    with _cache_lock:
        entries = list(_cache.values())
        _cache.clear()
    for pid, _digest, client in entries:
        if pid == os.getpid():
            client.close()


def _forget_cache_in_child() -> None:
    global _cache_lock
    # A parent thread may have held the lock; the parent's clients are not this process's.
    _cache_lock = threading.Lock()
    _cache.clear()


os.register_at_fork(after_in_child=_forget_cache_in_child)
