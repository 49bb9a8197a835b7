"""The worker process: graceful shutdown, metrics, refusing an uninitialised MySQL database."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from tests.support.waits import step_counts, wait_for
from tests.support.worker_process import REPO, WorkerProcess
from worker import client as worker_client
from worker.local_server import free_port

pytestmark = pytest.mark.slow


def test_sigterm_lets_a_running_call_finish(prefect_api, control_db, tmp_path):
    """SIGTERM: /health/ready answers 503 during the drain (the health server stops last), no
    new runs, the running one finishes within the grace period, exit 0."""
    tag = f"grace-{uuid.uuid4().hex[:8]}"
    metrics_port = free_port()
    worker = WorkerProcess(
        prefect_api.url,
        control_db,
        prefect_api.state_dir,
        tmp_path / "w.log",
        UNKEY_PROMETHEUS_PORT=str(metrics_port),
    ).start()
    try:
        run_id = asyncio.run(
            worker_client.trigger("kernel_three_steps", {"tag": tag, "sleep_seconds": 8})
        )
        wait_for(lambda: "second" in step_counts(control_db, tag), 60, "the second step")
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert 'ctrl_flow_runs_started_total{flow="kernel_three_steps"}' in metrics
        assert worker.process is not None
        os.kill(worker.process.pid, signal.SIGTERM)
        # Draining: the health server is the last thing to stop, and says "not ready".
        ready = f"http://127.0.0.1:{worker.port}/health/ready"
        wait_for(lambda: httpx.get(ready, timeout=2).status_code == 503, 10, "ready to be 503")
        assert (
            httpx.get(f"http://127.0.0.1:{worker.port}/health/live", timeout=2).status_code == 200
        )
        assert "second" in step_counts(control_db, tag) and "third" not in step_counts(
            control_db, tag
        )
        assert worker.process.wait(timeout=60) == 0
        assert asyncio.run(worker_client.wait_for_result(run_id, timeout=5)) == [
            "first-done",
            "second-done",
            "third-done",
        ]
        assert step_counts(control_db, tag) == {"first": 1, "second": 1, "third": 1}
    finally:
        worker.kill()


def test_a_call_outliving_the_grace_period_is_resumed_by_the_next_worker(
    prefect_api, control_db, tmp_path
):
    """SIGTERM with a step longer than the grace period: the worker stops anyway; the next
    worker resumes the run and only the interrupted step runs again."""
    tag = f"outlive-{uuid.uuid4().hex[:8]}"
    worker = WorkerProcess(
        prefect_api.url,
        control_db,
        prefect_api.state_dir,
        tmp_path / "w1.log",
        UNKEY_SHUTDOWN_GRACE_SECONDS="1",
    ).start()
    try:
        run_id = asyncio.run(
            worker_client.trigger("kernel_three_steps", {"tag": tag, "sleep_seconds": 15})
        )
        wait_for(lambda: "second" in step_counts(control_db, tag), 60, "the second step")
        started = time.monotonic()
        assert worker.stop(timeout=60) == 0
        assert time.monotonic() - started < 30
    finally:
        worker.kill()
    second = WorkerProcess(
        prefect_api.url, control_db, prefect_api.state_dir, tmp_path / "w2.log"
    ).start()
    try:
        result = asyncio.run(worker_client.wait_for_result(run_id, timeout=120))
        assert result == ["first-done", "second-done", "third-done"]
        assert step_counts(control_db, tag) == {"first": 1, "second": 2, "third": 1}
    finally:
        second.kill()


def test_worker_refuses_a_mysql_database_without_tables(prefect_api, empty_mysql_url, tmp_path):
    """The worker never creates tables in MySQL implicitly: it exits naming `db init`."""
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run"],
        cwd=REPO,
        env={
            "PATH": "/usr/bin:/bin",
            "PREFECT_API_URL": prefect_api.url,
            "UNKEY_DATABASE_PRIMARY": empty_mysql_url,
            "UNKEY_STATE_DIR": str(tmp_path),
            "UNKEY_HTTP_PORT": str(port),
            "PYTHONPATH": str(REPO),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "ctrl-worker db init" in result.stderr + result.stdout
    assert "ctrl:ctrl" not in result.stderr + result.stdout  # the URL's password stays secret
