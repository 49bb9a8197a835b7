"""Local run records: a dead process, or a reused pid, is recognised as dead."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from worker.kernel.run_records import RunRecord, _process_start, process_alive


def _record(pid: int, start: str, host: str | None = None) -> RunRecord:
    return RunRecord("r", pid, start, host or socket.gethostname(), 0.0)


def test_own_process_is_alive():
    """The process that wrote a record is alive while it runs."""
    assert process_alive(_record(os.getpid(), _process_start(os.getpid())))


def test_exited_process_is_dead():
    """A record whose process exited is dead."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    start = _process_start(child.pid)
    child.wait()
    assert not process_alive(_record(child.pid, start))


def test_reused_pid_is_dead():
    """A pid now used by another process (other start time) does not keep a run alive."""
    assert not process_alive(_record(os.getpid(), "1"))


def test_records_of_other_hosts_are_not_judged():
    """Another host's record is not judged here (the reconciler's heartbeat check covers it)."""
    assert process_alive(_record(999999, "1", host="some-other-host"))
