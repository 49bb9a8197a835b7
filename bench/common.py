"""Shared setup of the benchmarks: a local Prefect server, a fresh MariaDB database, the worker.

Every benchmark's ``main`` enters ``bench_env()`` *before* importing anything that imports
Prefect: Prefect reads its settings (API URL, result storage) once, on first import, so the
environment must already point at the benchmark's own server and state directory.

This module imports nothing from Prefect at import time (only ``worker.local_server``, which
is Prefect-free by design); whatever needs Prefect is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from worker import local_server

__all__ = [
    "MYSQL_SERVER_URL",
    "REPO",
    "ApiRetries",
    "BenchEnv",
    "ServedWorker",
    "bench_env",
    "count_api_retries",
    "describe",
    "median",
    "p95",
    "print_result",
    "quiet_prefect_console",
    "run_phases",
    "served_worker",
    "size_arg",
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
        return self.server.api_url


# -- numbers ----------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """The median (p50) of ``values``."""
    return float(statistics.median(values))


def p95(values: Sequence[float]) -> float:
    """The 95th percentile of ``values`` (nearest rank)."""
    ordered = sorted(values)
    rank = max(1, round(0.95 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


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
        _drain_prefect_workers()
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


def _drain_prefect_workers() -> None:
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

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0
        self.waited = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        found = self._WAIT.search(record.getMessage())
        if found:
            self.count += 1
            self.waited += float(found.group(1))

    def summary(self) -> str:
        return f"Prefect API retries in this process: {self.count} ({self.waited:.1f} s of backoff)"


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

    def api_retries(self) -> str:
        """How often its flow-run processes retried a Prefect API call (from the worker log)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "Prefect API retries in the worker's processes: unknown (no log)"
        waits = [float(w) for w in ApiRetries._WAIT.findall(text)]
        codes = sorted(set(re.findall(r"retryable status code (\d+)", text)))
        return (
            f"Prefect API retries in the worker's processes: {len(waits)} "
            f"({sum(waits):.1f} s of backoff; status codes {', '.join(codes) or '-'})"
        )

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _wait_ready(worker: ServedWorker, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.process.poll() is not None:
            raise RuntimeError(
                f"the worker exited with {worker.process.returncode}:\n{worker.tail()}"
            )
        try:
            url = f"http://127.0.0.1:{worker.port}/health/ready"
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the worker was not ready after {timeout:.0f} s:\n{worker.tail()}")


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    # SIGTERM first (the worker stops its runner), SIGKILL for whatever is left in the group:
    # the serve process and every flow-run process it spawned.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


@contextlib.contextmanager
def served_worker(
    env: BenchEnv, timeout: float = 120.0, **extra_env: str
) -> Iterator[ServedWorker]:
    """Start the worker serving the bench flows; kill its whole process group at the end."""
    port = local_server.free_port()
    log_path = env.state_dir / f"worker-{port}.log"
    child_env = {
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
    started = time.monotonic()
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.worker_main"],
            cwd=REPO,
            env=child_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, killed as a whole
        )
    worker = ServedWorker(process, port, log_path)
    try:
        _wait_ready(worker, timeout)
        print(f"# worker ready in {time.monotonic() - started:.1f} s (port {port})", flush=True)
        yield worker
    finally:
        _kill_group(process)


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
