"""Local run records: which flow run executes in which process on this host, holding which leases.

Every service call writes ``<state dir>/runs/<flow run id>.json`` when it starts and removes it
when it ends. A record whose process is gone (or whose pid now belongs to another process:
the record keeps the process start time) is the trace of a run killed mid-way. The worker's
reconciler (``worker.resume``) reads these to resume killed runs at once, and to release the
keys they held, instead of waiting for Prefect's heartbeat timeout and the lease expiry.

Records are tiny and written with an atomic rename; a torn or unreadable record is ignored.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from uuid import UUID

from prefect.context import FlowRunContext

__all__ = [
    "RunRecord",
    "add_lease",
    "delete_record",
    "list_records",
    "pid_running",
    "process_alive",
    "records_dir",
    "remove_lease",
    "run_record",
]


@dataclass
class RunRecord:
    flow_run_id: str
    pid: int
    process_start: str
    host: str
    started_at: float
    leases: list[str] = field(default_factory=list)


def records_dir() -> Path:
    """``<state dir>/runs`` (the worker exports ``UNKEY_STATE_DIR`` as an absolute path)."""
    return Path(os.environ.get("UNKEY_STATE_DIR", ".ctrl")).expanduser().resolve() / "runs"


def _stat_fields(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (state is [0]); [] if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat.rsplit(")", 1)[1].split()


def _process_start(pid: int) -> str:
    # Field 22 of /proc/<pid>/stat: start time in clock ticks since boot. With the pid it
    # identifies a process uniquely, so a reused pid is never mistaken for the dead run.
    fields = _stat_fields(pid)
    return fields[19] if len(fields) > 19 else ""


def pid_running(pid: int, process_start: str = "") -> bool:
    """True while ``pid`` runs (a zombie is dead: an orphan may never be reaped here) and,
    when ``process_start`` is given, is still the process that started then."""
    fields = _stat_fields(pid)
    if not fields or fields[0] in ("Z", "X"):
        return False
    return not process_start or len(fields) <= 19 or fields[19] == process_start


def process_alive(record: RunRecord) -> bool:
    """True while the process that wrote ``record`` is still running."""
    if record.host != socket.gethostname():
        return True  # not ours to judge: the reconciler's heartbeat check covers other hosts
    return pid_running(record.pid, record.process_start)


def _path(flow_run_id: str) -> Path:
    return records_dir() / f"{flow_run_id}.json"


def _write(record: RunRecord) -> None:
    path = _path(record.flow_run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(record)))
    tmp.replace(path)


def _read(path: Path) -> RunRecord | None:
    try:
        return RunRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _current_flow_run_id() -> str | None:
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return None
    return str(ctx.flow_run.id)


@contextmanager
def run_record() -> Iterator[None]:
    """Keep this process's record of the current flow run for the duration of the block."""
    flow_run_id = _current_flow_run_id()
    if flow_run_id is None:
        yield
        return
    pid = os.getpid()
    _write(
        RunRecord(
            flow_run_id=flow_run_id,
            pid=pid,
            process_start=_process_start(pid),
            host=socket.gethostname(),
            started_at=time.time(),
        )
    )
    try:
        yield
    finally:
        delete_record(flow_run_id)


def _update_leases(lease_id: UUID, add: bool) -> None:
    flow_run_id = _current_flow_run_id()
    if flow_run_id is None:
        return
    record = _read(_path(flow_run_id))
    if record is None:
        return
    if add:
        record.leases.append(str(lease_id))
    elif str(lease_id) in record.leases:
        record.leases.remove(str(lease_id))
    _write(record)


def add_lease(lease_id: UUID) -> None:
    """Note that the current run holds ``lease_id``."""
    _update_leases(lease_id, add=True)


def remove_lease(lease_id: UUID) -> None:
    """Note that the current run released ``lease_id``."""
    _update_leases(lease_id, add=False)


def list_records() -> list[RunRecord]:
    """Every readable record on this host."""
    directory = records_dir()
    if not directory.is_dir():
        return []
    found = []
    for path in directory.glob("*.json"):
        record = _read(path)
        if record is not None:
            found.append(record)
    return found


def delete_record(flow_run_id: str) -> None:
    """Forget a run's record (it ended, or the reconciler dealt with it)."""
    _path(flow_run_id).unlink(missing_ok=True)
