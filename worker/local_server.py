"""The embedded Prefect server: started and owned by the worker when ``PREFECT_API_URL`` is unset.

It keeps everything under ``<state dir>/prefect`` (SQLite database, filesystem lease storage
so a restart never leaks a key lock), listens on loopback on a free port, and writes
``<state dir>/prefect-server.json`` so other commands run from the same directory
(``ctrl-worker trigger``, the client) find it with no configuration.

This module does not import Prefect: the API URL must be in the environment before Prefect's
settings are first read.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

__all__ = [
    "LocalServer",
    "discover",
    "free_port",
    "healthy",
    "server_env",
    "start",
    "stop",
]

LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"
MAX_SLOT_WAIT_SECONDS = 2


@dataclass
class LocalServer:
    api_url: str
    pid: int
    owner_pid: int
    home: str

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")


def _info_path(state_dir: Path) -> Path:
    return state_dir / "prefect-server.json"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """True when the Prefect API answers its health check."""
    try:
        response = httpx.get(f"{api_url}/health", timeout=timeout)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def discover(state_dir: Path) -> LocalServer | None:
    """The local server recorded under ``state_dir``, if it is up."""
    try:
        server = LocalServer(**json.loads(_info_path(state_dir).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if not _alive(server.pid) or not healthy(server.api_url):
        return None
    return server


def server_env(home: Path, port: int) -> dict[str, str]:
    """The environment of a Prefect server process keeping its state under ``home``."""
    env = dict(os.environ)
    for name in list(env):
        if name.startswith("PREFECT_"):
            del env[name]
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
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


def start(state_dir: Path, port: int = 0, timeout: float = 90.0) -> LocalServer:
    """Start a Prefect server for ``state_dir`` (or adopt the one whose owner died).

    Raises:
        RuntimeError: the server did not become healthy within ``timeout`` seconds.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    existing = discover(state_dir)
    if existing is not None:
        if _alive(existing.owner_pid) and existing.owner_pid != os.getpid():
            raise RuntimeError(
                f"another worker (pid {existing.owner_pid}) already runs the local Prefect "
                f"server of {state_dir}; stop it or set PREFECT_API_URL"
            )
        # The previous worker died without stopping its server: adopt it.
        existing.owner_pid = os.getpid()
        _info_path(state_dir).write_text(json.dumps(asdict(existing)))
        return existing
    home = state_dir / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = (state_dir / "prefect-server.log").open("ab")
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
        env=server_env(home, port),
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
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"the local Prefect server exited with code {process.returncode}; "
                f"see {state_dir / 'prefect-server.log'}"
            )
        if healthy(server.api_url, timeout=1.0):
            _info_path(state_dir).write_text(json.dumps(asdict(server)))
            return server
        time.sleep(0.25)
    stop_pid(process.pid)
    raise RuntimeError(
        f"the local Prefect server did not become healthy in {timeout:.0f} s; "
        f"see {state_dir / 'prefect-server.log'}"
    )


def stop_pid(pid: int, timeout: float = 15.0) -> None:
    """Stop a server process group: SIGTERM, then SIGKILL after ``timeout`` seconds."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def stop(state_dir: Path, server: LocalServer) -> None:
    """Stop a server this process started or adopted, and forget it."""
    stop_pid(server.pid)
    info = _info_path(state_dir)
    try:
        if json.loads(info.read_text()).get("pid") == server.pid:
            info.unlink()
    except (OSError, ValueError):
        pass
