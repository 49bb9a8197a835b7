"""Flows the benchmarks run: served by ``bench.worker_main`` or called in-process.

Each flow is a ``service_flow`` (async, persisted JSON result, run record, metrics) like the
worker's own service calls, so what is timed is what a real call pays. Flows that time their
own body return the raw per-call durations in seconds.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext, SyncClientContext

from tasks.db.session import control_plane_transaction
from tasks.db.versions import read_region_version, take_version
from worker.kernel.locks import ensure_key_limit, key_lock
from worker.kernel.service import critical_section, service_flow
from worker.kernel.steps import step

__all__ = [
    "CALL_MODES",
    "START_GATES",
    "bench_calls",
    "bench_hold_key",
    "bench_lock_cycles",
    "bench_take_versions",
    "bench_three_steps",
]


def read_counter(region: str) -> int:
    """The function under test: one indexed single-row read of MariaDB (a typical step body)."""
    with control_plane_transaction() as connection:
        return read_region_version(connection, region)


# The same function four ways, from nothing added to a full durable step, so the step's cost
# can be split into task-run overhead, result persistence and the keyed cache lookup.
read_counter_step = step(name="read_counter_step", key=("region",))(read_counter)
read_counter_task = task(name="read_counter_task", cache_policy=NO_CACHE, persist_result=False)(
    read_counter
)
read_counter_persisted = task(
    name="read_counter_persisted",
    cache_policy=NO_CACHE,
    persist_result=True,
    result_serializer="json",
)(read_counter)

CALL_MODES: dict[str, Callable[[str], Any]] = {
    "plain": read_counter,
    "task": read_counter_task,
    "persisted_task": read_counter_persisted,
    "step": read_counter_step,
}


def _time_calls(function: Callable[[str], Any], count: int, prefix: str) -> list[float]:
    durations: list[float] = []
    for i in range(count):
        region = f"{prefix}-{i}"
        started = time.perf_counter()
        function(region)
        durations.append(time.perf_counter() - started)
    return durations


@service_flow("bench_calls")
async def bench_calls(
    mode: str, count: int, prefix: str, shared_sync_client: bool = False
) -> list[float]:
    """Call ``read_counter`` ``count`` times the ``mode`` way, each with a distinct region.

    A sync task called from an async flow finds no sync client in its context, so Prefect
    builds a new ``SyncPrefectClient`` (and TLS context) for every call; with
    ``shared_sync_client`` the flow holds one for the whole loop, to measure what that costs.
    """
    function = CALL_MODES[mode]
    if not shared_sync_client:
        return _time_calls(function, count, prefix)
    with SyncClientContext.get_or_create():
        return _time_calls(function, count, prefix)


@service_flow("bench_lock_cycles")
async def bench_lock_cycles(count: int, prefix: str) -> dict[str, list[float]]:
    """Time ``key_lock`` acquire+release on fresh keys, and its parts.

    ``fresh``: the whole cycle on a key never seen (creates the limit), split into
    ``fresh_acquire`` (entering the block) and ``fresh_release`` (leaving it).
    ``create_limit``: ``ensure_key_limit`` alone on another fresh key; ``existing``: the
    cycle on that key once its limit exists; ``api_hello``: one API round trip doing nothing.
    """
    names = ("fresh", "fresh_acquire", "fresh_release", "create_limit", "existing", "api_hello")
    out: dict[str, list[float]] = {name: [] for name in names}
    for i in range(count):
        # The floor: one round trip to the same API that does no work (GET /hello).
        async with get_client() as client:
            started = time.perf_counter()
            await client.hello()
            out["api_hello"].append(time.perf_counter() - started)

        started = time.perf_counter()
        async with key_lock(f"{prefix}:fresh:{i}"):
            entered = time.perf_counter()
        ended = time.perf_counter()
        out["fresh"].append(ended - started)
        out["fresh_acquire"].append(entered - started)
        out["fresh_release"].append(ended - entered)

        other = f"{prefix}:other:{i}"
        started = time.perf_counter()
        await ensure_key_limit(other)
        created = time.perf_counter()
        async with key_lock(other):
            pass
        out["create_limit"].append(created - started)
        out["existing"].append(time.perf_counter() - created)
    return out


def _take_versions(region: str, caller: int, count: int) -> dict[str, Any]:
    durations: list[float] = []
    first = time.perf_counter()
    for i in range(count):
        started = time.perf_counter()
        take_version(region, purpose=f"bench-{caller}-{i}")
        durations.append(time.perf_counter() - started)
    return {"durations": durations, "started": first, "ended": time.perf_counter()}


# In-process benchmarks only: concurrent callers' flow runs wait here for each other before
# their first step, so what is timed together is their steps, not their flow runs' creation.
START_GATES: dict[str, threading.Barrier] = {}


@service_flow("bench_take_versions")
async def bench_take_versions(
    region: str, caller: int, count: int, shared_sync_client: bool = False, start_gate: str = ""
) -> dict[str, Any]:
    """Take ``count`` versions of ``region`` through the durable step, one purpose each.

    Returns the per-call durations and when (``time.perf_counter``) the first step started
    and the last one ended. ``shared_sync_client``: as in ``bench_calls``. ``start_gate``:
    wait at ``START_GATES[start_gate]`` before the first step.
    """
    if start_gate:
        await asyncio.to_thread(START_GATES[start_gate].wait, 600)
    if not shared_sync_client:
        return _take_versions(region, caller, count)
    with SyncClientContext.get_or_create():
        return _take_versions(region, caller, count)


@step(name="bench_first")
def bench_first(tag: str) -> str:
    return f"{tag}:first"


@step(name="bench_second")
def bench_second(tag: str) -> str:
    return f"{tag}:second"


@step(name="bench_third")
def bench_third(tag: str) -> str:
    return f"{tag}:third"


def _flow_run_id() -> str:
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return ""
    return str(context.flow_run.id)


@service_flow("bench_three_steps")
async def bench_three_steps(tag: str) -> list[str]:
    """Three trivial durable steps: the smallest realistic service call.

    Returns the three step values, then the flow run id (for the caller's breakdown).
    """
    return [bench_first(tag), bench_second(tag), bench_third(tag), _flow_run_id()]


@service_flow("bench_hold_key")
async def bench_hold_key(key: str, hold_seconds: float = 1.0) -> dict[str, Any]:
    """Hold ``key`` for ``hold_seconds``; returns when (epoch seconds) it held it, and the run."""
    async with critical_section(key):
        acquired = time.time()
        await asyncio.sleep(hold_seconds)
        released = time.time()
    return {"acquired": acquired, "released": released, "flow_run_id": _flow_run_id()}
