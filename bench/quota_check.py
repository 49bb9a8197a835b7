"""quota_check: the daily quota check over N workspaces, against the two queries it boils down to.

ours: ``run_quota_check(billing_period=2026-11)`` through the Prefect API to the real worker
(``bench.worker_main``, warm dispatch, ``UNKEY_CLICKHOUSE_URL=chdb:///<temp dir>``, Slack and the
heartbeat off, so the notifications are recorded, not sent) over N workspaces in MariaDB (90 %
with a quota row, 2 % disabled) and their usage of the month in chdb
(``default.billable_verifications_per_month_v2`` + ``default.billable_ratelimits_per_month_v2``,
the verifications split over two rows); 1 % of them exceeded. Wall time trigger -> Completed,
p50 of ``RUNS`` runs, ``quota_notifications`` emptied before each (so every run records the
same notifications), after one warm-up check of a month without usage.
ref: the two hand-written queries, in a child process (chdb allows one process per directory,
and the bench process must not hold it while a flow run uses it): one usage query over the
month in chdb (a session opened and closed, as every chdb operation here) + one workspace and
quota query in MariaDB (PyMySQL), joined in Python to the same exceeded set; p50 of ``RUNS``,
after the imports (chdb's ~1 s import is printed apart: the flow-run process pays it too).
ratio = ours / ref (target <= 2 and ours <= 5 s, goal <= 1.5).

Both sides must find exactly the seeded exceeded workspaces (the flow's
``workspaces_exceeded``, the ``quota_notifications`` rows, the reference's set): else exit 1.

    python -m bench.quota_check [N=100000]
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from bench.common import (
    REPO,
    bench_env,
    describe,
    load_average,
    median,
    print_result,
    quiet_prefect_console,
    served_worker,
    size_arg,
    timed_call,
)

PERIOD = "2026-11"
YEAR, MONTH = 2026, 11
WARM_PERIOD = "2026-08"  # no usage at all: the warm-up check notifies nobody
RUNS = 3
FLOOR = 150_000
LIMITS = (150_000, 250_000, 1_000_000, 10_000_000)
COLUMNS = ["year", "month", "workspace_id", "count"]
_BATCH = 10_000


def _workspace_id(i: int) -> str:
    return f"ws_bench{i:08d}"


def _shape(i: int) -> tuple[bool, int | None, int, int]:
    """Workspace ``i``: (enabled, requests_per_month or None, usage this month, other month)."""
    enabled = i % 50 != 3
    limit = None if i % 10 == 9 else LIMITS[i % len(LIMITS)]
    if i % 100 == 0:  # exceeded: enabled, a quota row, over it and over the floor
        assert limit is not None and enabled
        return enabled, limit, limit + 1_000, 0
    if i % 100 == 1 and limit is not None:  # just under its quota (or the floor)
        return enabled, limit, max(limit, FLOOR) - 1, 0
    if i % 100 == 2:  # far over, but in the month before
        return enabled, limit, 0, 9_000_000
    if not enabled or limit is None:  # far over, disabled or without a quota row
        return enabled, limit, 5_000_000, 0
    return enabled, limit, (i * 7919) % 100_000 if i % 2 == 0 else 0, 0


def _expected(size: int) -> set[str]:
    return {_workspace_id(i) for i in range(size) if i % 100 == 0}


def _seed_mysql(url: str, size: int) -> None:
    from tasks.db.engine import engine_for
    from tasks.db.schema import quota, workspaces

    with engine_for(url).begin() as connection:
        for start in range(0, size, _BATCH):
            chunk = range(start, min(start + _BATCH, size))
            shapes = {i: _shape(i) for i in chunk}
            connection.execute(
                workspaces.insert(),
                [
                    {
                        "id": _workspace_id(i),
                        "org_id": f"org_bench{i:08d}",
                        "name": f"Bench workspace {i}",
                        "slug": f"bench-{i}",
                        "tier": "Pro",
                        "stripe_customer_id": f"cus_bench{i:08d}",
                        "enabled": shapes[i][0],
                        "beta_features": {},
                        "features": {},
                    }
                    for i in chunk
                ],
            )
            quotas = [
                {"workspace_id": _workspace_id(i), "requests_per_month": shapes[i][1]}
                for i in chunk
                if shapes[i][1] is not None
            ]
            connection.execute(quota.insert(), quotas)


def _seed_chdb(directory: str, size: int) -> int:
    """The usage rows (verifications in two rows, ratelimits in one); returns the row count."""
    from blocks.chdb import ChdbClient
    from tasks.clickhouse.schema import (
        BILLABLE_RATELIMITS,
        BILLABLE_VERIFICATIONS,
        ensure_analytics_tables,
    )

    client = ChdbClient(directory, 120.0)
    ensure_analytics_tables(client)
    first: list[tuple[int, int, str, int]] = []
    second: list[tuple[int, int, str, int]] = []
    ratelimits: list[tuple[int, int, str, int]] = []
    for i in range(size):
        _enabled, _limit, used, before = _shape(i)
        workspace = _workspace_id(i)
        for month, total in ((MONTH, used), (MONTH - 1, before)):
            if total:
                verifications = total * 6 // 10
                half = verifications // 2
                first.append((YEAR, month, workspace, half))
                second.append((YEAR, month, workspace, verifications - half))
                ratelimits.append((YEAR, month, workspace, total - verifications))
    # Separate inserts: separate parts, so the check must sum(count).
    client.insert(BILLABLE_VERIFICATIONS, first, COLUMNS)
    client.insert(BILLABLE_VERIFICATIONS, second, COLUMNS)
    client.insert(BILLABLE_RATELIMITS, ratelimits, COLUMNS)
    client.close()
    return len(first) + len(second) + len(ratelimits)


# -- the reference (a child process: python -m bench.quota_check --reference ...) ---------------

_REF_USAGE_SQL = (
    "SELECT workspace_id, toInt64(sum(c)) AS usage FROM ("
    " SELECT workspace_id, sum(count) AS c FROM default.billable_verifications_per_month_v2"
    " WHERE year = {year:Int16} AND month = {month:Int8} GROUP BY workspace_id"
    " UNION ALL"
    " SELECT workspace_id, sum(count) AS c FROM default.billable_ratelimits_per_month_v2"
    " WHERE year = {year:Int16} AND month = {month:Int8} GROUP BY workspace_id"
    ") GROUP BY workspace_id HAVING usage >= 150000"
)
_REF_WORKSPACE_SQL = (
    "SELECT w.id, w.enabled, q.requests_per_month FROM workspaces w"
    " LEFT JOIN quota q ON q.workspace_id = w.id WHERE w.deleted_at_m IS NULL"
)


def _reference_child(directory: str, database_url: str) -> int:
    """Time the two queries ``RUNS`` times; print one JSON line: imports, runs, the set."""
    started = time.perf_counter()
    import pymysql
    from chdb import session as chdb_session

    imports = time.perf_counter() - started
    parts = urlsplit(database_url.replace("mysql+pymysql://", "mysql://"))
    runs: list[float] = []
    exceeded: set[str] = set()
    for _ in range(RUNS):
        started = time.perf_counter()
        chdb = chdb_session.Session(directory)
        try:
            answer = chdb.query(
                _REF_USAGE_SQL, "JSONCompact", params={"year": str(YEAR), "month": str(MONTH)}
            )
            usage = {row[0]: int(row[1]) for row in json.loads(answer.bytes())["data"]}
        finally:
            chdb.close()
        connection = pymysql.connect(
            host=parts.hostname,
            port=parts.port or 3306,
            user=unquote(parts.username or ""),
            password=unquote(parts.password or ""),
            database=parts.path.strip("/"),
            charset="utf8mb4",
        )
        try:
            with connection.cursor() as cursor:
                cursor.execute(_REF_WORKSPACE_SQL)
                rows = cursor.fetchall()
        finally:
            connection.close()
        exceeded = {
            workspace
            for workspace, enabled, limit in rows
            if enabled and limit is not None and usage.get(workspace, 0) >= max(limit, FLOOR)
        }
        runs.append(time.perf_counter() - started)
    print(json.dumps({"imports": imports, "runs": runs, "exceeded": sorted(exceeded)}))
    return 0


def _reference(directory: str, database_url: str) -> dict[str, Any]:
    answer = subprocess.run(
        [sys.executable, "-m", "bench.quota_check", "--reference", directory, database_url],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if answer.returncode != 0:
        raise SystemExit(f"the reference failed (exit {answer.returncode}):\n{answer.stderr}")
    result: dict[str, Any] = json.loads(answer.stdout.strip().splitlines()[-1])
    return result


# -- ours -----------------------------------------------------------------------------------------


def _recorded(url: str) -> set[str]:
    import sqlalchemy as sa

    from tasks.db.engine import engine_for
    from tasks.db.schema import quota_notifications

    with engine_for(url).connect() as connection:
        return set(
            connection.execute(
                sa.select(quota_notifications.c.workspace_id).where(
                    quota_notifications.c.billing_period == PERIOD,
                    quota_notifications.c.notified_at.is_not(None),
                )
            ).scalars()
        )


def _forget_notifications(url: str) -> None:
    from tasks.db.engine import engine_for
    from tasks.db.schema import quota_notifications

    with engine_for(url).begin() as connection:
        connection.execute(quota_notifications.delete())


async def _check(billing_period: str) -> tuple[float, Any, str]:
    """One check, trigger -> result; also where its time went (phases, steps by name)."""
    from worker import client

    call = await timed_call(client.run_quota_check(billing_period))
    phases = call.phases
    steps: dict[str, list[float]] = {}
    for run in call.task_runs:
        if run.start_time is not None and run.end_time is not None:
            name = re.sub(r"(, page \d+|-[0-9a-f]{3})$", "", run.name)
            seconds = (run.end_time - run.start_time).total_seconds()
            steps.setdefault(name, []).append(seconds)
    created = phases.get("created", 0.0)
    detail = "pending +{:.2f} running +{:.2f} completed +{:.2f} s; steps: ".format(
        phases.get("pending", created) - created,
        phases.get("running", created) - created,
        phases.get("completed", created) - created,
    ) + ", ".join(
        f"{name} {len(times)}x {sum(times):.2f} s" for name, times in sorted(steps.items())
    )
    return call.wall, call.result, detail


def main() -> int:
    """Run the benchmark; returns the exit code."""
    if len(sys.argv) == 4 and sys.argv[1] == "--reference":
        return _reference_child(sys.argv[2], sys.argv[3])
    size = size_arg(100_000)
    expected = _expected(size)
    for name in ("UNKEY_QUOTA_CHECK_SLACK_WEBHOOK_URL", "UNKEY_QUOTA_CHECK_HEARTBEAT_URL"):
        os.environ.pop(name, None)  # Slack off: the notifications are recorded, not sent
    print(f"# quota_check N={size}, {len(expected)} exceeded, {load_average()}", flush=True)
    failures: list[str] = []
    with bench_env() as env, tempfile.TemporaryDirectory(prefix="ctrl-bench-chdb-") as tmp:
        quiet_prefect_console()  # inside: Prefect must first see the bench server's URL
        directory = str(Path(tmp) / "analytics")
        started = time.perf_counter()
        _seed_mysql(env.database_url, size)
        usage_rows = _seed_chdb(directory, size)
        print(
            f"# seeded {size} workspaces + quotas (MariaDB) and {usage_rows} usage rows (chdb) "
            f"in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
        reference = _reference(directory, env.database_url)
        if set(reference["exceeded"]) != expected:
            failures.append(
                f"the reference found {len(reference['exceeded'])} exceeded, "
                f"expected {len(expected)}"
            )
        ours: list[float] = []
        with served_worker(env, 120.0, UNKEY_CLICKHOUSE_URL=f"chdb://{directory}"):
            warm_s, warm, detail = asyncio.run(_check(WARM_PERIOD))
            print(f"# warm-up check of {WARM_PERIOD} (no usage): {warm_s:.2f} s, {warm}")
            print(f"#   {detail}")
            for run in range(RUNS):
                _forget_notifications(env.database_url)
                seconds, result, detail = asyncio.run(_check(PERIOD))
                ours.append(seconds)
                recorded = _recorded(env.database_url)
                print(f"# run {run + 1}: {seconds:.2f} s, {result}, {load_average()}")
                print(f"#   {detail}", flush=True)
                if result.get("workspaces_exceeded") != len(expected) or recorded != expected:
                    failures.append(
                        f"run {run + 1}: workspaces_exceeded={result.get('workspaces_exceeded')}"
                        f", {len(recorded)} recorded ({len(recorded - expected)} unexpected), "
                        f"expected {len(expected)}"
                    )
                if result.get("workspaces_checked") != size:
                    failures.append(f"run {run + 1}: checked {result.get('workspaces_checked')}")
    print("# " + describe("ours: run_quota_check trigger -> Completed", ours, "s", 1))
    print(
        "# "
        + describe("ref: usage query (chdb) + workspace query (MariaDB)", reference["runs"], "s", 1)
    )
    print(f"# ref imports (chdb + PyMySQL, not in ref): {reference['imports']:.2f} s")
    for failure in failures:
        print(f"# MISMATCH: {failure}", flush=True)
    ref = median(reference["runs"])
    print_result(
        "quota_check",
        median(ours) / ref,
        f"{median(ours):.2f}",
        f"{ref:.3f}",
        f"s wall, {size} workspaces, {len(expected)} exceeded, p50 of {RUNS}",
    )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
