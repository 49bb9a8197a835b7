"""Flows used only by the kernel's tests: they record every step execution in the DB.

``kernel_step_log`` rows are (tag, step, started_at, ended_at) in unix milliseconds, so a
test can count executions and check that critical sections never overlap.
"""

from __future__ import annotations

import asyncio
import os
import time

import sqlalchemy as sa

from tasks.db.session import control_plane_transaction
from worker.kernel.errors import InvalidParameterError
from worker.kernel.service import critical_section, service_flow
from worker.kernel.steps import step

test_metadata = sa.MetaData()
kernel_step_log = sa.Table(
    "kernel_step_log",
    test_metadata,
    sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tag", sa.String(128), nullable=False),
    sa.Column("step", sa.String(64), nullable=False),
    sa.Column("started_at", sa.Double, nullable=False),
    sa.Column("ended_at", sa.Double, nullable=True),
)


def record(tag: str, step_name: str, started: float, ended: float | None = None) -> None:
    with control_plane_transaction() as connection:
        connection.execute(
            kernel_step_log.insert().values(
                tag=tag, step=step_name, started_at=started, ended_at=ended
            )
        )


@step(retries=0)
def first(tag: str) -> str:
    record(tag, "first", time.time())
    return "first-done"


@step(retries=0)
def second(tag: str, sleep_seconds: float = 0.0) -> str:
    record(tag, "second", time.time())
    time.sleep(sleep_seconds)
    return "second-done"


@step(retries=0)
def third(tag: str, fail_marker: str = "") -> str:
    record(tag, "third", time.time())
    if fail_marker and os.path.exists(fail_marker):
        os.unlink(fail_marker)  # fail once: the next attempt succeeds
        raise RuntimeError(f"third step fails once because {fail_marker} existed")
    return "third-done"


@service_flow("kernel_three_steps")
async def kernel_three_steps(
    tag: str, sleep_seconds: float = 0.0, fail_marker: str = ""
) -> list[str]:
    """Three steps; the second may sleep, the third fails once if ``fail_marker`` exists."""
    return [first(tag), second(tag, sleep_seconds), third(tag, fail_marker)]


@service_flow("kernel_hold_key")
async def kernel_hold_key(tag: str, key: str, hold_seconds: float = 0.5) -> None:
    """Hold ``key`` for ``hold_seconds`` and record the interval (no step: just the lock)."""
    if not key:
        raise InvalidParameterError("key", "must not be empty")
    async with critical_section(key):
        started = time.time()
        record(tag, "acquired", started)
        await asyncio.sleep(hold_seconds)
        record(tag, "hold", started, time.time())


KERNEL_FLOWS = (
    "tests/support/kernel_flows.py:kernel_three_steps",
    "tests/support/kernel_flows.py:kernel_hold_key",
)
