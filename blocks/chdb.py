"""chdb (the ClickHouse engine, in process) on one directory: safe across threads, processes, forks.

``blocks.clickhouse.clickhouse_from_url("chdb:///dir")`` builds this client; use that.

Why a session per operation (measured with chdb 4.4.0, engine 26.9.2.1, on this machine):

- Two *processes* on one directory: the second ``Session(dir)`` fails at once (~20 ms) with
  ``Code: 36 ... Error initializing EmbeddedServer`` (the cause, ``Code: 76 Cannot lock file
  <dir>/status``, only reaches stderr): the engine holds an exclusive ``flock`` on
  ``<dir>/status`` while any session of that process is open. No corruption was seen.
- One process: sessions on the *same* directory coexist; while one is open, a session on
  another directory, or ``chdb.query`` (``:memory:``), fails with ``Code: 36 EmbeddedServer
  already initialized with path ...``. The engine is process-wide.
- Cost: open 28-37 ms, query ~2 ms, close ~6 ms; 1.5-2 ms per query on a session kept open.

So every operation takes a process-wide lock, then an exclusive ``flock`` on
``<dir>/ctrl-chdb.lock`` (polled until the timeout), opens the session, runs one statement and
closes it. Nothing is held between operations: flow-run processes, crons and xdist workers take
turns instead of failing, and the process stays free for other directories and ``chdb.query``.
Measured: 3 processes x 50 inserts on one directory, 0 errors, all 150 rows present, ~80 ms per
operation while contended (~50 ms alone). A holder killed with SIGKILL releases both locks (the
kernel drops them) and the next open finds every committed row. A session kept open would be
~20x faster per query but would lock every other process out for as long as it is kept.
The price: nothing of a session outlives its statement. ``SET``, ``USE``, temporary tables and
the rows of ``Memory`` tables are gone at the next operation; use MergeTree tables and
qualified names (as every server query here does anyway).

Fork safety (measured): importing chdb starts 12 native threads, and a child forked from a
process that has imported chdb hangs forever in its first query (other code in the child is
fine). The worker forks each flow run from a pre-imported fork server, so chdb is imported only
inside an operation, never at module level, and a child forked after chdb was loaded (with
this module imported) gets ``ChdbForkError`` at once instead of hanging.

Parameters: ``Session.query(sql, fmt, params=...)`` binds ``{name:Type}`` server-side, but it
parses each value as ClickHouse *escaped text* (a raw tab or backslash is refused, ``None``
becomes the string ``NULL``). Values are therefore serialised with clickhouse-connect's own
serialiser (what it sends as ``param_<name>`` over HTTP), so both backends bind alike, and a
value is always data, never SQL. Inserts carry their rows as ``JSONEachRow`` data after
``FORMAT``, also parsed as data. Results are read as ``JSONCompact``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from blocks.clickhouse_errors import (
    ClickHouseUnavailableError,
    check_insert,
    classify,
    error_code,
    mask,
    secrets_in,
)
from worker.kernel.errors import TerminalError

__all__ = ["LOCK_FILE", "ChdbClient", "ChdbForkError"]

LOCK_FILE = "ctrl-chdb.lock"
_INT_TYPE = re.compile(r"(?:(?:Nullable|LowCardinality)\()*U?Int\d+\)*")

# The engine is process-wide (one directory at a time): one lock for every directory.
_engine_lock = threading.Lock()
_forked_after_chdb = False


class ChdbForkError(TerminalError):
    """chdb was loaded before this process was forked: its engine cannot run here."""


class ChdbClient:
    """chdb on one directory; a session per operation (thread- and process-safe).

    Args:
        directory: an absolute directory (created 0700 when missing).
        timeout_seconds: how long an operation waits for the directory.
    """

    def __init__(self, directory: str, timeout_seconds: float) -> None:
        self.directory = directory
        self.timeout_seconds = timeout_seconds
        self._where = f"chdb at {directory}"

    def __repr__(self) -> str:
        return f"<ClickHouse client: {self._where}>"

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """See ``blocks.clickhouse.ClickHouseClient.query``."""
        return _decode(self._run(sql, parameters))

    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> None:
        """See ``blocks.clickhouse.ClickHouseClient.command``."""
        self._run(sql, parameters)

    def insert(
        self, table: str, rows: Sequence[Sequence[Any]], column_names: Sequence[str]
    ) -> None:
        """See ``blocks.clickhouse.ClickHouseClient.insert`` (one statement, one batch)."""
        check_insert(table, rows, column_names)
        if not rows:
            return
        # Values JSON cannot hold (dates, UUIDs, decimals) travel as their text.
        data = "\n".join(
            json.dumps(dict(zip(column_names, row, strict=True)), default=str) for row in rows
        )
        columns = ", ".join(f"`{name}`" for name in column_names)
        target = ".".join(f"`{part}`" for part in table.split("."))
        self._run(
            f"INSERT INTO {target} ({columns}) "
            f"SETTINGS date_time_input_format = 'best_effort' FORMAT JSONEachRow\n{data}",
            None,
        )

    def close(self) -> None:
        """Nothing to release: no session is held between operations."""

    def _run(self, sql: str, parameters: dict[str, Any] | None) -> bytes:
        if _forked_after_chdb:
            raise ChdbForkError(
                f"{self._where}: chdb was loaded before this process was forked, and its "
                "engine hangs in a forked child; load chdb only after the fork"
            )
        bound = _bind(parameters)
        with _exclusive(self.directory, self.timeout_seconds, self._where):
            # Imported here, never at module level: see "Fork safety" above.
            from chdb import session as chdb_session

            try:
                session = chdb_session.Session(self.directory)
            except Exception as exc:
                # Held by a process that does not take our lock (Code 36), or unusable.
                detail = mask(str(exc), [])
                raise ClickHouseUnavailableError(f"cannot open {self._where}: {detail}") from None
            try:
                return bytes(session.query(sql, "JSONCompact", params=bound).bytes())
            except Exception as exc:
                text = str(exc)
                detail = mask(text, secrets_in("", parameters))
                raise classify(self._where, error_code(text), detail) from None
            finally:
                with contextlib.suppress(Exception):
                    session.close()


def _bind(parameters: dict[str, Any] | None) -> dict[str, str] | None:
    if not parameters:
        return None
    from clickhouse_connect.driver.binding import format_bind_value

    return {name: str(format_bind_value(value)) for name, value in parameters.items()}


def _decode(raw: bytes) -> list[tuple[Any, ...]]:
    if not raw.strip():
        return []  # statements without a result (DDL, INSERT)
    document = json.loads(raw)
    # 128/256-bit integers (and 64-bit ones under some settings) come as JSON strings.
    ints = [i for i, col in enumerate(document["meta"]) if _INT_TYPE.fullmatch(col["type"])]
    rows = []
    for values in document["data"]:
        for i in ints:
            if isinstance(values[i], str):
                values[i] = int(values[i])
        rows.append(tuple(values))
    return rows


@contextlib.contextmanager
def _exclusive(directory: str, timeout_seconds: float, where: str) -> Iterator[None]:
    deadline = time.monotonic() + timeout_seconds
    busy = ClickHouseUnavailableError(f"{where} is busy: not free within {timeout_seconds:g} s")
    if not _engine_lock.acquire(timeout=timeout_seconds):
        raise busy
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(
            os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            delay = 0.001
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise busy from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.01)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock
    finally:
        _engine_lock.release()


def _after_fork_in_child() -> None:
    global _engine_lock, _forked_after_chdb
    # The lock may have been held by a parent thread that does not exist in the child.
    _engine_lock = threading.Lock()
    if "chdb" in sys.modules:
        _forked_after_chdb = True


os.register_at_fork(after_in_child=_after_fork_in_child)
