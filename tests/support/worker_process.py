"""The worker as a real subprocess (its own process group), for crash tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.processes import ReadyProcess
from worker.local_server import free_port

REPO = Path(__file__).resolve().parents[2]


class WorkerProcess:
    """``python -m tests.support.worker_main`` against the session's Prefect API and DB."""

    def __init__(self, api_url: str, database_url: str, state_dir: Path, log: Path, **env: str):
        self.port = free_port()
        self.log_path = log
        self.env = {
            **os.environ,
            "PREFECT_API_URL": api_url,
            "UNKEY_DATABASE_PRIMARY": database_url,
            "UNKEY_STATE_DIR": str(state_dir),
            "UNKEY_HTTP_PORT": str(self.port),
            "UNKEY_RECONCILE_INTERVAL_SECONDS": "1",
            "UNKEY_INSTANCE_ID": f"test-{self.port}",
            "PYTHONPATH": str(REPO),
            **env,
        }
        self._ready = ReadyProcess(
            [sys.executable, "-m", "tests.support.worker_main"],
            cwd=REPO,
            env=self.env,
            log_path=log,
            name="worker",
        )

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The worker's ``Popen`` once started."""
        return self._ready.process

    def start(self, timeout: float = 90.0) -> WorkerProcess:
        """Start it and wait for ``/health/ready`` = 200.

        Raises:
            tests.support.processes.ProcessNotReady: it exited or was not ready in time.
        """
        self._ready.start(f"http://127.0.0.1:{self.port}/health/ready", timeout=timeout)
        return self

    def kill(self) -> None:
        """SIGKILL the whole worker: the serve process and every flow-run process it started."""
        self._ready.kill()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        return self._ready.stop(timeout)

    def tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the worker's log."""
        return self._ready.tail(lines)
