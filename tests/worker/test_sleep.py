"""Durable sleep (SPEC "Durable waits"): a long wait holds no process and no key, survives a
worker restart, and the same run wakes at its time with its finished steps replayed."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from prefect.client.orchestration import get_client

from tests.support.fixtures import step_log
from tests.support.waits import step_counts, wait_for
from worker import client as worker_client
from worker.kernel.locks import key_lock
from worker.kernel.sleep import SLEEPING

pytestmark = pytest.mark.slow

SLEEP_SECONDS = 90


def _state_name(flow_run_id) -> str | None:
    async def read():
        async with get_client() as client:
            run = await client.read_flow_run(flow_run_id)
        return run.state.name if run.state else None

    return asyncio.run(read())


def test_a_long_durable_sleep_frees_process_and_key_and_wakes_on_time_after_a_restart(
    prefect_api, control_db, worker_factory
):
    """A call holding a key sleeps 90 s: while it waits there is no flow-run process (no run
    record, the run is Scheduled "Sleeping") and the key is free (taken here at once); the
    worker is killed and another started in the middle; the same run wakes within 5 s of its
    time, its step before the sleep replayed (executed once), and finishes."""
    tag = f"sleep-{uuid.uuid4().hex[:8]}"
    key = f"test:sleep:{tag}"
    first = worker_factory()
    run_id = asyncio.run(
        worker_client.trigger("kernel_sleep", {"tag": tag, "key": key, "seconds": SLEEP_SECONDS})
    )
    wait_for(lambda: _state_name(run_id) == SLEEPING, 60, "the run to go to sleep")
    (before,) = [row.started_at for row in step_log(control_db, tag) if row.step == "first"]
    assert not (prefect_api.state_dir / "runs" / f"{run_id}.json").exists(), (
        "a sleeping run must hold no process"
    )

    async def take_the_key() -> None:
        async with key_lock(key):
            pass

    asyncio.run(asyncio.wait_for(take_the_key(), 15))  # free: no wait for a lease to expire

    first.kill()
    worker_factory()
    woke = asyncio.run(worker_client.wait_for_result(run_id, timeout=SLEEP_SECONDS + 90))
    late_by = woke - (before + SLEEP_SECONDS)
    assert -1 <= late_by <= 5, f"woke {late_by:+.1f} s off its time"
    assert step_counts(control_db, tag) == {"first": 1, "after": 1}
