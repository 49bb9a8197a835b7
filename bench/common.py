"""Shared setup of the benchmarks: a local Prefect server, a fresh MariaDB database, the worker.

Every benchmark's ``main`` enters ``bench_env()`` *before* importing anything that imports
Prefect: Prefect reads its settings (API URL, result storage) once, on first import, so the
environment must already point at the benchmark's own server and state directory.

This module imports nothing from Prefect at import time (only ``worker.local_server`` and
``tests.support.processes``, both Prefect-free by design); whatever needs Prefect is imported
inside the functions.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.processes import ReadyProcess
from worker import local_server

__all__ = [
    "MYSQL_SERVER_URL",
    "REPO",
    "ApiRetries",
    "BenchEnv",
    "CpuSampler",
    "ServedWorker",
    "TimedCall",
    "bench_env",
    "count_api_retries",
    "describe",
    "drain_prefect_workers",
    "load_average",
    "median",
    "p95",
    "percentile",
    "print_result",
    "quiet_prefect_console",
    "retry_status_codes",
    "run_phases",
    "served_process",
    "served_worker",
    "size_arg",
    "timed_call",
    "worker_env",
]

REPO = Path(__file__).resolve().parents[1]
MYSQL_SERVER_URL = os.environ.get(
    "CTRL_BENCH_MYSQL_URL", "mysql+pymysql://ctrl:ctrl@127.0.0.1:3306"
)


@dataclass
class BenchEnv:
    """What a benchmark runs against: its state dir, Prefect server and control-plane DB."""

    state_dir: Path
    server: local_server.LocalServer
    database_url: str  # mysql+pymysql://.../ctrl_bench_<random>?charset=utf8mb4
    database_name: str

    @property
    def api_url(self) -> str:
        """The Prefect API URL of the benchmark's server."""
        return self.server.api_url


# -- numbers ----------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """The median (p50) of ``values``."""
    return float(statistics.median(values))


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` (0..1) percentile of ``values``, nearest rank.

    Raises:
        ValueError: ``values`` is empty.
    """
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def p95(values: Sequence[float]) -> float:
    """The 95th percentile of ``values`` (nearest rank)."""
    return percentile(values, 0.95)


def load_average() -> str:
    """The machine's load average (1, 5, 15 min) and core count, for the benchmark's output."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} cores)"


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_SIGCHLD_BIT = 1 << (17 - 1)  # SigIgn in /proc/<pid>/status: bit n-1 for signal n (SIGCHLD=17)


@dataclass
class _Seen:
    """One process of a sampled tree: its CPU ticks when first and last seen."""

    first_own: int  # utime + stime
    first_reaped: int  # cutime + cstime: the children it has waited for
    last_own: int
    last_reaped: int
    parent: tuple[int, int]  # (pid, start time) of its parent
    gone: bool = False
    waited_for: bool = False  # gone, and its parent (in the tree) waits for its children


def _proc_table() -> dict[int, tuple[int, int, int, int]]:
    """Every process: pid -> (ppid, start time, own ticks, reaped children's ticks)."""
    table: dict[int, tuple[int, int, int, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                text = stat.read()
        except OSError:
            continue
        fields = text[text.rfind(b")") + 2 :].split()
        # After "pid (comm)": state ppid ... utime(12) stime(13) cutime(14) cstime(15) ...
        # starttime(20), counted from field 3 = index 0.
        table[int(name)] = (
            int(fields[1]),
            int(fields[19]),
            int(fields[11]) + int(fields[12]),
            int(fields[13]) + int(fields[14]),
        )
    return table


def _ignores_sigchld(pid: int) -> bool:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) & _SIGCHLD_BIT)
    except (OSError, ValueError):
        pass
    return False


class CpuSampler:
    """CPU seconds spent by process trees (a root and all its descendants), sampled in a thread.

    A child's CPU reaches its parent's "children" times only if the parent waits for it; a
    parent that ignores SIGCHLD (a fork server whose children the kernel reaps) never sees
    it, so summing ``cpu_times()`` with children over the live tree misses every child that
    ended between two samples. Instead every process of the tree is followed from sample to
    sample (every ``interval`` s, by scanning ``/proc``, Linux only): a process that ends
    counts with its CPU when last seen, unless its parent waits for it, in which case the
    parent's children times carry its final CPU. What a child spends after its last sample
    (< ``interval``) is lost when nobody waits for it; processes that start and end between
    two samples count only if their parent waits for them.

    Args:
        groups: name -> the root pids of that group's tree (a pid that does not exist is
            ignored).
        interval: seconds between samples.
    """

    def __init__(self, groups: dict[str, Sequence[int]], interval: float = 0.025) -> None:
        self.groups = {name: [pid for pid in roots if pid > 0] for name, roots in groups.items()}
        self.interval = interval
        self._seen: dict[str, dict[tuple[int, int], _Seen]] = {name: {} for name in groups}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._first = True
        self.samples = 0

    def _sample(self) -> None:
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, *_rest) in table.items():
            children.setdefault(ppid, []).append(pid)
        for name, roots in self.groups.items():
            seen = self._seen[name]
            members: set[tuple[int, int]] = set()
            todo = [pid for pid in roots if pid in table]
            while todo:
                pid = todo.pop()
                ppid, started, own, reaped = table[pid]
                key = (pid, started)
                if key in members:
                    continue
                members.add(key)
                todo += children.get(pid, [])
                record = seen.get(key)
                if record is None:
                    # Seen at the first sample: only what it spends from now on counts. Born
                    # since: all of it counts.
                    base_own, base_reaped = (own, reaped) if self._first else (0, 0)
                    parent = (ppid, table[ppid][1] if ppid in table else 0)
                    record = seen[key] = _Seen(base_own, base_reaped, own, reaped, parent)
                record.last_own, record.last_reaped = own, reaped
            for key, record in seen.items():
                if record.gone or key in members:
                    continue
                record.gone = True
                alive = key[0] in table and table[key[0]][1] == key[1]
                record.waited_for = (
                    not alive
                    and record.parent in members
                    and not _ignores_sigchld(record.parent[0])
                )
        self._first = False
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                self._sample()

    def start(self) -> CpuSampler:
        """Take the first sample and start sampling in a daemon thread.

        Returns:
            ``self``.
        """
        with self._lock:
            self._sample()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling (the totals stay readable)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> CpuSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def totals(self) -> dict[str, float]:
        """CPU seconds each group's tree spent since ``start`` (takes a sample first).

        Returns:
            group name -> seconds.
        """
        with self._lock:
            if not self._stop.is_set():
                self._sample()
            out = {}
            for name, seen in self._seen.items():
                ticks = 0
                for record in seen.values():
                    ticks += record.last_own - record.first_own
                    ticks += record.last_reaped - record.first_reaped
                    if record.waited_for:  # its final CPU is in its parent's children times
                        ticks -= record.last_own + record.last_reaped
                out[name] = ticks / _CLOCK_TICKS
            return out


def describe(label: str, values: Sequence[float], unit: str = "ms", scale: float = 1000.0) -> str:
    """One line of raw numbers: count, p50, p95, min, max (seconds scaled into ``unit``)."""
    scaled = [v * scale for v in values]
    return (
        f"{label}: n={len(scaled)} p50={median(scaled):.3f} p95={p95(scaled):.3f} "
        f"min={min(scaled):.3f} max={max(scaled):.3f} {unit}"
    )


def print_result(name: str, ratio: float, ours: str, ref: str, unit: str) -> None:
    """The benchmark's result line, always the last line it prints (BENCHMARKS.md)."""
    print(f"{name}: ratio={ratio:.3g} (ours={ours} ref={ref} {unit})", flush=True)


def size_arg(default: int) -> int:
    """The benchmark's size: the first command-line argument, else ``default``."""
    if len(sys.argv) > 1:
        size = int(sys.argv[1])
        if size < 1:
            raise SystemExit(f"size must be >= 1, got {size}")
        return size
    return default


# -- environment ---------------------------------------------------------------------------------


def _admin_engine_url() -> str:
    return f"{MYSQL_SERVER_URL}/?charset=utf8mb4"


def _create_database() -> tuple[str, str]:
    import sqlalchemy as sa

    name = f"ctrl_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(_admin_engine_url())
    try:
        with admin.begin() as connection:
            connection.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    finally:
        admin.dispose()
    return f"{MYSQL_SERVER_URL}/{name}?charset=utf8mb4", name


def _drop_database(name: str) -> None:
    import sqlalchemy as sa

    admin = sa.create_engine(_admin_engine_url())
    try:
        with admin.begin() as connection:
            connection.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        admin.dispose()


@contextlib.contextmanager
def bench_env() -> Iterator[BenchEnv]:
    """A local Prefect server and a fresh MariaDB database, both removed at the end.

    Exports ``PREFECT_API_URL``, ``PREFECT_LOCAL_STORAGE_PATH`` and ``UNKEY_STATE_DIR`` before
    anything imports Prefect, creates the control-plane schema, and installs the worker
    settings for flows run in this process.
    """
    state = Path(tempfile.mkdtemp(prefix="ctrl-bench-"))
    server: local_server.LocalServer | None = None
    database_name: str | None = None
    settings_installed = False
    try:
        started = time.monotonic()
        server = local_server.start(state)
        print(
            f"# Prefect server {server.api_url} up in {time.monotonic() - started:.1f} s",
            flush=True,
        )
        os.environ.update(
            {
                "PREFECT_API_URL": server.api_url,
                "PREFECT_LOCAL_STORAGE_PATH": str(state / "results"),
                "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "UNKEY_STATE_DIR": str(state),
            }
        )
        url, database_name = _create_database()

        from tasks.db.schema import init_schema
        from worker.settings import Settings, use_settings

        init_schema(url)
        use_settings(Settings(_env_file=None, database_primary=url, state_dir=state))
        settings_installed = True
        yield BenchEnv(state, server, url, database_name)
    finally:
        drain_prefect_workers()
        if settings_installed:
            from tasks.db.engine import dispose_engines
            from worker.settings import use_settings

            use_settings(None)
            dispose_engines()
        if database_name is not None:
            _drop_database(database_name)
        if server is not None:
            local_server.stop(state, server)
        shutil.rmtree(state, ignore_errors=True)


def drain_prefect_workers() -> None:
    """Send the buffered logs and events while the server is still up.

    Otherwise they are flushed at interpreter exit against a stopped server, which retries for
    over a minute (what ``prefect_test_harness`` does before stopping its server, too).
    """
    if "prefect" not in sys.modules:
        return
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        with contextlib.suppress(RuntimeError):  # never started
            logs: object = APILogWorker.instance().drain()
            if inspect.isawaitable(logs):
                await logs
        events: object = EventsWorker.drain_all()
        if inspect.isawaitable(events):
            await events

    try:
        run_coro_as_sync(drain())
    except Exception as exc:  # best effort: a failed drain must not hide the results
        print(f"# draining Prefect's log and event workers failed: {exc}", flush=True)


class ApiRetries(logging.Handler):
    """Counts the Prefect client's retries of this process (503 from a busy server, 429...).

    The client logs each retry at DEBUG ("Another attempt will be made in <s>s") before
    sleeping; a SQLite-backed server answers 503 when its database is locked.
    """

    _WAIT = re.compile(r"Another attempt will be made in ([0-9.]+)s")
    _CODE = re.compile(r"retryable status code (\d+|unknown)")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0
        self.waited = 0.0
        self.codes: Counter[str] = Counter()  # status code -> retries ("exception": no response)

    def emit(self, record: logging.LogRecord) -> None:
        """Count one retry (and its status code) if ``record`` announces one."""
        message = record.getMessage()
        found = self._WAIT.search(message)
        if found:
            self.count += 1
            self.waited += float(found.group(1))
            code = self._CODE.search(message)
            self.codes[code.group(1) if code else "exception"] += 1

    def summary(self) -> str:
        """One line: how many retries, how long they waited, their status codes."""
        codes = ", ".join(f"{code}x{n}" for code, n in sorted(self.codes.items())) or "-"
        return (
            f"Prefect API retries in this process: {self.count} ({self.waited:.1f} s of backoff;"
            f" status codes {codes})"
        )


def retry_status_codes(text: str) -> Counter[str]:
    """The Prefect client's retries announced in a log ``text``, by status code.

    Returns:
        status code (``"503"``...; ``"exception"`` for a retried connection error) -> count.
    """
    codes: Counter[str] = Counter()
    for line in text.splitlines():
        if ApiRetries._WAIT.search(line):
            code = ApiRetries._CODE.search(line)
            codes[code.group(1) if code else "exception"] += 1
    return codes


def count_api_retries() -> ApiRetries:
    """Start counting the Prefect client's retries (call after ``quiet_prefect_console``)."""
    handler = ApiRetries()
    client_logger = logging.getLogger("prefect.client")
    client_logger.setLevel(logging.DEBUG)  # the console handlers stay at WARNING
    client_logger.addHandler(handler)
    return handler


def quiet_prefect_console() -> None:
    """Keep Prefect's per-run INFO lines off the console; they still reach the API.

    The log level is unchanged (the engine does the same logging work as in the worker), only
    the console handler is raised to WARNING so the benchmark's own numbers stay readable.
    """
    from prefect.logging.configuration import setup_logging
    from prefect.logging.handlers import PrefectConsoleHandler

    setup_logging()
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", ""):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, PrefectConsoleHandler):
                handler.setLevel(logging.WARNING)


# -- the worker as a subprocess ------------------------------------------------------------------


@dataclass
class ServedWorker:
    """``python -m bench.worker_main`` (the real worker plus ``bench/flows.py``)."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    handle: ReadyProcess | None = field(default=None, repr=False)

    def log_text(self) -> str:
        """Its log so far ("" when there is none)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def api_retries(self) -> str:
        """How often its flow-run processes retried a Prefect API call (from the worker log)."""
        text = self.log_text()
        if not text:
            return "Prefect API retries in the worker's processes: unknown (no log)"
        waits = [float(w) for w in ApiRetries._WAIT.findall(text)]
        codes = sorted(set(re.findall(r"retryable status code (\d+)", text)))
        return (
            f"Prefect API retries in the worker's processes: {len(waits)} "
            f"({sum(waits):.1f} s of backoff; status codes {', '.join(codes) or '-'})"
        )

    def tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of its log."""
        return "\n".join(self.log_text().splitlines()[-lines:])


def worker_env(env: BenchEnv, port: int, **extra_env: str) -> dict[str, str]:
    """The environment of a serving process of the benchmark (worker or stock serve).

    Args:
        env: the benchmark's server and database.
        port: its ``UNKEY_HTTP_PORT`` (health).
        extra_env: variables added last (``UNKEY_WORKER_LIMIT``...).

    Returns:
        This process's environment plus the worker's configuration.
    """
    return {
        **os.environ,
        "PREFECT_API_URL": env.api_url,
        "UNKEY_DATABASE_PRIMARY": env.database_url,
        "UNKEY_STATE_DIR": str(env.state_dir),
        "UNKEY_HTTP_PORT": str(port),
        "UNKEY_INSTANCE_ID": f"bench-{port}",
        "PYTHONPATH": str(REPO),
        # The client's retries (a 503 from a busy SQLite server) are logged at DEBUG only;
        # this makes them countable in the worker log (``ServedWorker.api_retries``).
        "PREFECT_LOGGING_LOGGERS_PREFECT_CLIENT_LEVEL": "DEBUG",
        **extra_env,
    }


@contextlib.contextmanager
def served_process(
    env: BenchEnv,
    command: Sequence[str],
    name: str,
    timeout: float = 120.0,
    **extra_env: str,
) -> Iterator[ServedWorker]:
    """Start ``command`` as a serving process, wait for its ``/health/ready``; stop it at the end.

    Args:
        env: the benchmark's server and database.
        command: the program and its arguments; it must answer ``/health/ready`` on
            ``UNKEY_HTTP_PORT``.
        name: its name in the log file's name and in messages.
        timeout: seconds to wait until it is ready.
        extra_env: added to its environment (``worker_env``).

    Yields:
        The ready process.

    Raises:
        tests.support.processes.ProcessNotReady: it exited or was not ready in time.
    """
    port = local_server.free_port()
    log_path = env.state_dir / f"{name}-{port}.log"
    handle = ReadyProcess(
        command, cwd=REPO, env=worker_env(env, port, **extra_env), log_path=log_path, name=name
    )
    started = time.monotonic()
    try:
        handle.start(f"http://127.0.0.1:{port}/health/ready", timeout=timeout)
        print(f"# {name} ready in {time.monotonic() - started:.1f} s (port {port})", flush=True)
        assert handle.process is not None
        yield ServedWorker(handle.process, port, log_path, handle)
    finally:
        if handle.process is not None:
            # SIGTERM first (the worker stops its runner), then SIGKILL for whatever is left in
            # the group: the serve process and every flow-run process it started.
            handle.stop(timeout=20)


@contextlib.contextmanager
def served_worker(
    env: BenchEnv, timeout: float = 120.0, **extra_env: str
) -> Iterator[ServedWorker]:
    """Start the worker serving the bench flows; stop it (and its whole group) at the end.

    Args:
        env: the benchmark's server and database.
        timeout: seconds to wait until ``/health/ready`` answers 200.
        extra_env: added to the worker's environment (``UNKEY_WORKER_LIMIT``...).

    Yields:
        The ready worker (``bench.worker_main``, serving ``<flow>/ctrl``).

    Raises:
        tests.support.processes.ProcessNotReady: it exited or was not ready in time.
    """
    with served_process(
        env, [sys.executable, "-m", "bench.worker_main"], "worker", timeout, **extra_env
    ) as worker:
        yield worker


async def run_phases(flow_run_id: str) -> dict[str, float]:
    """Epoch seconds at which a flow run was created and entered each state, from the API.

    Keys: ``created`` and the state types in lower case (``scheduled``, ``pending`` when a
    runner took it, ``running`` when its process started the flow, ``completed``...).
    """
    from uuid import UUID

    from prefect.client.orchestration import get_client

    async with get_client() as client:
        run_id = UUID(flow_run_id)
        flow_run = await client.read_flow_run(run_id)
        states = await client.read_flow_run_states(run_id)
    phases: dict[str, float] = {}
    if flow_run.created is not None:
        phases["created"] = flow_run.created.timestamp()
    for state in sorted(states, key=lambda s: s.timestamp):
        # The first time it entered each state (a resumed run enters some twice).
        phases.setdefault(state.type.value.lower(), state.timestamp.timestamp())
    return phases


@dataclass
class TimedCall:
    """One service call through the Prefect API, trigger -> result.

    Attributes:
        wall: seconds from trigger to result.
        result: the call's result.
        phases: ``run_phases`` of its flow run.
        task_runs: its task runs (steps), at most 200.
    """

    wall: float
    result: Any
    phases: dict[str, float]
    task_runs: list[Any]


async def timed_call(trigger: Awaitable[Any]) -> TimedCall:
    """Await ``trigger`` (a ``worker.client`` call that returns the flow run id), wait for its
    result and read back where its time went."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from worker import client

    started = time.perf_counter()
    run_id = await trigger
    result = await client.wait_for_result(run_id)
    wall = time.perf_counter() - started
    async with client.connect() as api:
        phases = await run_phases(str(run_id))
        task_runs = await api.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])), limit=200
        )
    return TimedCall(wall, result, phases, list(task_runs))
