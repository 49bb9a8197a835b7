"""Warm dispatch (the ``ctrl-warm`` worker): one forked process per run, crash isolation, a
dead fork server never turning into a double execution, cancellation, give-up attempts.

Every test runs the real worker as a subprocess and kills real processes; executions are
counted in the DB (``kernel_step_log``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.states import Cancelling

from tests.support.fixtures import step_log
from tests.support.waits import flow_run, run_pid, state_names, step_counts, wait_for
from worker import client as worker_client

pytestmark = pytest.mark.slow


def _children_of(pid: int, needle: str) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(fields[1]) == pid and needle in cmdline:
            found.append(int(stat.parent.name))
    return found


def _trigger(flow: str, **params) -> UUID:
    return asyncio.run(worker_client.trigger(flow, params))


def test_sigkill_of_one_forked_run_leaves_its_siblings_running(
    prefect_api, control_db, worker_factory
):
    """Two runs in two forked children: SIGKILL of one child crashes only that run (it is
    resumed); the other completes untouched, each of its steps once."""
    worker_factory()
    victim, sibling = (f"victim-{uuid.uuid4().hex[:6]}", f"sibling-{uuid.uuid4().hex[:6]}")
    victim_id = _trigger("kernel_three_steps", tag=victim, sleep_seconds=6)
    sibling_id = _trigger("kernel_three_steps", tag=sibling, sleep_seconds=6)
    wait_for(lambda: "second" in step_counts(control_db, victim), 60, "the victim's second step")
    wait_for(lambda: "second" in step_counts(control_db, sibling), 60, "the sibling's second step")
    victim_pid = run_pid(prefect_api.state_dir, victim_id)
    assert victim_pid != run_pid(prefect_api.state_dir, sibling_id), "one process per run"
    os.kill(victim_pid, signal.SIGKILL)

    assert asyncio.run(worker_client.wait_for_result(sibling_id, timeout=60))[-1] == "third-done"
    assert step_counts(control_db, sibling) == {"first": 1, "second": 1, "third": 1}
    assert "Crashed" not in state_names(sibling_id)
    # The victim was reported Crashed by the worker and resumed: only its second step again.
    asyncio.run(worker_client.wait_for_result(victim_id, timeout=90))
    assert "Crashed" in state_names(victim_id)
    assert step_counts(control_db, victim) == {"first": 1, "second": 2, "third": 1}


def test_killing_the_fork_server_mid_run_never_executes_a_step_twice(
    prefect_api, control_db, worker_factory
):
    """SIGKILL of the fork server while a run it forked is in a step: the run goes on (its
    process is tracked by pidfd, not through the fork server), completes once, is never
    reported Crashed, and the re-warmed fork server starts the next run."""
    process = worker_factory()
    tag = f"forkserver-{uuid.uuid4().hex[:6]}"
    run_id = _trigger("kernel_three_steps", tag=tag, sleep_seconds=5)
    wait_for(lambda: "second" in step_counts(control_db, tag), 60, "the second step")
    assert process.process is not None
    (forkserver,) = _children_of(process.process.pid, "worker.dispatch.forkserver")
    os.kill(forkserver, signal.SIGKILL)

    assert asyncio.run(worker_client.wait_for_result(run_id, timeout=60))[-1] == "third-done"
    assert step_counts(control_db, tag) == {"first": 1, "second": 1, "third": 1}
    run = flow_run(run_id)
    assert run.run_count == 1 and "Crashed" not in state_names(run_id)
    rewarmed = wait_for(
        lambda: [
            p
            for p in _children_of(process.process.pid, "worker.dispatch.forkserver")
            if p != forkserver
        ],
        60,
        "a new fork server",
    )
    assert rewarmed
    after = f"after-{uuid.uuid4().hex[:6]}"
    result = asyncio.run(worker_client.trigger("kernel_three_steps", {"tag": after}, wait=True))
    assert result[-1] == "third-done"


def test_a_cancelled_run_is_killed_marked_cancelled_and_not_resumed(
    prefect_api, control_db, worker_factory
):
    """Cancelling a running call from the API: its process group is killed, the run ends
    Cancelled (never Crashed, so the reconciler leaves it alone), and it stays cancelled."""
    worker_factory()
    tag = f"cancel-{uuid.uuid4().hex[:6]}"
    run_id = _trigger("kernel_three_steps", tag=tag, sleep_seconds=30)
    wait_for(lambda: "second" in step_counts(control_db, tag), 60, "the second step")
    pid = run_pid(prefect_api.state_dir, run_id)

    async def cancel():
        async with get_client() as client:
            await client.set_flow_run_state(run_id, Cancelling(message="test"), force=True)

    asyncio.run(cancel())
    wait_for(lambda: flow_run(run_id).state.is_cancelled(), 30, "the run to be Cancelled")
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 10, "its process to be gone")
    time.sleep(3)  # two reconciler passes (interval 1 s): it must not be resumed
    assert flow_run(run_id).state.is_cancelled()
    assert "Crashed" not in state_names(run_id)
    assert step_counts(control_db, tag) == {"first": 1, "second": 1}


def _give_ups(url: str, tag: str) -> list[str]:
    return [row.note for row in step_log(url, tag) if row.step == "give_up"]


def test_a_run_killed_past_the_resume_limit_runs_its_give_up_hook(
    prefect_api, control_db, worker_factory
):
    """UNKEY_RESUME_MAX_ATTEMPTS=0 and the call's process is SIGKILLed: the reconciler gives
    up at once, and instead of just failing it the run gets one more attempt that runs only
    its give-up hook (told why) and ends Failed with the reason; the body never runs again."""
    worker_factory(UNKEY_RESUME_MAX_ATTEMPTS="0")
    tag = f"giveup-{uuid.uuid4().hex[:6]}"
    run_id = _trigger("kernel_give_up", tag=tag, sleep_seconds=30)
    wait_for(lambda: "second" in step_counts(control_db, tag), 60, "the body's step")
    os.kill(run_pid(prefect_api.state_dir, run_id), signal.SIGKILL)

    with pytest.raises(worker_client.FlowRunFailed, match="gave up after 1 attempts"):
        asyncio.run(worker_client.wait_for_result(run_id, timeout=90))
    (reason,) = _give_ups(control_db, tag)
    assert "gave up after 1 attempts" in reason
    assert step_counts(control_db, tag)["second"] == 1, "the body must not run again"


def test_a_run_cancelled_while_running_runs_its_give_up_hook(
    prefect_api, control_db, worker_factory
):
    """Cancelling a running call that has a give-up hook: the hook runs (told it was
    cancelled) and the run ends Cancelled."""
    worker_factory()
    tag = f"cancel-hook-{uuid.uuid4().hex[:6]}"
    run_id = _trigger("kernel_give_up", tag=tag, sleep_seconds=30)
    wait_for(lambda: "second" in step_counts(control_db, tag), 60, "the body's step")

    async def cancel():
        async with get_client() as client:
            await client.set_flow_run_state(run_id, Cancelling(message="test"), force=True)

    asyncio.run(cancel())
    wait_for(lambda: _give_ups(control_db, tag), 60, "the give-up hook")
    wait_for(lambda: flow_run(run_id).state.is_cancelled(), 60, "the run to end Cancelled")
    assert _give_ups(control_db, tag) == ["cancelled while running"]
