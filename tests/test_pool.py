"""One run mode (kernel v2): ``prefect.yaml`` + the ``ctrl`` work pool is the registration, and
``ctrl-worker run`` is a (warm) worker of that pool next to stock Prefect workers.

- ``prefect --no-prompt deploy --all`` to the pool, then ``ctrl-worker run``: every flow of
  the catalogue runs, each in a warm child (label ``prefect.worker.type`` = ``ctrl-warm``).
- A stock ``prefect worker start --pool ctrl`` runs a call and is killed with it: the
  ``ctrl-worker run`` on that host resumes the crashed run, once, and finishes it warm.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.support.processes import ReadyProcess
from tests.support.waits import row_lock_waits
from tests.test_end_to_end import REPO, _prefect, clean_env
from worker import local_server

pytestmark = [pytest.mark.slow, pytest.mark.mysql]

CTRL_WORKER = str(Path(sys.executable).parent / "ctrl-worker")


@pytest.fixture
def deployed(tmp_path: Path, empty_mysql_url: str) -> Iterator[dict[str, str]]:
    """A Prefect server of its own with prefect.yaml deployed to the `ctrl` pool; yields the
    environment a worker on this host runs with (API, DB, state dir, code dir)."""
    from tasks.db.engine import dispose_engines
    from tasks.db.schema import init_schema

    init_schema(empty_mysql_url)
    dispose_engines()
    state = tmp_path / "state"
    server = local_server.start(tmp_path / "server")
    env = clean_env(
        PREFECT_API_URL=server.api_url,
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(state / "results"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        UNKEY_DATABASE_PRIMARY=empty_mysql_url,
        UNKEY_STATE_DIR=str(state),
        UNKEY_RECONCILE_INTERVAL_SECONDS="1",
        CTRL_WORKER_DIR=str(REPO),
    )
    try:
        _prefect(["work-pool", "create", "ctrl", "--type", "process"], env, cwd=REPO)
        _prefect(["--no-prompt", "deploy", "--all"], env, cwd=REPO)
        yield env
    finally:
        local_server.stop(tmp_path / "server", server)


def _ctrl_worker(env: dict[str, str], log: Path) -> ReadyProcess:
    port = local_server.free_port()
    worker = ReadyProcess(
        [CTRL_WORKER, "run"],
        cwd=log.parent,
        env={**env, "UNKEY_HTTP_PORT": str(port)},
        log_path=log,
        name="ctrl-worker",
    )
    worker.start(f"http://127.0.0.1:{port}/health/ready", timeout=120)
    return worker


def _client(env: dict[str, str], script: str) -> Any:
    """Run ``script`` (async code using ``worker.client`` as ``client``) against the API."""
    program = (
        "import asyncio, json\n"
        "from worker import client\n"
        "async def main():\n"
        + "".join(f"    {line}\n" for line in script.strip().splitlines())
        + "print(json.dumps(asyncio.run(main()), default=str))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


CALLS = {
    "next_version": {"region": "pool.test"},
    "get_version": {"region": "pool.test"},
    "schedule_desired_state_change": {"deployment_id": "d_nowhere", "state": "standby"},
    "change_desired_state": {"deployment_id": "d_nowhere", "nonce": "n1", "state": "standby"},
    "clear_scheduled_state_changes": {"deployment_id": "d_nowhere"},
    "assign_frontline_routes": {
        "project_id": "p_nowhere",
        "deployment_id": "d_nowhere",
        "frontline_route_ids": ["r_nowhere"],
    },
    "deploy": {"deployment_id": "d_nowhere", "docker_image": "nginx:1.27"},
    "promote": {"target_deployment_id": "d_nowhere"},
    "rollback": {"source_deployment_id": "d_nowhere", "target_deployment_id": "d_elsewhere"},
    "scale_down_idle_preview_deployments": {},
    "process_challenge": {"workspace_id": "ws_nowhere", "domain": "nowhere.example.test"},
    "renew_expiring_certificates": {"days_before_expiry": -1},
    # The calls below are refused at once by their parameter checks: nothing is written.
    "add_custom_domain": {
        "workspace_id": "ws_nowhere",
        "project_id": "p_nowhere",
        "environment_id": "env_nowhere",
        "domain": "not a domain",
    },
    "verify_domain": {"domain": "*.wildcard.example.test"},
    "retry_verification": {"domain": ""},
    "delete_custom_domain": {"domain": "a" * 254},
    "configure_clickhouse_user": {"workspace_id": ""},
    "run_quota_check": {"billing_period": "2026-13"},
    "run_key_refill": {"date": "2025-02-30"},
}


def test_prefect_deploy_then_ctrl_worker_runs_every_flow_warm(deployed, tmp_path):
    """After `prefect deploy --all`, `ctrl-worker run` runs a call of every deployment of the
    catalogue, each in a warm forked child: every run ends Completed (or Failed with the
    service's own terminal error), none Crashed, all labelled with the ctrl-warm worker."""
    from deployments import CATALOGUE

    assert sorted(CALLS) == sorted(spec.flow_name for spec in CATALOGUE)
    worker = _ctrl_worker(deployed, tmp_path / "worker.log")
    try:
        ended = _client(
            deployed,
            f"""
calls = {CALLS!r}
out = {{}}
async with client.connect() as c:
    for flow, params in calls.items():
        run = await client.submit(flow, params, client=c)
        try:
            await client.wait_for_result(run.id, timeout=120, client=c)
        except client.FlowRunFailed:
            pass
        run = await c.read_flow_run(run.id)
        names = [s.name for s in await c.read_flow_run_states(run.id)]
        out[flow] = [run.state.name, run.labels.get("prefect.worker.type"), names]
return out
""",
        )
    finally:
        worker.stop(60)
    for flow, (state, worker_type, history) in ended.items():
        assert worker_type == "ctrl-warm", (flow, worker_type)
        assert state in ("Completed", "Failed"), (flow, state)
        assert "Crashed" not in history, (flow, history)
    assert ended["next_version"][0] == ended["get_version"][0] == "Completed"
    assert ended["assign_frontline_routes"][0] == "Failed"  # the routes do not exist


def test_a_run_crashed_under_a_stock_worker_is_resumed_by_ctrl_worker(deployed, tmp_path):
    """A stock `prefect worker start --pool ctrl` runs a call (blocked mid-step on a row
    lock) and is SIGKILLed with its flow-run process: the `ctrl-worker run` on that host sees
    the dead process, and the run is resumed exactly once and completes in a warm child."""
    from tasks.db.schema import region_versions

    url = deployed["UNKEY_DATABASE_PRIMARY"]
    region = f"stock-{uuid.uuid4().hex[:6]}"
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(region_versions.insert().values(region=region, version=0, updated_at=0))
    blocker = engine.connect()
    stock = ReadyProcess(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "ctrl"],
        cwd=tmp_path,
        env=deployed,
        log_path=tmp_path / "stock.log",
        name="stock worker",
    )
    ctrl: ReadyProcess | None = None
    try:
        blocker.begin()
        blocker.execute(
            sa.select(region_versions).where(region_versions.c.region == region).with_for_update()
        )
        stock.launch()  # the stock worker has no health endpoint: it polls once started
        run_id = _client(
            deployed,
            f"return str((await client.submit('next_version', {{'region': {region!r}}})).id)",
        )
        deadline = time.monotonic() + 180
        while row_lock_waits(url) == 0:
            assert time.monotonic() < deadline, "the stock worker never ran the call"
            time.sleep(0.2)
        record = Path(deployed["UNKEY_STATE_DIR"]) / "runs" / f"{run_id}.json"
        child = json.loads(record.read_text())["pid"]
        ctrl = _ctrl_worker(deployed, tmp_path / "ctrl.log")
        stock.kill()
        os.kill(child, signal.SIGKILL)
        blocker.rollback()
        ended = _client(
            deployed,
            f"""
from uuid import UUID
from worker.kernel.calls import RESUME_MESSAGE
async with client.connect() as c:
    value = await client.wait_for_result(UUID({run_id!r}), timeout=120, client=c)
    run = await c.read_flow_run(UUID({run_id!r}))
    states = await c.read_flow_run_states(run.id)
    return [value, run.labels.get("prefect.worker.type"),
            sum(1 for s in states if s.message == RESUME_MESSAGE)]
""",
        )
    finally:
        blocker.close()
        engine.dispose()
        stock.kill()
        if ctrl is not None:
            ctrl.stop(60)
    assert ended == [1, "ctrl-warm", 1]
