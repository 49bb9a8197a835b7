"""Creating the analytics tables: ``ctrl-worker db init`` and the worker's embedded ClickHouse.

Where the tables go is ``Settings.analytics_clickhouse_url()``: ``UNKEY_CLICKHOUSE_URL``, or, when
it is unset on the embedded defaults (no ``UNKEY_DATABASE_PRIMARY``), the chdb directory
``<state dir>/clickhouse``; ``UNKEY_CLICKHOUSE_URL=`` (empty) turns ClickHouse off.

- ``init_configured_analytics`` (``db init``): ``CREATE TABLE IF NOT EXISTS`` for every table of
  ``tasks.clickhouse.schema`` that is missing, on chdb or on a server; existing tables are left
  as they are, so a second run creates nothing. On a server the platform's migrations normally
  own these tables: a refusal (no CREATE privilege) or an unreachable server is reported, not
  fatal (``AnalyticsInit.error``); on chdb (ours) it is an error.
- ``ensure_embedded_analytics`` (``ctrl-worker run``): the same for a chdb URL, in a short child
  process (``python -m tasks.clickhouse.bootstrap DIR``), because chdb must never be loaded
  into the worker process (``blocks.chdb``: its engine starts native threads and a process
  forked after loading it hangs; it also costs ~350 MB). A server is never changed at startup.

Nothing here prints or returns a URL: a server is named by host and port only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from tasks.clickhouse.schema import ANALYTICS_TABLES, ensure_analytics_tables

if TYPE_CHECKING:
    from blocks.clickhouse import ClickHouseClient
    from worker.settings import Settings

__all__ = [
    "AnalyticsInit",
    "chdb_directory",
    "ensure_embedded_analytics",
    "init_analytics_tables",
    "init_configured_analytics",
]

EMBEDDED_INIT_TIMEOUT_SECONDS = 120.0
_EXISTING_SQL = (
    "SELECT concat(database, '.', name) FROM system.tables "
    "WHERE database IN {databases:Array(String)}"
)


@dataclass
class AnalyticsInit:
    """What ``init_configured_analytics`` did.

    Attributes:
        where: the ClickHouse it worked on (``chdb at /dir``, ``ClickHouse at host:port``), or
            ``""`` when ClickHouse is off.
        embedded: True for chdb (the worker's own engine).
        created: the tables it created (``default.<name>``), sorted.
        error: why it could not create them (a server only), or None.
    """

    where: str
    embedded: bool = False
    created: list[str] = field(default_factory=list)
    error: str | None = None


def chdb_directory(url: str) -> str | None:
    """The directory a ``chdb:///dir`` URL names, or None for any other URL."""
    parts = urlsplit(url.strip())
    if parts.scheme != "chdb" or parts.netloc:
        return None
    path = unquote(parts.path)
    return os.path.realpath(path) if path.startswith("/") else None


def _server_where(url: str) -> str:
    parts = urlsplit(url.strip())
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"ClickHouse at {parts.scheme}://{parts.hostname}" + (f":{port}" if port else "")


def init_analytics_tables(client: ClickHouseClient) -> list[str]:
    """Create the analytics tables that are missing; return their names, sorted.

    Args:
        client: a ClickHouse client (chdb or server).

    Returns:
        The tables created (``[]`` when all existed: idempotent).

    Raises:
        ClickHouseQueryError: a statement was refused (no CREATE privilege, say).
        ClickHouseUnavailableError: ClickHouse could not answer now.
    """
    databases = sorted({name.split(".", 1)[0] for name in ANALYTICS_TABLES})
    existing = {str(row[0]) for row in client.query(_EXISTING_SQL, {"databases": databases})}
    ensure_analytics_tables(client)
    return sorted(name for name in ANALYTICS_TABLES if name not in existing)


def init_configured_analytics(settings: Settings) -> AnalyticsInit:
    """``db init`` for analytics: create the missing tables where the settings point.

    Args:
        settings: the worker settings.

    Returns:
        What was done; ``where == ""`` when ClickHouse is off. A server that refused or could
        not be reached is reported in ``error`` (its tables are the platform's).

    Raises:
        ConfigError: the URL is malformed.
        ClickHouseQueryError, ClickHouseUnavailableError: the embedded chdb failed.
    """
    from blocks.clickhouse import clickhouse_from_url
    from blocks.clickhouse_errors import ClickHouseQueryError, ClickHouseUnavailableError
    from worker.settings import env_name

    url = settings.analytics_clickhouse_url()
    if url is None:
        return AnalyticsInit(where="")
    client = clickhouse_from_url(url, variable=env_name("clickhouse_url"))
    directory = chdb_directory(url)
    try:
        if directory is not None:
            return AnalyticsInit(
                where=f"chdb at {directory}", embedded=True, created=init_analytics_tables(client)
            )
        where = _server_where(url)
        try:
            return AnalyticsInit(where=where, created=init_analytics_tables(client))
        except (ClickHouseQueryError, ClickHouseUnavailableError) as exc:
            return AnalyticsInit(where=where, error=str(exc))
    finally:
        client.close()


def ensure_embedded_analytics(settings: Settings) -> list[str]:
    """At worker startup: the analytics tables of an embedded chdb, created in a child process.

    Args:
        settings: the worker settings.

    Returns:
        The tables created (``[]`` when ClickHouse is off, a server, or all tables existed).

    Raises:
        SystemExit: the child failed or timed out (the message says why and how to turn the
            embedded ClickHouse off).
    """
    url = settings.analytics_clickhouse_url()
    directory = chdb_directory(url) if url else None
    if directory is None:
        return []
    how_to_skip = "set UNKEY_CLICKHOUSE_URL= (empty) to run without ClickHouse"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tasks.clickhouse.bootstrap", directory],
            capture_output=True,
            text=True,
            timeout=EMBEDDED_INIT_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise SystemExit(
            f"creating the analytics tables in chdb at {directory} took more than "
            f"{EMBEDDED_INIT_TIMEOUT_SECONDS:g} s; {how_to_skip}"
        ) from None
    if done.returncode != 0:
        detail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(
            f"could not create the analytics tables in chdb at {directory}: {detail}; {how_to_skip}"
        )
    created: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return created


def _main(argv: list[str]) -> int:
    # The child of ``ensure_embedded_analytics``: chdb is loaded here, never in the worker.
    from blocks.chdb import ChdbClient

    if len(argv) != 1 or chdb_directory(f"chdb://{argv[0]}") is None:
        print(
            "usage: python -m tasks.clickhouse.bootstrap /absolute/chdb/directory", file=sys.stderr
        )
        return 2
    try:
        created = init_analytics_tables(ChdbClient(argv[0], timeout_seconds=60.0))
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(created))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
