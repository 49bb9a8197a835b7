"""KeyRefillService under SIGKILL, through real worker subprocesses (SPEC §5 scenario 1).

A refill of 200,000 keys is started through ``worker.client``; once the date's cursor shows
progress but not the end (at a random share of the keys), the worker and the run's process are
SIGKILLed and a new worker is started: the same run resumes after the last committed batch and
completes. Every due key is then refilled exactly once, with exactly one audit log and two
targets, counted with SQL.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from typing import Any
from uuid import UUID

import pytest
import sqlalchemy as sa

from tasks.db.engine import engine_for
from tests.support.key_refill_seed import KeySeed
from tests.support.waits import run_pid, wait_for
from worker import client as worker_client

pytestmark = [pytest.mark.slow, pytest.mark.mysql]

KEYS = 200_000
FULL_EVERY = 10  # every 10th key is full: 180,000 due
DATE = "2025-07-09"


def _counts(url: str, workspaces: list[str]) -> dict[str, Any]:
    """Audit rows and keys of the seed's workspaces, counted by the database."""
    bound = sa.bindparam("workspaces", workspaces, expanding=True)
    queries = {
        "audit_logs": "SELECT COUNT(*) FROM audit_log WHERE workspace_id IN :workspaces",
        "audit_log_ids": "SELECT COUNT(DISTINCT id) FROM audit_log "
        "WHERE workspace_id IN :workspaces",
        "key_targets": "SELECT COUNT(*) FROM audit_log_target "
        "WHERE workspace_id IN :workspaces AND type = 'key'",
        "keys_audited_twice": "SELECT COUNT(*) FROM (SELECT id FROM audit_log_target "
        "WHERE workspace_id IN :workspaces AND type = 'key' GROUP BY id HAVING COUNT(*) > 1) t",
        "workspace_targets": "SELECT COUNT(*) FROM audit_log_target "
        "WHERE workspace_id IN :workspaces AND type = 'workspace'",
        "refilled_keys": "SELECT COUNT(*) FROM `keys` "
        "WHERE workspace_id IN :workspaces AND last_refill_at IS NOT NULL",
        "refilled_full_keys": "SELECT COUNT(*) FROM `keys` WHERE workspace_id IN :workspaces "
        "AND last_refill_at IS NOT NULL "
        "AND CAST(SUBSTRING_INDEX(id, '_', -1) AS UNSIGNED) % 10 = 0",
        "not_full": "SELECT COUNT(*) FROM `keys` "
        "WHERE workspace_id IN :workspaces AND remaining_requests <> refill_amount",
    }
    with engine_for(url).connect() as connection:
        return {
            name: int(connection.execute(sa.text(sql).bindparams(bound)).scalar_one())
            for name, sql in queries.items()
        }


def test_refill_killed_mid_run_resumes_and_refills_every_key_once(
    prefect_api, control_db, worker_factory
) -> None:
    """SIGKILL of the worker and the run's process in the middle of a 200k-key refill: after a
    new worker starts, the run completes; each of the 180,000 due keys is refilled once, with
    one audit log and two targets (no duplicate, none missing), the full keys are untouched,
    and the call reports every key it refilled."""
    seed = KeySeed(control_db)
    seed.dates.add(DATE)
    began = time.monotonic()
    try:
        due = seed.bulk(KEYS, full_every=FULL_EVERY)
        seeded = time.monotonic()
        first = worker_factory()
        run_id = UUID(str(asyncio.run(worker_client.run_key_refill(DATE))))
        kill_at = int(due * random.uniform(0.1, 0.6))
        progress = wait_for(
            lambda: (
                (row := seed.progress(DATE)) is not None and row.keys_refilled >= kill_at and row
            ),
            120,
            f"the refill to pass {kill_at} keys",
            interval=0.05,
        )
        pid = run_pid(prefect_api.state_dir, run_id)
        first.kill()
        os.kill(pid, signal.SIGKILL)
        killed = seed.progress(DATE)
        assert killed.completed_at is None, "killed after the end: the kill proved nothing"
        assert progress.keys_refilled <= killed.keys_refilled < due

        worker_factory()
        result = asyncio.run(worker_client.wait_for_result(run_id, timeout=180))
        finished = time.monotonic()

        assert result == {"keys_refilled": due}
        counts = _counts(control_db, sorted(seed.workspaces))
        assert counts == {
            "audit_logs": due,
            "audit_log_ids": due,
            "key_targets": due,
            "keys_audited_twice": 0,
            "workspace_targets": due,
            "refilled_keys": due,
            "refilled_full_keys": 0,
            "not_full": 0,
        }
        final = seed.progress(DATE)
        assert final.keys_refilled == due and final.completed_at is not None
        print(
            f"key refill crash test: seeded {KEYS} keys in {seeded - began:.1f} s, killed at "
            f"{killed.keys_refilled} of {due}, completed {finished - seeded:.1f} s after the "
            "trigger"
        )
    finally:
        seed.cleanup()
