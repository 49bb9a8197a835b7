"""The worker as a real subprocess (its own process group), for crash tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

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
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> WorkerProcess:
        """Start it and wait for ``/health/ready`` = 200."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.support.worker_main"],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}: {self.tail()}")
            try:
                if (
                    httpx.get(f"http://127.0.0.1:{self.port}/health/ready", timeout=1).status_code
                    == 200
                ):
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"worker not ready in {timeout} s: {self.tail()}")

    def kill(self) -> None:
        """SIGKILL the whole worker: the serve process and every flow-run process it started."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        # Flow-run processes left behind (there should be none) must not outlive the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.returncode

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
