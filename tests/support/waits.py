"""What tests that drive real workers share: waiting for a condition, counting step
executions, reading a run back, and seeing a MariaDB transaction wait on a row lock."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
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


def row_lock_waits(url: str) -> int:
    """How many MariaDB transactions wait on a row lock right now."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            return int(
                connection.exec_driver_sql(
                    "SELECT COUNT(*) FROM information_schema.innodb_trx "
                    "WHERE trx_state = 'LOCK WAIT'"
                ).scalar_one()
            )
    finally:
        engine.dispose()
