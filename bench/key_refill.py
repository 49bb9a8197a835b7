"""key_refill: the daily key refill over N keys (1/3 due) on MariaDB, against the set-based floor.

ours: ``run_key_refill`` for one date through the Prefect API to the real worker
(``bench.worker_main``, warm dispatch; warmed by one refill of another date on an empty key
table), wall time trigger -> Completed: every due key reset to its refill amount with one
``audit_log`` and two ``audit_log_target`` rows, in batches of ``BATCH_SIZE`` keys per
transaction with the date's cursor.
ref: the same writes as hand-written set-based SQL on a fresh identical seed, same database,
same run: three ``INSERT ... SELECT`` (the audit log, the key targets, the workspace targets)
and one ``UPDATE`` of the due keys, in one transaction (PyMySQL, no Prefect).
ratio = ours / ref (target <= 1.5, goal <= 1.2).

Both sides are checked: as many refilled keys, audit logs, key targets and workspace targets
as the seed has due keys, no key still due, and the same rows (checksums over every column but
the timestamps) on both sides; the benchmark fails (exit 1) otherwise.

    python -m bench.key_refill [N=1000000]
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from bench.common import (
    BenchEnv,
    CpuSampler,
    bench_env,
    load_average,
    print_result,
    quiet_prefect_console,
    served_worker,
    size_arg,
    timed_call,
)

DATE = "2026-12-02"  # day 2 of a 31-day month: daily keys and refill_day 2 are due
WARM_DATE = "2026-12-01"  # the warm-up call's date (the key table is empty then)
SEED_CHUNK = 200_000
WORKSPACES = 1000

# The seed, by ``s`` = 0..N-1 (MariaDB's SEQUENCE engine): s % 3 = 0 is due (daily or refill
# day 2, remaining NULL or below the amount), 1 is not due (full, or refill day 15), 2 is not
# due (no refill amount, or deleted). Names: NULL, '' or set (the display name's fallback).
_SEED_SQL = """
INSERT INTO `keys` (id, key_auth_id, hash, start, workspace_id, name, created_at_m,
                    refill_day, refill_amount, remaining_requests, deleted_at_m)
SELECT CONCAT('key_bench_', seq), CONCAT('ks_bench_', seq % 10), CONCAT('hash_bench_', seq),
       'key_benc', CONCAT('ws_bench_', seq % {workspaces}),
       CASE seq % 4 WHEN 0 THEN NULL WHEN 1 THEN '' ELSE CONCAT('bench key ', seq) END,
       1,
       CASE seq % 3
         WHEN 0 THEN IF(seq % 2 = 0, NULL, 2)
         WHEN 1 THEN IF(seq % 2 = 0, NULL, 15)
         ELSE NULL END,
       CASE WHEN seq % 3 = 2 AND seq % 2 = 0 THEN NULL ELSE 100 + seq % 7 * 10 END,
       CASE seq % 3
         WHEN 0 THEN IF(seq % 9 = 0, NULL, seq % 50)
         WHEN 1 THEN IF(seq % 2 = 0, 100 + seq % 7 * 10, 5)
         ELSE 5 END,
       IF(seq % 3 = 2 AND seq % 2 = 1, 1, NULL)
FROM seq_{first}_to_{last}
"""

# The reference: the due rule of the date (tasks.db.key_refills.due_keys for day 2), the audit
# rows (the same columns and values the flow's INSERT ... SELECT write), then the reset.
_DUE = """`keys`.refill_amount IS NOT NULL AND `keys`.deleted_at_m IS NULL
  AND (`keys`.remaining_requests IS NULL OR `keys`.refill_amount > `keys`.remaining_requests)
  AND (`keys`.refill_day IS NULL OR `keys`.refill_day = 2)"""
_LOG_ID = "CONCAT('log_refill_20261202_', `keys`.pk)"
_SHOWN = "COALESCE(NULLIF(`keys`.name, ''), `keys`.id)"
_REFERENCE_SQL = [
    f"""INSERT INTO audit_log (workspace_id, bucket_id, bucket, id, event, time, display,
        actor_type, actor_id, actor_name, actor_meta, created_at)
    SELECT workspace_id, workspace_id, 'unkey_mutations', {_LOG_ID}, 'key.update', %(at)s,
        SUBSTR(CONCAT('Refilled key ', {_SHOWN}), 1, 256), 'system', 'keyrefill',
        'Key Refill Service', '{{}}', %(at)s
    FROM `keys` WHERE {_DUE}""",
    f"""INSERT INTO audit_log_target (workspace_id, bucket_id, bucket, audit_log_id,
        display_name, type, id, name, meta, created_at)
    SELECT workspace_id, workspace_id, 'unkey_mutations', {_LOG_ID}, {_SHOWN}, 'key', id, name,
        JSON_OBJECT('refill_amount', refill_amount, 'previous_remaining', remaining_requests,
                    'new_remaining', refill_amount), %(at)s
    FROM `keys` WHERE {_DUE}""",
    f"""INSERT INTO audit_log_target (workspace_id, bucket_id, bucket, audit_log_id,
        display_name, type, id, name, meta, created_at)
    SELECT workspace_id, workspace_id, 'unkey_mutations', {_LOG_ID}, workspace_id, 'workspace',
        workspace_id, NULL, '{{}}', %(at)s
    FROM `keys` WHERE {_DUE}""",
    f"""UPDATE `keys` SET remaining_requests = refill_amount, last_refill_at = %(refilled_at)s,
        updated_at_m = %(at)s
    WHERE {_DUE}""",
]

# What both sides must have written: counts, and checksums over every column but the instants
# (the flow stamps each batch with its own). NULL is tagged so that it differs from ''.
_N = "COALESCE({}, '<null>')"
_CHECKS = {
    "due_keys": f"SELECT COUNT(*) FROM `keys` WHERE {_DUE}",
    "refilled_keys": "SELECT COUNT(*) FROM `keys` WHERE last_refill_at IS NOT NULL",
    "refilled_key_stamps": "SELECT COUNT(*) FROM `keys` WHERE last_refill_at IS NOT NULL"
    " AND updated_at_m IS NOT NULL AND remaining_requests = refill_amount",
    "audit_logs": "SELECT COUNT(*) FROM audit_log",
    "key_targets": "SELECT COUNT(*) FROM audit_log_target WHERE type = 'key'",
    "workspace_targets": "SELECT COUNT(*) FROM audit_log_target WHERE type = 'workspace'",
    "keys_sum": "SELECT SUM(CRC32(CONCAT_WS('|', pk, id, "
    + ", ".join(_N.format(c) for c in ("remaining_requests", "refill_amount", "refill_day"))
    + ", last_refill_at IS NULL, updated_at_m IS NULL))) FROM `keys`",
    "audit_logs_sum": "SELECT SUM(CRC32(CONCAT_WS('|', id, workspace_id, bucket_id, bucket,"
    " event, display, actor_type, actor_id, "
    + ", ".join(_N.format(c) for c in ("actor_name", "actor_meta", "remote_ip", "user_agent"))
    + ", time = created_at))) FROM audit_log",
    "targets_sum": "SELECT SUM(CRC32(CONCAT_WS('|', workspace_id, bucket_id, bucket,"
    " audit_log_id, display_name, type, id, "
    + ", ".join(_N.format(c) for c in ("name", "meta"))
    + "))) FROM audit_log_target",
    "orphan_targets": "SELECT COUNT(*) FROM audit_log_target t LEFT JOIN audit_log l"
    " ON l.id = t.audit_log_id WHERE l.pk IS NULL",
}


def _connect(env: BenchEnv) -> Any:
    """A PyMySQL connection to the benchmark's database (autocommit off)."""
    import pymysql

    url = urlsplit(env.database_url.replace("mysql+pymysql://", "mysql://", 1))
    return pymysql.connect(
        host=url.hostname or "127.0.0.1",
        port=url.port or 3306,
        user=url.username or "",
        password=url.password or "",
        database=env.database_name,
        charset="utf8mb4",
        autocommit=False,
    )


def _seed(env: BenchEnv, size: int) -> float:
    """Empty the key and audit tables, insert the N keys (INSERT ... SELECT in chunks);
    returns the seconds it took. The pks start at 1 again: both sides get the same keys."""
    started = time.perf_counter()
    connection = _connect(env)
    try:
        with connection.cursor() as cursor:
            for table in ("audit_log_target", "audit_log", "keys"):
                cursor.execute(f"TRUNCATE TABLE `{table}`")
            cursor.execute("DELETE FROM key_refill_progress WHERE refill_date = %s", (DATE,))
            connection.commit()
            for first in range(0, size, SEED_CHUNK):
                last = min(first + SEED_CHUNK, size) - 1
                sql = _SEED_SQL.format(workspaces=WORKSPACES, first=first, last=last)
                cursor.execute(sql)
                connection.commit()
            cursor.execute("ANALYZE TABLE `keys`")
            cursor.fetchall()
    finally:
        connection.close()
    return time.perf_counter() - started


def _checks(env: BenchEnv) -> dict[str, int]:
    connection = _connect(env)
    try:
        with connection.cursor() as cursor:
            out = {}
            for name, sql in _CHECKS.items():
                cursor.execute(sql)
                (value,) = cursor.fetchone()
                out[name] = int(value or 0)
            return out
    finally:
        connection.close()


def _verify(side: str, found: dict[str, int], due: int) -> list[str]:
    """What is wrong with one side's writes (nothing: [])."""
    expected = {
        "due_keys": 0,
        "refilled_keys": due,
        "refilled_key_stamps": due,
        "audit_logs": due,
        "key_targets": due,
        "workspace_targets": due,
        "orphan_targets": 0,
    }
    return [
        f"{side}: {name} = {found[name]}, expected {value}"
        for name, value in expected.items()
        if found[name] != value
    ]


def _reference(env: BenchEnv) -> tuple[float, list[float]]:
    """The hand-written floor, one transaction; its wall time and each statement's."""
    import datetime as dt

    from worker.kernel.clock import now_ms

    at = now_ms()
    refilled_at = dt.datetime.fromtimestamp(at / 1000, tz=dt.UTC).replace(tzinfo=None)
    connection = _connect(env)
    try:
        with connection.cursor() as cursor:
            started = time.perf_counter()
            parts = []
            for sql in _REFERENCE_SQL:
                before = time.perf_counter()
                cursor.execute(sql, {"at": at, "refilled_at": refilled_at})
                parts.append(time.perf_counter() - before)
            before = time.perf_counter()
            connection.commit()
            parts.append(time.perf_counter() - before)
            return time.perf_counter() - started, parts
    finally:
        connection.close()


async def _ours(date: str) -> tuple[float, Any, dict[str, float], Counter[str]]:
    """One ``run_key_refill`` call: trigger -> Completed wall, its result, its phases, its
    task runs (steps) by name."""
    from worker import client

    call = await timed_call(client.run_key_refill(date))
    # Task run names: "<step>-<3 hex>", or the batches step's "refill keys after pk <n>".
    names = (re.sub(r"-[0-9a-f]{3}$", "", run.name).split(" after ")[0] for run in call.task_runs)
    return call.wall, call.result, call.phases, Counter(names)


def _cpu(before: dict[str, float], after: dict[str, float]) -> str:
    return ", ".join(f"{name} {after[name] - before.get(name, 0.0):.1f}" for name in after)


def _mariadb_pids() -> list[int]:
    """The MariaDB server's pid(s), for the CPU sample (none found: [])."""
    import os

    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/comm") as comm:
                    if comm.read().strip() in ("mariadbd", "mysqld"):
                        pids.append(int(name))
            except OSError:
                continue
    return pids


def main() -> int:
    """Run the benchmark; returns the exit code."""
    size = size_arg(1_000_000)
    due = (size + 2) // 3
    print(f"# key_refill N={size} ({due} due), date {DATE}, {load_average()}", flush=True)
    problems: list[str] = []
    # Prefect is imported only inside bench_env: it reads PREFECT_API_URL once, on import.
    with bench_env() as env, served_worker(env, 120.0) as served:
        quiet_prefect_console()
        from tasks.db.key_refills import BATCH_SIZE

        groups: dict[str, Sequence[int]] = {
            "worker": [served.process.pid],
            "prefect": [env.server.pid, int(getattr(env.server, "postgres_pid", 0) or 0)],
            "mariadb": _mariadb_pids(),
        }
        warm_s, warm_result, _, _ = asyncio.run(_ours(WARM_DATE))
        print(f"# warm-up call ({WARM_DATE}, empty table): {warm_s:.2f} s, {warm_result}")

        seeded_s = _seed(env, size)
        seeded = _checks(env)
        print(f"# reference seed: {size} keys in {seeded_s:.1f} s, {load_average()}", flush=True)
        if seeded["due_keys"] != due:
            problems.append(f"seed: {seeded['due_keys']} keys due, expected {due}")
        with CpuSampler(groups, interval=0.1) as sampler:
            ref_s, ref_parts = _reference(env)
            ref_cpu = sampler.totals()
        ref_checks = _checks(env)
        problems += _verify("ref", ref_checks, due)
        names = ("audit_log", "key targets", "workspace targets", "UPDATE keys", "COMMIT")
        detail = ", ".join(f"{n} {s:.2f}" for n, s in zip(names, ref_parts, strict=True))
        print(f"# ref: {ref_s:.2f} s ({detail}); CPU s: {_cpu({}, ref_cpu)}", flush=True)

        seeded_s = _seed(env, size)
        print(f"# ours seed: {size} keys in {seeded_s:.1f} s, {load_average()}", flush=True)
        with CpuSampler(groups, interval=0.1) as sampler:
            ours_s, result, phases, steps_run = asyncio.run(_ours(DATE))
            ours_cpu = sampler.totals()
        ours_checks = _checks(env)
        problems += _verify("ours", ours_checks, due)
        if result != {"keys_refilled": due}:
            problems.append(f"ours: result {result}, expected {{'keys_refilled': {due}}}")
        for name in ("keys_sum", "audit_logs_sum", "targets_sum"):
            if ours_checks[name] != ref_checks[name]:
                problems.append(
                    f"ours and ref wrote different rows: {name} {ours_checks[name]} != "
                    f"{ref_checks[name]}"
                )
        start = phases.get("created", 0.0)
        steps = " / ".join(
            f"{name} +{phases[name] - start:.2f}"
            for name in ("pending", "running", "completed")
            if name in phases
        )
        print(
            f"# ours: {ours_s:.2f} s trigger -> Completed (created {steps} s), "
            f"{-(-due // BATCH_SIZE)} batches of {BATCH_SIZE}, task runs: "
            f"{', '.join(f'{n} x{c}' for n, c in sorted(steps_run.items()))}; "
            f"CPU s: {_cpu({}, ours_cpu)}; "
            f"{served.api_retries()}",
            flush=True,
        )
    for problem in problems:
        print(f"# FAILED: {problem}", flush=True)
    print(
        f"# ours {due / ours_s:.0f} keys/s, ref {due / ref_s:.0f} keys/s; {load_average()}",
        flush=True,
    )
    print_result(
        "key_refill",
        ours_s / ref_s,
        f"{ours_s:.2f}",
        f"{ref_s:.2f}",
        f"s wall, {due} of {size} keys refilled + audit rows, "
        f"{due / ours_s:.0f} vs {due / ref_s:.0f} keys/s",
    )
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
