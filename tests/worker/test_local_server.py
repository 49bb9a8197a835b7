"""The embedded Prefect server: PostgreSQL by default, adopted after a crash, stopped for good,
and never doubled on one state dir."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prefect import flow

from worker import local_server
from worker.local_server import LocalServer

REPO = Path(__file__).resolve().parents[2]


@flow(name="local-server-check")
def _check_flow() -> None:
    """Never run: only its name is registered."""


def _postmasters(data: Path) -> list[int]:
    """Live postgres processes serving data dir ``data`` (backends and helpers excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            argv
            and Path(os.fsdecode(argv[0])).name == "postgres"
            and os.fsencode(str(data)) in argv
            and local_server._alive(int(entry.name))
        ):
            found.append(int(entry.name))
    return found


def _psql(server: LocalServer, sql: str) -> str:
    """Run ``sql`` in the server's ``prefect`` database with the wheel's psql."""
    bin_path, _ = local_server._pg()
    connect = ["-X", "-tA", "-h", server.postgres_socket_dir, "-U", "postgres", "-d", "prefect"]
    return subprocess.run(
        [str(bin_path / "psql"), *connect, "-c", sql],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    """A fresh state dir; whatever a test leaves running in it is stopped afterwards."""
    directory = tmp_path / "state"
    yield directory
    recorded = local_server._read_record(directory)
    if recorded is not None:
        local_server.stop(directory, recorded)
    local_server._stop_postgres(directory / "postgres", local_server._system_user())


@pytest.mark.slow
def test_fresh_start_serves_the_api_on_embedded_postgres(state: Path) -> None:
    """With no configuration the embedded Prefect server runs on PostgreSQL in
    ``<state>/postgres`` (initialised on first use, its postmaster alive), its API is healthy,
    and a flow run created through prefect.client is stored in that PostgreSQL."""
    from prefect.client.orchestration import PrefectClient

    server = local_server.start(state)

    assert server.database == "postgres"
    assert (state / "postgres" / "PG_VERSION").is_file()
    assert _postmasters(state / "postgres") == [server.postgres_pid]
    assert httpx.get(f"{server.api_url}/health", timeout=5).json() is True
    assert httpx.get(f"{server.api_url}/admin/version", timeout=5).status_code == 200
    recorded = json.loads((state / "prefect-server.json").read_text())
    assert recorded["pid"] == server.pid
    assert recorded["postgres_data"] == str(state / "postgres")

    async def create_and_read() -> tuple[str, str]:
        async with PrefectClient(api=server.api_url) as client:
            created = await client.create_flow_run(_check_flow, name="on-postgres")
            read = await client.read_flow_run(created.id)
            return str(read.id), read.name

    run_id, name = asyncio.run(create_and_read())
    assert name == "on-postgres"
    assert _psql(server, f"SELECT name FROM flow_run WHERE id = '{run_id}'") == "on-postgres"


@pytest.mark.slow
def test_a_start_after_the_owner_was_killed_adopts_both_servers(state: Path) -> None:
    """After the worker that started the servers is SIGKILLed, the next ``start`` on the same
    state dir adopts its Prefect server and its PostgreSQL (same API URL, same postmaster,
    no second postmaster) instead of starting new ones."""
    script = textwrap.dedent(
        f"""
        import json, sys, time
        from dataclasses import asdict
        from pathlib import Path
        from worker import local_server
        server = local_server.start(Path({str(state)!r}))
        print(json.dumps(asdict(server)), flush=True)
        time.sleep(600)
        """
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None
        line = owner.stdout.readline()
        assert line, "the owner exited before its server was up"
        first = LocalServer(**json.loads(line))
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()

    adopted = local_server.start(state)

    assert adopted.api_url == first.api_url
    assert adopted.pid == first.pid
    assert adopted.postgres_pid == first.postgres_pid
    assert adopted.owner_pid == os.getpid()
    assert _postmasters(state / "postgres") == [first.postgres_pid]
    assert local_server.healthy(adopted.api_url, timeout=30)
    assert json.loads((state / "prefect-server.json").read_text())["owner_pid"] == os.getpid()


@pytest.mark.slow
def test_stop_leaves_no_postmaster_and_no_prefect_server(state: Path) -> None:
    """``stop`` ends the Prefect server and then its PostgreSQL: no process of either is left
    and the record is gone, so the next start begins from the data on disk."""
    server = local_server.start(state)
    assert _postmasters(state / "postgres")

    local_server.stop(state, server)

    assert _postmasters(state / "postgres") == []
    assert not (state / "postgres" / "postmaster.pid").exists()
    assert not local_server._alive(server.pid)
    assert not local_server._group_alive(server.pid)
    assert not (state / "prefect-server.json").exists()


def _record_alive_server(state: Path, pid: int, api_url: str) -> None:
    state.mkdir(parents=True)
    record = LocalServer(
        api_url=api_url, pid=pid, owner_pid=_dead_pid(), home=str(state / "prefect")
    )
    (state / "prefect-server.json").write_text(json.dumps(local_server.asdict(record)))


def test_a_recorded_server_alive_but_not_answering_is_not_replaced(state: Path) -> None:
    """A recorded server whose process is alive but whose API does not answer is never
    replaced by a second server on the same state dir: ``start`` waits for it and then fails
    naming its pid and the state dir (``discover`` still reports no usable server)."""
    alive = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        api_url = f"http://127.0.0.1:{local_server.free_port()}/api"
        _record_alive_server(state, alive.pid, api_url)

        assert local_server.discover(state) is None
        with pytest.raises(RuntimeError) as raised:
            local_server.start(state, timeout=2, database="sqlite")

        message = str(raised.value)
        assert f"pid {alive.pid}" in message
        assert str(state) in message
        assert alive.poll() is None
        assert json.loads((state / "prefect-server.json").read_text())["pid"] == alive.pid
        assert not (state / "prefect").exists()  # nothing was started
        assert not (state / "postgres").exists()
    finally:
        alive.kill()
        alive.wait()


def test_a_recorded_server_that_answers_late_is_adopted(state: Path) -> None:
    """A recorded live server that becomes healthy only after a while is waited for and
    adopted (same pid and URL), not replaced."""
    port = local_server.free_port()
    script = textwrap.dedent(
        f"""
        import http.server, time
        time.sleep(2)
        class Health(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200); self.end_headers(); self.wfile.write(b"true")
            def log_message(self, *args):
                pass
        http.server.HTTPServer(("127.0.0.1", {port}), Health).serve_forever()
        """
    )
    late = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        api_url = f"http://127.0.0.1:{port}/api"
        _record_alive_server(state, late.pid, api_url)

        adopted = local_server.start(state, timeout=60, database="sqlite")

        assert (adopted.pid, adopted.api_url) == (late.pid, api_url)
        assert adopted.owner_pid == os.getpid()
        assert not (state / "prefect").exists()
    finally:
        late.kill()
        late.wait()


def test_a_record_from_before_postgres_still_loads(state: Path) -> None:
    """``prefect-server.json`` written before the PostgreSQL fields existed still loads (as a
    SQLite server), and one whose process is gone is reported as no server."""
    state.mkdir()
    old = {"api_url": "http://127.0.0.1:1/api", "pid": _dead_pid(), "owner_pid": 1, "home": "x"}
    (state / "prefect-server.json").write_text(json.dumps(old))

    recorded = local_server._read_record(state)

    assert recorded is not None
    assert recorded.database == "sqlite"
    assert local_server.discover(state) is None


@pytest.mark.slow
def test_sqlite_is_still_available_behind_the_setting(state: Path) -> None:
    """``database="sqlite"`` runs the embedded server on SQLite (single-user mode), with no
    PostgreSQL at all."""
    server = local_server.start(state, database="sqlite")

    assert server.database == "sqlite"
    # start() returned only after a health answer; this probe checks it still serves. SQLite
    # answers slowly while its loop services start on a loaded box (CI saw > 2 s), so wait.
    assert local_server.healthy(server.api_url, timeout=30)
    assert (state / "prefect" / "prefect.db").is_file()
    assert not (state / "postgres").exists()
    local_server.stop(state, server)
    assert not local_server._alive(server.pid)


@pytest.mark.slow
def test_a_long_state_dir_gets_a_short_private_socket_dir(tmp_path: Path) -> None:
    """A data dir too deep for a Unix socket path (107 bytes; pytest tmp dirs can be) gets its
    socket in a short private directory instead, and PostgreSQL serves there."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    data = deep / "postgres"
    assert len(os.fsencode(data / ".s.PGSQL.5432")) > local_server.SOCKET_PATH_MAX
    deep.mkdir(parents=True)
    postgres = local_server._ensure_postgres(data, deep / "postgres.log", timeout=60)
    try:
        socket_path = postgres.socket_dir / f".s.PGSQL.{postgres.port}"
        assert postgres.socket_dir != data
        assert len(os.fsencode(socket_path)) <= local_server.SOCKET_PATH_MAX
        assert socket_path.is_socket()
        assert postgres.socket_dir.stat().st_mode & 0o077 == 0
        local_server._ensure_database(postgres, "prefect")
        local_server._ensure_database(postgres, "prefect")  # idempotent
    finally:
        local_server._stop_postgres(data, postgres.user)
    assert _postmasters(data) == []
