"""Start a process in its own process group and wait until it is ready; stop or kill it whole.

The one helper behind the tests' worker processes (``tests.support.worker_process``,
``tests/test_end_to_end.py``) and the benchmarks' served workers (``bench.common``): the
command's output goes to a log file, "ready" means an HTTP URL answers 200 (or, for a server
whose readiness is not a plain GET, a callable returns True), and a failure to get there says
why with the log's tail.

Only the standard library and httpx: importable before Prefect (the benchmarks set Prefect's
environment first).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx

__all__ = ["ProcessNotReady", "ReadyProcess"]


class ProcessNotReady(RuntimeError):
    """The process exited, or its ready URL did not answer 200 in time (message: the log tail)."""


def _answers_200(url: str) -> bool:
    return httpx.get(url, timeout=1.0).status_code == 200


class ReadyProcess:
    """A command run in a new session (its own process group), output appended to a log file.

    Args:
        command: the program and its arguments.
        cwd: the working directory.
        env: the whole environment of the process (not merged with this one's).
        log_path: the file that receives stdout and stderr (appended to).
        name: what to call it in error messages.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        log_path: Path,
        name: str = "process",
    ) -> None:
        self.command = list(command)
        self.cwd = cwd
        self.env = dict(env)
        self.log_path = log_path
        self.name = name
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The process id (also its process group id).

        Raises:
            RuntimeError: it was never started.
        """
        return self._started().pid

    def _started(self) -> subprocess.Popen[bytes]:
        if self.process is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.process

    def launch(self) -> subprocess.Popen[bytes]:
        """Start the process without waiting for anything.

        Returns:
            The ``Popen`` of the started process (also ``self.process``).

        Raises:
            RuntimeError: it was already started.
        """
        if self.process is not None:
            raise RuntimeError(f"{self.name} was already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stopped or killed as a whole
            )
        return self.process

    def start(
        self,
        ready_url: str | None = None,
        timeout: float = 90.0,
        poll_seconds: float = 0.2,
        *,
        ready: Callable[[], bool] | None = None,
    ) -> ReadyProcess:
        """Start the process and wait until ``ready_url`` answers 200 (or ``ready()`` is True).

        Args:
            ready_url: the URL polled with GET (1 s timeout per attempt).
            timeout: seconds to wait for the 200.
            poll_seconds: the pause between attempts.
            ready: instead of ``ready_url``, a check called once per attempt (it should time
                out by itself within about a second); an ``httpx.HTTPError`` counts as False.

        Returns:
            ``self``, ready.

        Raises:
            ProcessNotReady: the process exited first, or the timeout passed (the process group
                is then killed); the message ends with the log's tail.
            RuntimeError: it was already started.
            ValueError: not exactly one of ``ready_url`` and ``ready`` was given.
        """
        if (ready_url is None) == (ready is None):
            raise ValueError("give exactly one of ready_url and ready")
        check = ready if ready is not None else (lambda: _answers_200(str(ready_url)))
        process = self.launch()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self.kill()  # whatever it started and left behind
                raise ProcessNotReady(
                    f"{self.name} exited with {process.returncode}:\n{self.tail()}"
                )
            try:
                if check():
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(poll_seconds)
        self.kill()
        raise ProcessNotReady(f"{self.name} not ready within {timeout:.0f} s:\n{self.tail()}")

    def signal_group(self, signum: int) -> None:
        """Send ``signum`` to every process of its group (nothing if the group is gone)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL its whole process group and reap the process (nothing if never started).

        Args:
            timeout: seconds to wait for the process to be reaped.

        Raises:
            subprocess.TimeoutExpired: it was not gone after ``timeout`` seconds.
        """
        if self.process is None:
            return
        self.signal_group(signal.SIGKILL)
        self.process.wait(timeout=timeout)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM the process, wait for it, then SIGKILL whatever is left in its group.

        Args:
            timeout: seconds to wait after SIGTERM before SIGKILLing the whole group.

        Returns:
            The process's exit code (negative: the signal that ended it).

        Raises:
            RuntimeError: it was never started.
        """
        process = self._started()
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        # Children left behind (there should be none) must not outlive it.
        self.signal_group(signal.SIGKILL)
        return process.wait()

    def tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of its log ("" when there is no log)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
