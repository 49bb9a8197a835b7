"""Crash tests: the worker and lock holders are real subprocesses, killed with SIGKILL.

They protect the guarantees Restate gives and Prefect does not: a run killed mid-way is
resumed by itself once a worker is up, without repeating finished steps, and a key held by a
dead process is freed (at once by a worker on the same host, else within the lease).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client

from tests.support.fixtures import step_log
from tests.support.kernel_flows import kernel_hold_key
from tests.support.waits import flow_run, state_names, step_counts, wait_for
from tests.support.worker_process import REPO
from worker import client as worker_client

pytestmark = pytest.mark.slow


def _kill_run_processes(state_dir: Path) -> None:
    """SIGKILL every flow-run process recorded under the state dir (a dead machine)."""
    for path in (state_dir / "runs").glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            os.kill(json.loads(path.read_text())["pid"], signal.SIGKILL)


def test_killed_worker_resumes_run_without_repeating_finished_steps(
    prefect_api, control_db, worker_factory
):
    """SIGKILL of the whole worker while a step sleeps: after a restart the same flow run
    completes by itself; the step finished before the kill ran once, the interrupted one
    again, the last one once."""
    tag = f"kill-{uuid.uuid4().hex[:8]}"
    first = worker_factory()
    run_id = asyncio.run(
        worker_client.trigger(
            "kernel_three_steps", {"tag": tag, "sleep_seconds": 20}, idempotency_key=f"crash-{tag}"
        )
    )
    wait_for(lambda: "second" in step_counts(control_db, tag), 60, "the second step to start")
    first.kill()
    _kill_run_processes(prefect_api.state_dir)
    assert flow_run(run_id).state.is_running(), "a killed run is left Running by Prefect"

    worker_factory()
    result = asyncio.run(worker_client.wait_for_result(run_id, timeout=150))
    assert result == ["first-done", "second-done", "third-done"]
    assert step_counts(control_db, tag) == {"first": 1, "second": 2, "third": 1}
    assert flow_run(run_id).run_count == 2


def test_failed_call_rerun_with_same_idempotency_key_through_the_client(
    control_db, worker_factory, tmp_path
):
    """A served call whose third step failed, called again with its idempotency key, runs as
    the same flow run again: only the third step executes a second time."""
    tag = f"rerun-{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "fail-once"
    marker.touch()
    worker_factory()
    params = {"tag": tag, "fail_marker": str(marker)}
    with pytest.raises(worker_client.FlowRunFailed, match="fails once"):
        asyncio.run(
            worker_client.trigger("kernel_three_steps", params, idempotency_key=tag, wait=True)
        )
    result = asyncio.run(
        worker_client.trigger("kernel_three_steps", params, idempotency_key=tag, wait=True)
    )
    assert result == ["first-done", "second-done", "third-done"]
    assert step_counts(control_db, tag) == {"first": 1, "second": 1, "third": 2}


def test_key_of_a_killed_holder_is_free_within_the_lease(prefect_api, control_db, tmp_path):
    """The holder of a key is SIGKILLed with no worker around: a waiting call on the same key
    runs within 90 s (the 60 s lease plus the server's repossessor pass)."""
    tag = f"holder-{uuid.uuid4().hex[:8]}"
    key = f"test:holder:{tag}"
    script = textwrap.dedent(
        f"""
        import asyncio
        from worker.settings import use_settings
        from worker.settings import Settings
        from tests.support.kernel_flows import kernel_hold_key
        use_settings(Settings(_env_file=None, database_primary={control_db!r}))
        asyncio.run(kernel_hold_key(tag={tag!r}, key={key!r}, hold_seconds=600))
        """
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=(tmp_path / "holder.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(
            lambda: "acquired" in step_counts(control_db, tag), 60, "the holder to take the key"
        )
        holder.kill()
        holder.wait()
        killed_at = time.time()
        asyncio.run(kernel_hold_key(tag=tag, key=key, hold_seconds=0.1))
    finally:
        holder.kill()
    acquired = [row.started_at for row in step_log(control_db, tag) if row.step == "acquired"]
    assert len(acquired) == 2
    waited = acquired[1] - killed_at
    assert waited <= 90, f"the key stayed locked {waited:.0f} s after its holder died"


def test_worker_frees_the_key_of_a_dead_local_run_at_once(prefect_api, control_db, worker_factory):
    """A served run holding a key is SIGKILLed (its process only): the worker on that host
    sees the dead process, releases its lease at once and resumes the run, so a waiting
    call gets the key long before the lease would expire."""
    tag = f"deadrun-{uuid.uuid4().hex[:8]}"
    key = f"test:deadrun:{tag}"
    worker_factory()
    run_id = asyncio.run(
        worker_client.trigger("kernel_hold_key", {"tag": tag, "key": key, "hold_seconds": 5})
    )
    wait_for(lambda: "acquired" in step_counts(control_db, tag), 60, "the run to take the key")
    record = prefect_api.state_dir / "runs" / f"{run_id}.json"
    os.kill(json.loads(record.read_text())["pid"], signal.SIGKILL)
    killed_at = time.time()
    asyncio.run(kernel_hold_key(tag=tag, key=key, hold_seconds=0.1))
    acquired = sorted(row.started_at for row in step_log(control_db, tag) if row.step == "acquired")
    assert acquired[1] - killed_at < 20, "the key waited for the lease instead of being released"
    # The killed run itself is resumed and completes (it holds the key once more).
    asyncio.run(worker_client.wait_for_result(run_id, timeout=120))
    run = flow_run(run_id)
    assert run.state.is_completed() and run.run_count == 2


def test_a_run_whose_host_vanished_does_not_stay_running(prefect_api, control_db, worker_factory):
    """A worker's host dies with a call in flight (no local record is left to read): the
    reconciler of a worker elsewhere sees no heartbeat for 90 s, marks the run Crashed and
    resumes it."""
    tag = f"vanished-{uuid.uuid4().hex[:8]}"
    first = worker_factory()
    run_id = asyncio.run(
        worker_client.trigger("kernel_three_steps", {"tag": tag, "sleep_seconds": 600})
    )
    wait_for(lambda: "second" in step_counts(control_db, tag), 60, "the second step to start")
    first.kill()
    _kill_run_processes(prefect_api.state_dir)
    (prefect_api.state_dir / "runs" / f"{run_id}.json").unlink()  # the host's disk is gone too
    worker_factory()
    wait_for(
        lambda: step_counts(control_db, tag)["second"] == 2,
        200,
        "another worker to find the silent run and resume it",
        1,
    )
    assert "Crashed" in state_names(run_id)
    _cancel(run_id)


def _cancel(flow_run_id: UUID) -> None:
    """Cancel a run left sleeping, so that no later worker of the session resumes it."""
    from prefect.states import Cancelled

    async def cancel():
        async with get_client() as client:
            await client.set_flow_run_state(flow_run_id, Cancelled(message="test over"), force=True)

    asyncio.run(cancel())
