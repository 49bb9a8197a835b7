"""Tests of blocks/clickhouse.py, blocks/chdb.py and blocks/clickhouse_errors.py.

Everything chdb runs for real: the ClickHouse 26.9 engine on a temporary directory, real
subprocesses sharing one directory, real forks. No ClickHouse server can run here (see
../shared/reference/infra.md §4), so the clickhouse-connect client talks to a
``pytest_httpserver`` stand-in that answers ClickHouse's HTTP protocol by running the posted SQL
on a real chdb engine (so the handshake, result decoding and Native inserts are real), or
answers 503 / a ClickHouse error / nothing. Those tests pin the transport facts: credentials and
database sent as configured, and which answers are retryable, which terminal, and that no
message carries the password.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from blocks.chdb import LOCK_FILE
from blocks.clickhouse import (
    ClickHouse,
    ClickHouseClient,
    ClickHouseQueryError,
    ClickHouseUnavailableError,
    admin_client,
    analytics_client,
    clickhouse_from_url,
    close_cached_clients,
)
from tests.support.settings import installed_settings
from worker.kernel.errors import ConfigError, InvalidParameterError, RetryableError, TerminalError
from worker.settings import Settings, use_settings

PASSWORD = "CH-PASSWORD-SENTINEL-5d1e"
SECRET_PARAM = "PARAM-SECRET-SENTINEL-77aa"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def chdb_dir(tmp_path: Path) -> Path:
    return tmp_path / "chdb"


@pytest.fixture
def client(chdb_dir: Path) -> ClickHouseClient:
    client = clickhouse_from_url(f"chdb://{chdb_dir}")
    client.command("CREATE TABLE t (a String, b Int64) ENGINE = MergeTree ORDER BY a")
    return client


def _python(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter (chdb not yet loaded) at the repository root."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- chdb: statements, parameters, inserts ------------------------------------------------------

HOSTILE = [
    "it's",
    "back\\slash \\' \\N",
    "tab\tnew\nline",
    "'); DROP TABLE t; --",
    "{b:Int64}",
    "unicode ü €",
]


def test_chdb_string_parameters_are_data_never_sql(client: ClickHouseClient) -> None:
    """Quotes, backslashes, tabs, newlines and SQL in a parameter come back unchanged, and the
    statement they try to inject never runs (the table is still there)."""
    for value in HOSTILE:
        assert client.query("SELECT {v:String}", {"v": value}) == [(value,)]
    assert client.query("SELECT count() FROM t") == [(0,)]


def test_chdb_non_string_parameters_bind_like_clickhouse_connect(client: ClickHouseClient) -> None:
    """Ints, bools, NULL and an Array(Tuple(...)) (the idle-preview query's shape) bind as the
    same server-side parameters clickhouse-connect sends over HTTP."""
    rows = client.query(
        "SELECT {i:Int64}, {b:Bool}, {n:Nullable(String)}, "
        "{k:Array(Tuple(String, String))}, ('x', 'y') IN {k:Array(Tuple(String, String))}",
        {"i": -(2**63), "b": True, "n": None, "k": [("x", "y"), ("it's", "z")]},
    )
    assert rows == [(-(2**63), True, None, [["x", "y"], ["it's", "z"]], True)]


def test_chdb_injection_into_a_typed_parameter_is_refused_and_masked(
    client: ClickHouseClient,
) -> None:
    """A value that is not of the declared type is a terminal error (code 457), the statement
    it carries never runs, and the engine's text quoting it is masked."""
    with pytest.raises(ClickHouseQueryError) as raised:
        client.query("SELECT {x:Int64}", {"x": f"1; DROP TABLE t -- {SECRET_PARAM}"})
    assert raised.value.code == 457
    assert SECRET_PARAM not in str(raised.value)
    assert client.query("SELECT count() FROM t") == [(0,)]


@pytest.mark.parametrize(
    ("sql", "code"),
    [("SELEC 1", 62), ("SELECT * FROM no_such_table", 60), ("SELECT {missing:String}", 456)],
)
def test_chdb_sql_errors_are_terminal(client: ClickHouseClient, sql: str, code: int) -> None:
    """Syntax errors, unknown tables and missing parameters fail at once (no retry)."""
    with pytest.raises(ClickHouseQueryError) as raised:
        client.query(sql)
    assert raised.value.code == code
    assert isinstance(raised.value, TerminalError)


def test_chdb_insert_round_trips_every_value(client: ClickHouseClient) -> None:
    """One batch inserts strings with any character, 64-bit extremes, bools and NULLs as given."""
    client.command(
        "CREATE TABLE v (s String, i Int64, f Bool, n Nullable(String)) "
        "ENGINE = MergeTree ORDER BY i"
    )
    rows = [(value, index, index % 2 == 0, None) for index, value in enumerate(HOSTILE)]
    rows += [("min", -(2**63), True, "x"), ("max", 2**63 - 1, False, "y")]
    client.insert("default.v", rows, ["s", "i", "f", "n"])
    assert client.query("SELECT s, i, f, n FROM v ORDER BY i") == sorted(rows, key=lambda r: r[1])


@pytest.mark.parametrize(
    ("table", "columns", "rows"),
    [
        ("t; DROP TABLE t", ["a", "b"], [("x", 1)]),
        ("t", ["a", "b` Int64) --"], [("x", 1)]),
        ("db.t.x", ["a", "b"], [("x", 1)]),
        ("t", ["a", "b"], [("x", 1, "extra")]),
    ],
)
def test_chdb_insert_refuses_bad_names_and_ragged_rows(
    client: ClickHouseClient, table: str, columns: list[str], rows: list[tuple[Any, ...]]
) -> None:
    """Names spliced into the INSERT must be plain identifiers and rows must fit the columns;
    anything else is refused before a statement is sent."""
    with pytest.raises(InvalidParameterError):
        client.insert(table, rows, columns)
    assert client.query("SELECT count() FROM t") == [(0,)]


def test_chdb_empty_insert_does_not_touch_the_engine(tmp_path: Path) -> None:
    """An empty batch is no round trip: the directory is not even created."""
    directory = tmp_path / "never"
    clickhouse_from_url(f"chdb://{directory}").insert("t", [], ["a"])
    assert not directory.exists()


def test_chdb_keeps_only_what_is_on_disk_between_operations(client: ClickHouseClient) -> None:
    """Each operation is its own session: MergeTree rows persist, but the rows of a Memory
    table do not (a known limit of the per-operation design, documented in blocks/chdb.py)."""
    client.command("CREATE TABLE m (a Int64) ENGINE = Memory")
    client.insert("m", [(1,)], ["a"])
    client.insert("t", [("kept", 1)], ["a", "b"])
    assert client.query("SELECT count() FROM m") == [(0,)]
    assert client.query("SELECT a FROM t") == [("kept",)]


# -- chdb: threads, directories, processes, forks -------------------------------------------------


def test_threads_share_one_chdb_client(client: ClickHouseClient) -> None:
    """8 threads inserting through one client at once all succeed and every row is stored."""
    errors: list[BaseException] = []

    def insert(thread: int) -> None:
        try:
            for i in range(5):
                client.insert("t", [(f"thread-{thread}", i)], ["a", "b"])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=insert, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert client.query("SELECT count(), uniqExact(a) FROM t") == [(40, 8)]


def test_one_process_alternates_between_directories(tmp_path: Path) -> None:
    """The engine admits one directory per process at a time; operations on two directories
    (and chdb.query's in-memory engine) interleave freely because none holds the engine."""
    import chdb

    first = clickhouse_from_url(f"chdb://{tmp_path / 'one'}")
    second = clickhouse_from_url(f"chdb://{tmp_path / 'two'}")
    for client, name in ((first, "one"), (second, "two"), (first, "one")):
        client.command(f"CREATE TABLE IF NOT EXISTS {name} (a String) ENGINE = Memory")
        assert str(chdb.query("SELECT 41 + 1", "CSV")).strip() == "42"
    assert first.query("SHOW TABLES") == [("one",)]
    assert second.query("SHOW TABLES") == [("two",)]


CONCURRENT_WRITER = """
    import sys
    from blocks.clickhouse import clickhouse_from_url
    url, tag, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    client = clickhouse_from_url(url, timeout_seconds=60)
    client.command(
        "CREATE TABLE IF NOT EXISTS w (tag String, i Int64) ENGINE = MergeTree ORDER BY tag"
    )
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    for i in range(count):
        client.insert("w", [(tag, i)], ["tag", "i"])
        client.query("SELECT count() FROM w WHERE tag = {tag:String}", {"tag": tag})
    print("done", flush=True)
"""


def test_processes_take_turns_on_one_chdb_directory(chdb_dir: Path) -> None:
    """Three processes writing and reading one directory at the same moment all succeed and
    every row lands: none hits the engine's own lock (it would refuse the second process)."""
    url, count = f"chdb://{chdb_dir}", 15
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(CONCURRENT_WRITER), url, f"p{n}", str(count)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(3)
    ]
    try:
        for writer in writers:
            assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        for writer in writers:
            assert writer.stdin is not None
            writer.stdin.write("go\n")
            writer.stdin.flush()
        outcomes = [writer.communicate(timeout=180) for writer in writers]
    finally:
        for writer in writers:
            writer.kill()
    for writer, (out, err) in zip(writers, outcomes, strict=True):
        assert writer.returncode == 0 and out.strip() == "done", err[-2000:]
    rows = clickhouse_from_url(url).query("SELECT tag, count() FROM w GROUP BY tag ORDER BY tag")
    assert rows == [("p0", count), ("p1", count), ("p2", count)]


FOREIGN_HOLDER = """
    import sys
    from chdb import session
    held = session.Session(sys.argv[1])  # a process that does not take our lock
    held.query("SELECT 1")
    print("holding", flush=True)
    sys.stdin.readline()
    held.close()
"""


def test_directory_held_by_another_engine_is_retryable(chdb_dir: Path) -> None:
    """While a process that bypasses our lock holds the directory, an operation fails as
    retryable (the engine refuses a second process), and succeeds once it let go."""
    client = clickhouse_from_url(f"chdb://{chdb_dir}")
    client.command("SELECT 1")  # the directory exists
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(FOREIGN_HOLDER), str(chdb_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        with pytest.raises(ClickHouseUnavailableError, match="cannot open chdb"):
            client.query("SELECT 1")
    finally:
        holder.communicate("release\n", timeout=60)
    assert client.query("SELECT 1") == [(1,)]


def test_directory_locked_longer_than_the_timeout_is_retryable(chdb_dir: Path) -> None:
    """An operation waits for the directory's lock only up to its timeout, then fails as
    retryable (a busy directory is a transient condition)."""
    import fcntl

    chdb_dir.mkdir()
    fd = os.open(chdb_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held through another open file: as another process
        client = clickhouse_from_url(f"chdb://{chdb_dir}", timeout_seconds=0.2)
        with pytest.raises(ClickHouseUnavailableError, match="busy"):
            client.query("SELECT 1")
    finally:
        os.close(fd)
    assert client.query("SELECT 1") == [(1,)]


def test_importing_the_clickhouse_modules_does_not_load_chdb() -> None:
    """The fork server imports every flow module, and a child forked after chdb was loaded
    hangs: importing the ClickHouse block and tasks, and the flows that use them, must not
    load chdb."""
    result = _python(
        """
        import sys
        import blocks.clickhouse, tasks.clickhouse.schema, tasks.clickhouse.requests
        import tasks.clickhouse.builds, tasks.build.git_build, flows.deploy
        print("chdb" in sys.modules)
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


FORK_SCRIPT = """
    import os, sys
    from blocks.clickhouse import ChdbForkError, clickhouse_from_url
    client = clickhouse_from_url(sys.argv[1])
    if sys.argv[2] == "after":
        client.query("SELECT 1")  # loads chdb in the parent
    pid = os.fork()
    if pid == 0:
        try:
            code = 0 if client.query("SELECT 7") == [(7,)] else 1
        except ChdbForkError:
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status))
"""


def test_child_forked_before_chdb_loaded_can_query(chdb_dir: Path) -> None:
    """A flow-run process forked from a fork server that imported the block (not chdb) queries
    the directory normally."""
    result = _python(FORK_SCRIPT, f"chdb://{chdb_dir}", "before")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "0"


def test_child_forked_after_chdb_loaded_fails_at_once(chdb_dir: Path) -> None:
    """A child forked after chdb was loaded gets ChdbForkError (terminal) instead of hanging
    forever in the engine."""
    result = _python(FORK_SCRIPT, f"chdb://{chdb_dir}", "after", timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "3"


# -- URLs, reprs, the block, the cached clients --------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        f"ftp://user:{PASSWORD}@ch.example:8123/db",
        f"user:{PASSWORD}@ch.example:8123",
        f"http://user:{PASSWORD}@ch.example:port/db",
        f"http://user:{PASSWORD}@:8123/db",
        f"https://user:{PASSWORD}@ch.example:8443/db?secure=true",
        f"http://user:{PASSWORD}@ch.example:8123/db/extra",
        "chdb://relative/dir",
        "chdb:relative/dir",
        "chdb:///abs/dir?mode=ro",
    ],
)
def test_bad_url_is_a_config_error_naming_the_variable_not_the_password(url: str) -> None:
    """A malformed URL, another scheme or a relative chdb path fails at once with a message
    that names the variable and never the URL's password."""
    with pytest.raises(ConfigError) as raised:
        clickhouse_from_url(url, variable="UNKEY_CLICKHOUSE_ADMIN_URL")
    assert "UNKEY_CLICKHOUSE_ADMIN_URL" in str(raised.value)
    assert PASSWORD not in str(raised.value) and PASSWORD not in repr(raised.value)
    # No chained exception (urllib's ValueError quotes the netloc) travels with it.
    assert raised.value.__cause__ is None
    assert raised.value.__context__ is None or raised.value.__suppress_context__


def test_reprs_never_show_the_password() -> None:
    """A client's and a block's repr name where ClickHouse is, never the password."""
    url = f"https://user:{PASSWORD}@ch.example/analytics"
    client = clickhouse_from_url(url)
    block = ClickHouse(url=SecretStr(url))
    assert repr(client) == "<ClickHouse client: ClickHouse at https://ch.example:8443>"
    assert PASSWORD not in repr(block) and PASSWORD not in str(block.model_dump())


def test_block_builds_a_working_client(chdb_dir: Path) -> None:
    """The ClickHouse block builds a client for its (secret) URL."""
    block = ClickHouse(url=SecretStr(f"chdb://{chdb_dir}"), timeout_seconds=5)
    assert block.get_client().query("SELECT 1 + 1") == [(2,)]


@pytest.fixture
def settings_with(tmp_path: Path) -> Iterator[Any]:
    def install(**fields: str) -> None:
        use_settings(Settings(_env_file=None, **{k: SecretStr(v) for k, v in fields.items()}))

    with installed_settings(Settings(_env_file=None)):
        yield install
    close_cached_clients()


def test_cached_clients_follow_the_settings(settings_with: Any, tmp_path: Path) -> None:
    """analytics_client/admin_client are None when off (UNKEY_CLICKHOUSE_URL empty: unset
    means the embedded default), one cached client per setting, and a new one when the URL
    changes."""
    settings_with(clickhouse_url="")
    assert analytics_client() is None and admin_client() is None
    settings_with(clickhouse_url=f"chdb://{tmp_path / 'a'}")
    first = analytics_client()
    assert first is not None and analytics_client() is first and admin_client() is None
    settings_with(clickhouse_url=f"chdb://{tmp_path / 'b'}", clickhouse_admin_url="chdb:///x")
    assert analytics_client() is not first and admin_client() is not None


def test_cached_client_is_not_inherited_by_a_forked_child(tmp_path: Path) -> None:
    """A forked child builds its own cached client instead of reusing its parent's."""
    result = _python(
        """
        import os, sys
        from pydantic import SecretStr
        from blocks.clickhouse import analytics_client
        from worker.settings import Settings, use_settings
        use_settings(Settings(_env_file=None, clickhouse_url=SecretStr(sys.argv[1])))
        parent = analytics_client()
        pid = os.fork()
        if pid == 0:
            child = analytics_client()
            os._exit(0 if child is not parent and analytics_client() is child else 1)
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        """,
        f"http://user:{PASSWORD}@127.0.0.1:9/db",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "0"


def test_bad_configured_url_names_the_environment_variable(settings_with: Any) -> None:
    """A bad UNKEY_CLICKHOUSE_URL is reported under that name, without its password."""
    settings_with(clickhouse_url=f"mysql://user:{PASSWORD}@db/x")
    with pytest.raises(ConfigError, match="UNKEY_CLICKHOUSE_URL") as raised:
        analytics_client()
    assert PASSWORD not in str(raised.value)


# -- the server client against a stand-in -------------------------------------------------------


class ChdbBackedServer:
    """Answers ClickHouse's HTTP protocol by running the posted SQL on a real chdb engine.

    Records each request; ``fail_with`` makes every later request fail with that answer
    (status, ``X-ClickHouse-Exception-Code``, body).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.requests: list[Request] = []
        self.failure: tuple[int, str | None, str] | None = None
        self.lock = threading.Lock()

    def fail_with(self, status: int, code: str | None, body: str) -> None:
        self.failure = (status, code, body)

    def __call__(self, request: Request) -> Response:
        import lz4.frame
        from chdb import session

        self.requests.append(request)
        if self.failure is not None:
            status, code, body = self.failure
            headers = {"X-ClickHouse-Exception-Code": code} if code else {}
            return Response(body, status=status, headers=headers)
        body = request.get_data()
        if request.headers.get("Content-Encoding") == "lz4":
            body = lz4.frame.decompress(body)
        params = {k[len("param_") :]: v for k, v in request.args.items() if k.startswith("param_")}
        sql, _, data = body.partition(b"FORMAT Native\n")
        with self.lock:
            held = session.Session(str(self.directory))
            try:
                if data:  # an insert: its Native block goes through a file
                    native = self.directory / f"insert-{uuid.uuid4().hex}.native"
                    native.write_bytes(data)
                    statement = f"{sql.decode()} SELECT * FROM file('{native}', Native)"
                    return Response(held.query(statement, "TSV").bytes())
                return Response(held.query(body.decode(), "TSV", params=params).bytes())
            except Exception as exc:
                text = str(exc)
                code = text.split("Code: ", 1)[1].split(".", 1)[0] if "Code: " in text else "0"
                status = {"60": 404, "62": 400}.get(code, 500)
                return Response(text, status=status, headers={"X-ClickHouse-Exception-Code": code})
            finally:
                held.close()


@pytest.fixture
def standin(httpserver: HTTPServer, tmp_path: Path) -> ChdbBackedServer:
    server = ChdbBackedServer(tmp_path / "server")
    httpserver.expect_request("/").respond_with_handler(server)
    return server


def _server_url(httpserver: HTTPServer, database: str = "default") -> str:
    return f"http://analyst:{PASSWORD}@127.0.0.1:{httpserver.port}/{database}"


def test_server_client_sends_credentials_database_and_parameters(
    httpserver: HTTPServer, standin: ChdbBackedServer
) -> None:
    """The URL's user, password and database reach the server as configured, parameters go
    as server-side ``param_`` values, and a Native insert and a query round-trip."""
    client = clickhouse_from_url(_server_url(httpserver, "analytics"))
    client.command(
        "CREATE TABLE IF NOT EXISTS default.s (a String, b Int64) ENGINE = MergeTree ORDER BY b"
    )
    client.insert("default.s", [("it's", 1), ("tab\there", 2)], ["a", "b"])
    assert client.query("SELECT a, b FROM default.s WHERE b >= {m:Int64} ORDER BY b", {"m": 1}) == [
        ("it's", 1),
        ("tab\there", 2),
    ]
    client.close()
    auth = {r.headers.get("Authorization") for r in standin.requests}
    assert auth == {"Basic " + base64.b64encode(f"analyst:{PASSWORD}".encode()).decode()}
    assert {r.args.get("database") for r in standin.requests} - {None} == {"analytics"}
    assert any(r.args.get("param_m") == "1" for r in standin.requests)


def test_server_sql_error_is_terminal(httpserver: HTTPServer, standin: ChdbBackedServer) -> None:
    """A statement the server refuses (its code in the exception header) fails at once."""
    client = clickhouse_from_url(_server_url(httpserver))
    with pytest.raises(ClickHouseQueryError) as raised:
        client.query("SELECT * FROM default.no_such_table")
    assert raised.value.code == 60 and PASSWORD not in str(raised.value)


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (503, None, ClickHouseUnavailableError),
        (500, "241", ClickHouseUnavailableError),  # MEMORY_LIMIT_EXCEEDED: load, not SQL
        (403, "516", ClickHouseQueryError),  # AUTHENTICATION_FAILED
        (401, None, ClickHouseQueryError),
    ],
)
def test_server_answers_map_to_the_error_tree(
    httpserver: HTTPServer,
    standin: ChdbBackedServer,
    status: int,
    code: str | None,
    kind: type[Exception],
) -> None:
    """5xx and load-related codes are retryable; bad credentials and other 4xx are terminal;
    the password and long parameters never appear in the message, even when echoed."""
    standin.fail_with(status, code, f"Code: {code}. DB::Exception: echo {PASSWORD} {SECRET_PARAM}")
    client = clickhouse_from_url(_server_url(httpserver))
    with pytest.raises(kind) as raised:
        client.query("SELECT {p:String}", {"p": SECRET_PARAM})
    assert isinstance(raised.value, RetryableError if status >= 500 else TerminalError)
    for text in (str(raised.value), repr(raised.value)):
        assert PASSWORD not in text and SECRET_PARAM not in text
    assert raised.value.__cause__ is None


def test_unreachable_server_is_retryable() -> None:
    """A refused connection is a retryable error that names the host, not the password."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    client = clickhouse_from_url(f"http://user:{PASSWORD}@127.0.0.1:{port}/db", timeout_seconds=2)
    with pytest.raises(ClickHouseUnavailableError) as raised:
        client.query("SELECT 1")
    assert f"127.0.0.1:{port}" in str(raised.value) and PASSWORD not in str(raised.value)


def test_server_slower_than_the_timeout_is_retryable(httpserver: HTTPServer) -> None:
    """A server that does not answer within the timeout is a retryable error."""
    release = threading.Event()

    def stall(request: Request) -> Response:
        release.wait(10)
        return Response("", status=500)

    httpserver.expect_request("/").respond_with_handler(stall)
    client = clickhouse_from_url(_server_url(httpserver), timeout_seconds=0.5)
    try:
        with pytest.raises(ClickHouseUnavailableError) as raised:
            client.query("SELECT 1")
        assert PASSWORD not in str(raised.value)
    finally:
        release.set()
