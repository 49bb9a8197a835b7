"""A fork server: one pre-imported process that forks a fresh child for every flow run.

Why: a spawned interpreter per run costs ~1.2 s of imports and ~2 s of CPU
(../shared/reference/fast-dispatch.md). The fork server imports Prefect and every flow module
once, freezes the garbage collector's view of that heap (so children share it copy-on-write)
and then only forks. One OS process per run stays, so a crash or SIGKILL of one run never
touches another.

The fork server must stay **import-only**: it never starts a thread, an event loop or a client
(forking a process that has them copies locks held by threads that do not exist in the child).
It is a plain ``python -m worker.dispatch.forkserver`` child of the worker, talking over one
``SOCK_SEQPACKET`` socket pair: a request is a JSON payload plus one file descriptor (the write
end of the run's status pipe); the answer is the child's pid.

Exit status without trusting the fork server (the pitfall of the stdlib forkserver, whose death
makes live children look dead): the worker tracks each child by a pidfd, and the child itself
writes its exit code into its status pipe just before it exits. A child that dies without
writing (SIGKILL, OOM) is reported as killed. The fork server can die and be re-warmed while
its children keep running and are still tracked.

Children run in their own session (``setsid``), so cancelling a run kills its whole process
group (builders, subprocesses) and a Ctrl-C meant for the worker never reaches them.
"""

from __future__ import annotations

import array
import contextlib
import gc
import importlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Child", "ForkServer", "ForkServerDied"]

log = logging.getLogger("ctrl.worker.dispatch")

PRELOAD_ENV = "CTRL_FORKSERVER_PRELOAD"
_MAX_MESSAGE = 4 * 1024 * 1024
_READY = b"ready"


class ForkServerDied(RuntimeError):
    """The fork server exited before or while answering a request."""


@dataclass
class Child:
    """One forked flow-run process, as the worker tracks it."""

    pid: int
    pidfd: int | None  # None when it had already exited before we could open it
    status_fd: int  # read end of the status pipe

    def exit_code(self) -> int:
        """The code the child reported, or -SIGKILL when it died without reporting.

        Call only once the child has exited (its pidfd is readable, or its status pipe hit
        end-of-file); closes the descriptors.
        """
        data = b""
        with contextlib.suppress(BlockingIOError, OSError):
            while chunk := os.read(self.status_fd, 64):
                data += chunk
        self.close()
        text = data.decode(errors="replace").strip()
        try:
            return int(text.splitlines()[-1])
        except (ValueError, IndexError):
            return -signal.SIGKILL

    def alive(self) -> bool:
        """True while the process exists (a zombie counts as gone)."""
        from worker.kernel.run_records import pid_running

        return self.pidfd is not None and pid_running(self.pid)

    def kill_group(self) -> None:
        """SIGKILL the child's process group (it is a session leader), then the child."""
        if self.pidfd is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.alive():
                os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def close(self) -> None:
        for fd in (self.pidfd, self.status_fd):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.pidfd = None
        self.status_fd = -1


class ForkServer:
    """The worker's handle on its fork server: start, spawn children, restart when it died."""

    def __init__(self, preload: Sequence[str]) -> None:
        self.preload = list(preload)
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._socket: socket.socket | None = None
        self.warm_env: dict[str, str] = {}
        self.starts = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> None:
        """Start (or restart) the fork server and wait until every module is imported.

        Raises:
            ForkServerDied: it exited or did not get ready within ``timeout`` seconds.
        """
        with self._lock:
            self._start_locked(timeout)

    def _start_locked(self, timeout: float) -> None:
        self._stop_locked()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**os.environ, PRELOAD_ENV: ",".join(self.preload)}
        # A flow run's INFO lines go to the UI (the API log handler); printing each one on
        # the worker's console through rich costs ~15 ms a line in every child.
        env.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
        started = time.monotonic()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "worker.dispatch.forkserver", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env=env,
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        ours.settimeout(timeout)
        try:
            message = ours.recv(64)
        except TimeoutError:
            self._process.kill()
            raise ForkServerDied(f"the fork server did not get ready in {timeout:.0f} s") from None
        if message != _READY:
            code = self._process.wait()
            raise ForkServerDied(f"the fork server exited with {code} while importing")
        ours.settimeout(None)
        self._socket = ours
        self.warm_env = dict(os.environ)
        self.starts += 1
        log.info(
            "fork server %d ready in %.2f s (%d modules preloaded)",
            self._process.pid,
            time.monotonic() - started,
            len(self.preload),
        )

    def stop(self) -> None:
        """Stop the fork server (its children keep running)."""
        with self._lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        if self._socket is not None:
            self._socket.close()  # the server exits when its end reads end-of-file
            self._socket = None
        if self._process is not None:
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def alive(self) -> bool:
        """True while the fork server process runs."""
        return self._process is not None and self._process.poll() is None

    # -- children ------------------------------------------------------------------------------

    def env_diff(
        self, env: dict[str, str | None], same: dict[str, str] | None = None
    ) -> dict[str, str]:
        """The entries of a run's environment that differ from the fork server's.

        Args:
            env: the run's whole environment.
            same: values known to be in effect in the fork server already, though spelled
                differently in its environment (the worker's Prefect settings as variables).
        """
        same = same or {}
        return {
            key: value
            for key, value in env.items()
            if value is not None and self.warm_env.get(key) != value and same.get(key) != value
        }

    def spawn(self, payload: dict[str, Any]) -> Child:
        """Fork a child running ``worker.dispatch.child.run_child(payload, status_fd)``.

        A dead fork server is restarted first (that call then pays the warm-up).

        Raises:
            ForkServerDied: the fork server could not be (re)started or died mid-request.
        """
        data = json.dumps(payload).encode()
        if len(data) > _MAX_MESSAGE:
            raise ValueError(f"run payload of {len(data)} bytes is too large to hand over")
        with self._lock:
            if not self.alive() or self._socket is None:
                log.warning("the fork server is gone: re-warming it before this run")
                self._start_locked(120.0)
            assert self._socket is not None
            status_r, status_w = os.pipe()
            try:
                self._socket.sendmsg(
                    [data],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [status_w]))],
                )
                answer = self._socket.recv(256)
            except OSError as exc:
                os.close(status_r)
                raise ForkServerDied(f"the fork server died while forking: {exc}") from exc
            finally:
                os.close(status_w)
        if not answer:
            os.close(status_r)
            raise ForkServerDied("the fork server died while forking")
        reply = json.loads(answer)
        if "error" in reply:
            os.close(status_r)
            raise ForkServerDied(f"the fork server could not fork: {reply['error']}")
        pid = int(reply["pid"])
        os.set_blocking(status_r, False)
        try:
            pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            pidfd = None  # it already exited: its status pipe holds its code
        return Child(pid=pid, pidfd=pidfd, status_fd=status_r)


# -- the fork server process -------------------------------------------------------------------


def _serve(control: socket.socket) -> None:
    # Children are reaped by the kernel: nobody in this process waits for them, and the
    # worker learns of their end through its pidfd and their status pipe.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the worker to handle
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(control, _MAX_MESSAGE, 1)
        except OSError:
            return
        if not data:
            return  # the worker closed its end (stopped or died)
        status_fd = fds[0] if fds else -1
        try:
            payload = json.loads(data)
            pid = os.fork()
        except Exception as exc:
            if status_fd >= 0:
                os.close(status_fd)
            control.send(json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
            continue
        if pid == 0:
            control.close()
            _child(payload, status_fd)  # never returns
        os.close(status_fd)
        control.send(json.dumps({"pid": pid}).encode())


def _child(payload: dict[str, Any], status_fd: int) -> None:
    os.setsid()
    for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    code = 70  # EX_SOFTWARE: the child runner itself failed
    try:
        from worker.dispatch.child import run_child

        code = run_child(payload)
    finally:
        with contextlib.suppress(OSError):
            os.write(status_fd, f"{code}\n".encode())
        os._exit(code)


def main(argv: list[str]) -> None:
    """Entry point of the fork server process: import, report ready, fork on request."""
    control = socket.socket(fileno=int(argv[1]))
    for name in filter(None, os.environ.get(PRELOAD_ENV, "").split(",")):
        importlib.import_module(name)
    from worker.dispatch.child import warm_up

    warm_up()
    # Everything imported so far is shared with every child: keep the collector from
    # touching (and so copying) those pages in each child.
    gc.collect()
    gc.freeze()
    control.send(_READY)
    _serve(control)


if __name__ == "__main__":
    main(sys.argv)
