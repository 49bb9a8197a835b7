"""Flows used only by the kernel's tests: they record every step execution in the DB.

``kernel_step_log`` rows are (tag, step, started_at, ended_at) in unix milliseconds, so a
test can count executions and check that critical sections never overlap.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import sqlalchemy as sa

from tasks.db.session import control_plane_transaction
from worker.kernel.errors import InvalidParameterError, RefusedError
from worker.kernel.service import critical_section, service_flow
from worker.kernel.sleep import durable_sleep
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
    sa.Column("note", sa.String(512), nullable=True),
)


def record(
    tag: str, step_name: str, started: float, ended: float | None = None, note: str | None = None
) -> None:
    with control_plane_transaction() as connection:
        connection.execute(
            kernel_step_log.insert().values(
                tag=tag, step=step_name, started_at=started, ended_at=ended, note=note
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


@service_flow("kernel_sleep")
async def kernel_sleep(tag: str, key: str, seconds: float) -> float:
    """Hold ``key``, record, sleep durably for ``seconds``, record again; returns the wake time."""
    async with critical_section(key):
        first(tag)
        await durable_sleep(seconds, name="nap")
        woke = time.time()
        record(tag, "after", woke)
        return woke


def record_give_up(parameters: dict[str, Any], reason: str) -> None:
    """The give-up hook of ``kernel_give_up``: one log row with the reason."""
    record(str(parameters["tag"]), "give_up", time.time(), note=reason[:500])


@step(retries=0)
def failing_step(tag: str, kind: str) -> None:
    record(tag, "failing_step", time.time())
    if kind == "terminal":
        raise RefusedError(f"refused on purpose ({tag})")
    raise RuntimeError(f"retryable failure on purpose ({tag})")


@service_flow("kernel_give_up", on_give_up=record_give_up)
async def kernel_give_up(tag: str, fail: str = "none", sleep_seconds: float = 0.0) -> str:
    """A call with a give-up hook: fails as ``fail`` says (terminal, retryable, none) after
    sleeping ``sleep_seconds`` in a step; any other ``fail`` is refused at validation."""
    if fail not in ("none", "terminal", "retryable"):
        raise InvalidParameterError("fail", f"unknown failure kind {fail!r}")
    second(tag, sleep_seconds)
    if fail != "none":
        failing_step(tag, fail)
    return "done"


KERNEL_FLOWS = (
    "tests/support/kernel_flows.py:kernel_three_steps",
    "tests/support/kernel_flows.py:kernel_hold_key",
    "tests/support/kernel_flows.py:kernel_sleep",
    "tests/support/kernel_flows.py:kernel_give_up",
)
