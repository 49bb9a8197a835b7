"""End to end: the worker and the deployment files as an operator uses them, as real processes.

- ``ctrl-worker run`` with no configuration at all brings up everything it needs (embedded
  defaults, SPEC §2.2), ``ctrl-worker trigger`` finds it from the same directory, and SIGTERM
  stops the worker and everything it started.
- ``prefect deploy --all`` from ``prefect.yaml`` to a process work pool, then ``prefect worker
  start``, runs a service call end to end (SPEC §5, scenario 8).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import sqlalchemy as sa

from tests.support.processes import ProcessNotReady, ReadyProcess
from worker import local_server

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CTRL_WORKER = str(BIN / "ctrl-worker")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any UNKEY_* or PREFECT_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UNKEY_", "PREFECT_"))}
    env.update(extra)
    return env


def _live_members(pgid: int) -> list[int]:
    """Pids of the processes of group ``pgid`` that are still running (zombies excluded)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state, ppid, pgrp, ...
        fields = text.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


class EmbeddedWorker:
    """``ctrl-worker run`` in a directory of its own, with nothing configured but its port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = local_server.free_port()
        self.log = directory / "worker.log"
        self._ready = ReadyProcess(
            [CTRL_WORKER, "run"],
            cwd=directory,
            env=clean_env(UNKEY_HTTP_PORT=str(self.port)),
            log_path=self.log,
            name="worker",
        )

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self._ready.process

    def start(self, timeout: float = 120.0) -> None:
        try:
            self._ready.start(
                f"http://127.0.0.1:{self.port}/health/ready", timeout=timeout, poll_seconds=0.25
            )
        except ProcessNotReady as exc:
            raise AssertionError(str(exc)) from None

    def trigger(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``ctrl-worker trigger ...`` from the worker's directory, configured by nothing."""
        return subprocess.run(
            [CTRL_WORKER, "trigger", *args],
            cwd=self.directory,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    def kill_everything(self) -> None:
        """Last resort after a failed test: nothing it started may outlive the test."""
        info = self.directory / ".ctrl" / "prefect-server.json"
        self._ready.kill()  # the worker and whatever is left in its process group
        with contextlib.suppress(OSError, ValueError, KeyError):
            local_server.stop_pid(json.loads(info.read_text())["pid"], timeout=5)

    def tail(self, lines: int = 40) -> str:
        return self._ready.tail(lines)


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def test_embedded_defaults_run_trigger_and_stop(tmp_path: Path) -> None:
    """Embedded defaults: with no UNKEY_* and no PREFECT_API_URL, `ctrl-worker run` starts its
    own Prefect server and SQLite DB under ./.ctrl and becomes ready; `ctrl-worker trigger`
    run from the same directory finds them with no configuration and prints the result
    (exit 0), bad usage exits 2, a failing call exits 1 with its error on stderr.
    Stopping the worker stops what it started: SIGTERM exits 0 and the local Prefect
    server is gone."""
    worker = EmbeddedWorker(tmp_path)
    try:
        worker.start()
        info = json.loads((tmp_path / ".ctrl" / "prefect-server.json").read_text())
        server_pid = int(info["pid"])
        assert (tmp_path / ".ctrl" / "ctrl.db").exists()

        for expected in ("1", "2"):
            result = worker.trigger("next_version", "--param", "region=local.dev", "--wait")
            assert result.returncode == 0, result.stderr + worker.tail()
            assert _last_line(result.stdout) == expected, result.stdout

        # The Python client, run from the same directory, finds the server with no config.
        script = (
            "import asyncio\n"
            "from worker.client import next_version\n"
            "print(asyncio.run(next_version('local.dev', wait=True)))\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script],
            cwd=tmp_path,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert _last_line(result.stdout) == "3", result.stdout

        for bad_usage in (["nope"], ["next_version", "--param", "no-equals-sign"]):
            result = worker.trigger(*bad_usage)
            assert result.returncode == 2, result.stdout + result.stderr
            assert result.stderr.strip(), "bad usage must say what is wrong"

        result = worker.trigger("next_version", "--param", "region=", "--wait")
        assert result.returncode == 1, result.stdout + result.stderr
        assert "region" in result.stderr, result.stderr
        assert not result.stdout.strip(), result.stdout

        assert worker.process is not None
        worker.process.send_signal(signal.SIGTERM)
        try:
            code = worker.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker still running 60 s after SIGTERM:\n{worker.tail()}")
        assert code == 0, worker.tail()
        # The server's process group and the worker's own (flow-run processes) empty out.
        groups = (server_pid, worker.process.pid)
        deadline = time.monotonic() + 15
        while any(_live_members(g) for g in groups) and time.monotonic() < deadline:
            time.sleep(0.2)
        leftovers = {pid: _cmdline(pid) for g in groups for pid in _live_members(g)}
        assert not leftovers, f"processes outlived the worker: {leftovers}"
        assert not (tmp_path / ".ctrl" / "prefect-server.json").exists()
    finally:
        worker.kill_everything()


# -- prefect.yaml on a process work pool --------------------------------------------------------


@pytest.fixture
def pool_server(tmp_path: Path) -> Iterator[local_server.LocalServer]:
    """A Prefect server of this test only: deploying to the session's server would repoint
    its deployments at the work pool."""
    state = tmp_path / "state"
    server = local_server.start(state)
    try:
        yield server
    finally:
        local_server.stop(state, server)


def _prefect(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _read_final_state(api_url: str, results: Path, flow_run_id: UUID) -> tuple[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        temporary_settings,
    )

    async def read() -> tuple[str, Any]:
        async with get_client() as client:
            state = (await client.read_flow_run(flow_run_id)).state
            assert state is not None
            value = await state.aresult() if state.is_completed() else state.message
            return state.name or str(state.type), value

    with temporary_settings(
        updates={PREFECT_API_URL: api_url, PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(results)}
    ):
        return asyncio.run(read())


@pytest.mark.mysql
def test_prefect_yaml_deploys_to_a_process_work_pool(
    tmp_path: Path, pool_server: local_server.LocalServer, empty_mysql_url: str
) -> None:
    """`prefect deploy --all` from prefect.yaml to a process work pool and `prefect worker
    start` run a service call end to end: the pull step enters the code directory named by
    CTRL_WORKER_DIR on the worker, the flow completes with its result, and the version is
    in MariaDB."""
    from tasks.db.engine import dispose_engines
    from tasks.db.schema import init_schema, region_versions

    init_schema(empty_mysql_url)
    dispose_engines()
    state = tmp_path / "state"
    env = clean_env(
        PREFECT_API_URL=pool_server.api_url,
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(state / "results"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        UNKEY_DATABASE_PRIMARY=empty_mysql_url,
        UNKEY_STATE_DIR=str(state),
    )

    _prefect(["work-pool", "create", "ctrl", "--type", "process"], env, cwd=REPO)
    # Deployed without CTRL_WORKER_DIR: the placeholder is resolved on the worker, at run time.
    _prefect(["--no-prompt", "deploy", "--all"], env, cwd=REPO)
    out = _prefect(
        ["deployment", "run", "next_version/ctrl", "--param", "region=pool.test"], env, cwd=REPO
    )
    match = re.search(r"UUID: ([0-9a-f-]{36})", out)
    assert match, out
    flow_run_id = UUID(match.group(1))

    # Started elsewhere than the code: only the pull step brings the run into the repository.
    worker_out = _prefect(
        ["worker", "start", "--pool", "ctrl", "--run-once"],
        {**env, "CTRL_WORKER_DIR": str(REPO)},
        cwd=tmp_path,
        timeout=180,
    )

    name, value = _read_final_state(pool_server.api_url, state / "results", flow_run_id)
    assert (name, value) == ("Completed", 1), worker_out
    engine = sa.create_engine(empty_mysql_url)
    try:
        with engine.connect() as connection:
            version = connection.execute(
                sa.select(region_versions.c.version).where(region_versions.c.region == "pool.test")
            ).scalar_one()
    finally:
        engine.dispose()
    assert version == 1
