"""Scale-out (kernel v2): three ``ctrl-worker run`` processes on one PostgreSQL-backed Prefect
server, step records in S3 (moto), each on a state directory of its own (three hosts sharing
only the Prefect API, the control-plane DB and the bucket)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client

from tests.support.fixtures import s3_results_env, step_log
from tests.support.waits import step_counts
from tests.support.worker_process import WorkerProcess
from worker import client as worker_client
from worker.kernel.calls import RESUME_MESSAGE

pytestmark = pytest.mark.slow

WORKER_LABEL = "prefect.worker.name"


@pytest.fixture
def three_hosts(prefect_api, control_db, s3_endpoint, tmp_path):
    env = s3_results_env(s3_endpoint, f"ctrl-scale-{uuid.uuid4().hex[:8]}")
    hosts = [
        WorkerProcess(
            prefect_api.url, control_db, tmp_path / f"host-{name}", tmp_path / f"{name}.log", **env
        )
        for name in "abc"
    ]
    try:
        for host in hosts:
            host.start()
        yield hosts
    finally:
        for host in hosts:
            host.kill()


def _runs(flow_run_ids):
    async def read():
        async with get_client() as client:
            return [await client.read_flow_run(run_id) for run_id in flow_run_ids]

    return asyncio.run(read())


def test_keys_serialize_across_workers_and_calls_spread_over_them(control_db, three_hosts):
    """12 calls on one key, taken by three workers: their critical sections never overlap
    (intervals recorded in the DB), and more than one worker ran them."""
    tag = f"scale-key-{uuid.uuid4().hex[:8]}"
    key = f"test:scale:{tag}"

    async def call_all():
        return await asyncio.gather(
            *(
                worker_client.trigger(
                    "kernel_hold_key", {"tag": tag, "key": key, "hold_seconds": 0.2}
                )
                for _ in range(12)
            )
        )

    run_ids = asyncio.run(call_all())
    for run_id in run_ids:
        asyncio.run(worker_client.wait_for_result(run_id, timeout=120))
    spans = sorted(
        (row.started_at, row.ended_at) for row in step_log(control_db, tag) if row.step == "hold"
    )
    assert len(spans) == 12
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end, f"critical sections overlap across workers: {spans}"
    workers = Counter(run.labels.get(WORKER_LABEL) for run in _runs(run_ids))
    assert len(workers) >= 2, f"one worker took every call: {workers}"


def test_a_call_on_a_killed_worker_is_resumed_once_on_another(control_db, three_hosts):
    """The host running a call dies (worker and flow-run process SIGKILLed): the heartbeat
    heartbeat check of the other workers' reconcilers marks the run Crashed, exactly one of them
    resumes it, and the steps
    finished before the kill replay from S3 (executed once)."""
    tag = f"scale-kill-{uuid.uuid4().hex[:8]}"
    run_id = asyncio.run(
        worker_client.trigger("kernel_three_steps", {"tag": tag, "sleep_seconds": 20})
    )
    deadline = time.monotonic() + 60
    while "second" not in step_counts(control_db, tag):
        assert time.monotonic() < deadline, "the second step did not start"
        time.sleep(0.2)
    (run,) = _runs([run_id])
    owner = next(h for h in three_hosts if f"test-{h.port}" in run.labels.get(WORKER_LABEL, ""))
    record = Path(owner.env["UNKEY_STATE_DIR"]) / "runs" / f"{run_id}.json"
    child = json.loads(record.read_text())["pid"]
    owner.kill()
    os.kill(child, signal.SIGKILL)

    result = asyncio.run(worker_client.wait_for_result(run_id, timeout=240))
    assert result == ["first-done", "second-done", "third-done"]
    assert step_counts(control_db, tag) == {
        "first": 1,
        "second": 2,
        "third": 1,
    }

    async def states():
        async with get_client() as client:
            return await client.read_flow_run_states(run_id)

    assert sum(1 for s in asyncio.run(states()) if s.message == RESUME_MESSAGE) == 1
    (resumed,) = _runs([run_id])
    assert resumed.run_count == 2
    assert f"test-{owner.port}" not in resumed.labels.get(WORKER_LABEL, "")
