"""What tests that drive real workers share: waiting for a condition, counting step
executions, reading a run back, holding a MariaDB row lock and seeing a transaction wait on
one."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import sqlalchemy as sa

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll ``condition`` until it returns something true; return it.

    Raises:
        AssertionError: ``timeout`` seconds passed (the message names ``what``).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def step_counts(url: str, tag: str) -> Counter[str]:
    """How many times each step of ``tag`` executed (``kernel_step_log``)."""
    from tests.support.fixtures import step_log

    return Counter(row.step for row in step_log(url, tag))


def flow_run(flow_run_id: UUID) -> Any:
    """The flow run as the Prefect API has it now."""
    from prefect.client.orchestration import get_client

    async def read() -> Any:
        async with get_client() as client:
            return await client.read_flow_run(flow_run_id)

    return asyncio.run(read())


def state_names(flow_run_id: UUID) -> list[str]:
    """The names of every state the run went through, oldest first."""
    from prefect.client.orchestration import get_client

    async def read() -> list[str]:
        async with get_client() as client:
            states = await client.read_flow_run_states(flow_run_id)
        return [s.name or "" for s in sorted(states, key=lambda s: s.timestamp)]

    return asyncio.run(read())


@contextmanager
def holding_row_lock(url: str, query: Any, isolation_level: str | None = None) -> Iterator[None]:
    """Run ``query`` (a SELECT) ``FOR UPDATE`` in a transaction held until the block ends, so
    a worker's write to those rows (or, under REPEATABLE READ, into an absent row's gap)
    blocks there; rolled back after.

    Args:
        url: the MariaDB database.
        query: the rows to lock.
        isolation_level: e.g. ``"REPEATABLE READ"`` to lock a gap; default: the engine's.
    """
    options = {} if isolation_level is None else {"isolation_level": isolation_level}
    engine = sa.create_engine(url, **options)
    connection = engine.connect()
    transaction = connection.begin()
    try:
        connection.execute(query.with_for_update())
        yield
    finally:
        transaction.rollback()
        connection.close()
        engine.dispose()


def row_lock_waits(url: str, table: str | None = None) -> int:
    """How many transactions on ``url``'s database wait on a MariaDB row lock right now.

    Only that database's connections count: parallel test sessions (pytest-xdist) each have
    their own database on the same server, and another session's lock waits must not look
    like this test's.

    Args:
        url: the database (its name is the connections' default database).
        table: count only waits in a statement that names this table.
    """
    query = (
        "SELECT COUNT(*) FROM information_schema.innodb_trx AS trx "
        "JOIN information_schema.processlist AS connection "
        "ON connection.id = trx.trx_mysql_thread_id "
        "WHERE trx.trx_state = 'LOCK WAIT' AND connection.db = DATABASE()"
    )
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            if table is None:
                return int(connection.exec_driver_sql(query).scalar_one())
            return int(
                connection.exec_driver_sql(
                    query + " AND trx.trx_query LIKE %s", (f"%{table}%",)
                ).scalar_one()
            )
    finally:
        engine.dispose()


def run_pid(state_dir: Path, flow_run_id: UUID, timeout: float = 30) -> int:
    """The pid of the process running ``flow_run_id`` (from its local run record, which the
    worker writes under ``<state dir>/runs``)."""
    record = state_dir / "runs" / f"{flow_run_id}.json"

    def pid() -> int | None:
        try:
            return int(json.loads(record.read_text())["pid"]) or None
        except (FileNotFoundError, ValueError, KeyError):  # not (fully) written yet
            return None

    return int(wait_for(pid, timeout, f"the run record of {flow_run_id}"))
