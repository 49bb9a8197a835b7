"""versions: ``next_version`` throughput with 8 concurrent callers on one region.

ours: the durable step ``tasks.db.versions.take_version`` (a Prefect task with a persisted,
keyed result around one atomic ``LAST_INSERT_ID(version + 1)`` upsert) called inside flow runs:
8 concurrent async flow runs in this process (one event loop per thread: on a shared loop the
sync steps take turns), each taking N/8 versions with distinct purposes (so every call is a
real increment, none replays). The 8 flow runs are created at once and wait for each other
before their first step; throughput is over the steps' window, from the first step's start to
the last one's end (callers are flow runs already running); the rate counting the flow runs'
own creation, start and end is printed next to it.
ref: raw PyMySQL, ``UPDATE counters SET v = LAST_INSERT_ID(v + 1)`` in autocommit, the value
read from ``cursor.lastrowid``, 8 threads, the same total.
ratio = ours/ref throughput (target >= 0.5).

Also printed, for the breakdown (with N/10 calls): the bare ``increment_region_version``
through SQLAlchemy with 8 threads (the SQL the step runs, without Prefect); the step in one
flow run, with and without one sync Prefect client held for the loop; 8 flow runs gathered on
one event loop; and a check that the versions handed out are exactly 1..N.

    python -m bench.versions [N=2000]
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pymysql
from sqlalchemy.engine import make_url

from bench.common import (
    BenchEnv,
    bench_env,
    count_api_retries,
    describe,
    median,
    print_result,
    quiet_prefect_console,
    size_arg,
)

CALLERS = 8
TARGET_RATIO = 0.5


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _pymysql_connect(url: str) -> pymysql.connections.Connection[Any]:
    parsed = make_url(url)
    return pymysql.connect(
        host=parsed.host or "127.0.0.1",
        port=parsed.port or 3306,
        user=parsed.username or "",
        password=parsed.password or "",
        database=parsed.database or "",
        autocommit=True,
    )


def _threads(
    total: int, work: Callable[[int], list[float]], threads: int = CALLERS
) -> tuple[float, list[float]]:
    """Run ``work(count)`` in ``threads`` threads (``total`` calls in all); wall and latencies."""
    barrier = threading.Barrier(threads)

    def caller(count: int) -> list[float]:
        barrier.wait()
        return work(count)

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        latencies = [t for part in pool.map(caller, _split(total, threads)) for t in part]
    return time.perf_counter() - started, latencies


def raw_pymysql(env: BenchEnv, total: int) -> tuple[float, list[float]]:
    """The reference: one autocommit statement per increment, value from ``lastrowid``."""
    with _pymysql_connect(env.database_url) as setup, setup.cursor() as cursor:
        cursor.execute(
            "CREATE TABLE IF NOT EXISTS counters (name VARCHAR(64) PRIMARY KEY, v BIGINT NOT NULL)"
        )
        cursor.execute("INSERT INTO counters (name, v) VALUES ('seq', 0)")

    def work(count: int) -> list[float]:
        latencies = []
        with _pymysql_connect(env.database_url) as connection, connection.cursor() as cursor:
            for _ in range(count):
                started = time.perf_counter()
                cursor.execute("UPDATE counters SET v = LAST_INSERT_ID(v + 1) WHERE name = 'seq'")
                if cursor.lastrowid <= 0:
                    raise RuntimeError("LAST_INSERT_ID did not come back as lastrowid")
                latencies.append(time.perf_counter() - started)
        return latencies

    return _threads(total, work)


def bare_sql(region: str, total: int, threads: int = CALLERS) -> tuple[float, list[float]]:
    """``increment_region_version`` in its own transaction per call, no Prefect."""
    from tasks.db.session import control_plane_transaction
    from tasks.db.versions import increment_region_version

    def work(count: int) -> list[float]:
        latencies = []
        for _ in range(count):
            started = time.perf_counter()
            with control_plane_transaction() as connection:
                increment_region_version(connection, region)
            latencies.append(time.perf_counter() - started)
        return latencies

    return _threads(total, work)


@dataclass
class StepRuns:
    """What the callers' flow runs measured."""

    wall: float  # from starting the flow runs to the last one finished
    window: float  # from the first step's start to the last step's end
    latencies: list[float]
    restarts: int = 0  # flow runs started again after the API refused to create them


def _collect(wall: float, parts: list[dict[str, Any]], restarts: int = 0) -> StepRuns:
    window = max(p["ended"] for p in parts) - min(p["started"] for p in parts)
    latencies = [t for p in parts for t in p["durations"]]
    return StepRuns(wall, window, latencies, restarts)


def steps_in_threads(
    region: str, total: int, callers: int, shared_sync_client: bool = False
) -> StepRuns:
    """``callers`` flow runs at once, each in its own thread and event loop.

    A sync step called from an async flow runs on the flow's event loop thread and blocks it,
    so flow runs sharing one loop take turns; one loop per thread lets their database and API
    waits overlap (the GIL still serialises their Python).
    """
    from prefect.exceptions import PrefectHTTPStatusError

    from bench.flows import START_GATES, bench_take_versions

    # The flow runs are created at once, then wait for each other before their first step.
    START_GATES[region] = threading.Barrier(callers)
    restarts: list[int] = []

    def caller(args: tuple[int, int]) -> dict[str, Any]:
        number, count = args

        async def one_flow_run() -> dict[str, Any]:
            return await bench_take_versions(
                region, number, count, shared_sync_client=shared_sync_client, start_gate=region
            )

        for attempt in range(3):
            try:
                return asyncio.run(one_flow_run())
            except PrefectHTTPStatusError as exc:
                # The SQLite-backed server answers 503 while its database is locked; the
                # client already retried for ~60 s. Creating the flow run failed before any
                # step ran (the dense check below would show a step taken twice), and before
                # the gate, which waits for the new attempt.
                if attempt == 2 or exc.response.status_code != 503:
                    raise
                restarts.append(number)
        raise AssertionError("unreachable")

    started = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        parts = list(pool.map(caller, enumerate(_split(total, callers))))
    return _collect(time.perf_counter() - started, parts, len(restarts))


def _versions_are_dense(region: str, expected: int) -> bool:
    from tasks.db.session import control_plane_transaction
    from tasks.db.versions import read_region_version

    with control_plane_transaction() as connection:
        return read_region_version(connection, region) == expected


def _rate(label: str, count: int, wall: float, latencies: list[float]) -> float:
    rate = count / wall
    print(f"{label}: {count} in {wall:.2f} s = {rate:.1f}/s")
    print(describe("  latency per call", latencies))
    return rate


def _steps_rate(label: str, count: int, runs: StepRuns) -> float:
    rate = count / runs.window
    print(
        f"{label}: {count} in {runs.window:.2f} s of steps = {rate:.1f}/s "
        f"({count / runs.wall:.1f}/s counting the flow runs' start and end: {runs.wall:.2f} s)"
    )
    print(describe("  latency per call", runs.latencies))
    if runs.restarts:
        print(f"  flow runs restarted after a 503 on creation: {runs.restarts}")
    return rate


def main() -> None:
    total = size_arg(2000)
    small = max(CALLERS, total // 10)  # the informational step variants
    env: BenchEnv
    with bench_env() as env:
        quiet_prefect_console()
        retries = count_api_retries()
        tag = uuid.uuid4().hex[:8]
        steps_in_threads(f"bench-warm-{tag}", CALLERS, CALLERS)  # imports, pools, clients
        ref_wall, ref_lat = raw_pymysql(env, total)
        # The measured runs first: every task run leaves events for the server to ingest,
        # and a server still busy with them refuses new flow runs (503) for a while.
        ours_region = f"bench-steps-{tag}"
        ours_runs = steps_in_threads(ours_region, total, CALLERS)
        dense = _versions_are_dense(ours_region, total)
        sql_wall, sql_lat = bare_sql(f"bench-sql-{tag}", total)
        sql1_wall, sql1_lat = bare_sql(f"bench-sql1-{tag}", small, threads=1)
        one = steps_in_threads(f"bench-one-{tag}", small, 1)
        shared = steps_in_threads(f"bench-shared-{tag}", small, 1, True)

    ref = _rate(f"ref: raw PyMySQL, {CALLERS} threads", total, ref_wall, ref_lat)
    ours = _steps_rate(
        f"ours: take_version step, {CALLERS} flow runs in {CALLERS} threads", total, ours_runs
    )
    print(f"  versions of the measured region are exactly 1..{total}: {dense}")
    _rate(
        f"info: increment_region_version via SQLAlchemy, {CALLERS} threads",
        total,
        sql_wall,
        sql_lat,
    )
    _rate("info: the same, 1 thread", small, sql1_wall, sql1_lat)
    _steps_rate("info: take_version step, 1 flow run", small, one)
    _steps_rate("info: the same with one sync client held by the flow", small, shared)
    step_ms = median(one.latencies) * 1000
    shared_ms = median(shared.latencies) * 1000
    sql_ms = median(sql1_lat) * 1000
    print(
        f"breakdown (p50 ms per call, one caller): step {step_ms:.2f} = the SQL through "
        f"SQLAlchemy {sql_ms:.2f} + a new sync Prefect client per step "
        f"{step_ms - shared_ms:.2f} + task run and result record ~{shared_ms - sql_ms:.2f}"
    )
    in_steps = sum(ours_runs.latencies) / CALLERS
    print(
        f"ours: each caller was inside a step {in_steps / ours_runs.window:.0%} of the window, "
        f"and a step took {median(ours_runs.latencies) * 1000:.0f} ms p50 with {CALLERS} callers "
        f"vs {step_ms:.0f} ms alone: the callers' steps take turns on one process's GIL"
    )
    print(retries.summary())
    met = "met" if ours / ref >= TARGET_RATIO else "NOT met"
    print(f"ours/ref = {ours / ref:.4f} (target >= {TARGET_RATIO}: {met})")
    print(f"size: {total} versions, {CALLERS} callers, one region (info variants: {small})")
    print_result("versions", ours / ref, f"{ours:.1f}", f"{ref:.0f}", "versions/s")


if __name__ == "__main__":
    main()
