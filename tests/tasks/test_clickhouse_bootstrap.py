"""The embedded ClickHouse default and ``ctrl-worker db init``'s analytics tables.

``ctrl-worker db init`` runs as the real console command (a child process, in a fresh directory,
with no ``UNKEY_*`` variables: the embedded defaults); the tables are then read back from the
real engine (chdb) through ``system.tables``. The unreachable server is a closed local port.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from blocks.chdb import ChdbClient
from tasks.clickhouse.bootstrap import chdb_directory
from tasks.clickhouse.schema import (
    ANALYTICS_TABLES,
    BILLABLE_RATELIMITS,
    BILLABLE_VERIFICATIONS,
    SENTINEL_REQUESTS,
)
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CTRL_WORKER = Path(sys.executable).with_name("ctrl-worker")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UNKEY_", "PREFECT_"))}
    env.update(extra)
    return env


def _db_init(cwd: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CTRL_WORKER), "db", "init"],
        cwd=cwd,
        env=_env(**extra),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _tables(directory: Path) -> set[str]:
    rows = ChdbClient(str(directory), 60.0).query(
        "SELECT concat(database, '.', name) FROM system.tables WHERE database = 'default'"
    )
    return {str(row[0]) for row in rows}


def test_db_init_creates_the_analytics_tables_in_the_embedded_chdb_idempotently(
    tmp_path: Path,
) -> None:
    """With no configuration, `ctrl-worker db init` creates the analytics tables (the billable
    verifications / ratelimits and sentinel requests among them) in chdb under ./.ctrl/clickhouse;
    a second run creates nothing and leaves the rows already there."""
    first = _db_init(tmp_path)
    assert first.returncode == 0, first.stderr
    directory = (tmp_path / ".ctrl" / "clickhouse").resolve()
    assert f"analytics: created {len(ANALYTICS_TABLES)} table(s) in chdb at {directory}" in (
        first.stdout
    )
    tables = _tables(directory)
    assert {BILLABLE_VERIFICATIONS, BILLABLE_RATELIMITS, SENTINEL_REQUESTS} <= tables
    assert set(ANALYTICS_TABLES) <= tables
    ChdbClient(str(directory), 60.0).insert(
        BILLABLE_VERIFICATIONS,
        [(2026, 1, "ws_keep", 7)],
        ["year", "month", "workspace_id", "count"],
    )

    second = _db_init(tmp_path)

    assert second.returncode == 0, second.stderr
    assert f"analytics: created 0 table(s) in chdb at {directory}" in second.stdout
    assert set(ANALYTICS_TABLES) <= _tables(directory)
    kept = ChdbClient(str(directory), 60.0).query(
        f"SELECT toInt64(sum(count)) FROM {BILLABLE_VERIFICATIONS} WHERE workspace_id = 'ws_keep'"
    )
    assert kept == [(7,)]


def test_db_init_with_clickhouse_off_creates_no_engine(tmp_path: Path) -> None:
    """UNKEY_CLICKHOUSE_URL= (empty) turns the embedded ClickHouse off: db init says so and
    no chdb directory appears."""
    done = _db_init(tmp_path, UNKEY_CLICKHOUSE_URL="")

    assert done.returncode == 0, done.stderr
    assert "analytics: ClickHouse is off" in done.stdout
    assert not (tmp_path / ".ctrl" / "clickhouse").exists()


def test_db_init_reports_an_unreachable_server_without_failing_or_its_password(
    tmp_path: Path,
) -> None:
    """A configured ClickHouse server that cannot be reached is reported (host and port, never
    the URL's password) and db init still succeeds: the control-plane tables are made."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    password = "s3cr3t-ch-password"
    done = _db_init(
        tmp_path, UNKEY_CLICKHOUSE_URL=f"http://ctrl:{password}@127.0.0.1:{port}/default"
    )

    assert done.returncode == 0, done.stderr
    assert f"analytics: left ClickHouse at http://127.0.0.1:{port} as it is" in done.stderr
    assert password not in done.stdout + done.stderr
    assert (tmp_path / ".ctrl" / "ctrl.db").exists()


def test_embedded_default_is_the_state_dir_chdb_only_on_embedded_defaults(tmp_path: Path) -> None:
    """The analytics URL defaults to chdb:///<absolute state dir>/clickhouse only without
    UNKEY_DATABASE_PRIMARY; with a configured database it is off unless set; an explicit URL
    wins; the empty string turns it off."""
    embedded = Settings(_env_file=None, state_dir=tmp_path / "state")
    url = embedded.analytics_clickhouse_url()
    assert url == f"chdb://{(tmp_path / 'state').resolve()}/clickhouse"
    assert url.startswith("chdb:///") and chdb_directory(url) == str(
        (tmp_path / "state" / "clickhouse").resolve()
    )

    relative = Settings(_env_file=None, state_dir=Path("rel-state"))
    assert relative.analytics_clickhouse_url() == f"chdb://{Path('rel-state').resolve()}/clickhouse"

    mysql = Settings(_env_file=None, database_primary=SecretStr("mysql+pymysql://u:p@db/x"))
    assert mysql.analytics_clickhouse_url() is None

    explicit = "http://u:p@ch:8123/default"
    for base in (embedded, mysql):
        chosen = base.model_copy(update={"clickhouse_url": SecretStr(explicit)})
        assert chosen.analytics_clickhouse_url() == explicit
        off = base.model_copy(update={"clickhouse_url": SecretStr("")})
        assert off.analytics_clickhouse_url() is None


def test_empty_environment_variable_turns_the_default_off(monkeypatch, tmp_path: Path) -> None:
    """UNKEY_CLICKHOUSE_URL set to the empty string in the environment (or .env) is "off", not
    "unset": the embedded default does not apply."""
    monkeypatch.setenv("UNKEY_CLICKHOUSE_URL", "")
    assert Settings(_env_file=None, state_dir=tmp_path).analytics_clickhouse_url() is None
    monkeypatch.delenv("UNKEY_CLICKHOUSE_URL")
    assert Settings(_env_file=None, state_dir=tmp_path).analytics_clickhouse_url() is not None


def test_worker_startup_creates_the_tables_without_loading_chdb(tmp_path: Path) -> None:
    """The worker's startup helper creates the embedded tables in a child process: chdb is never
    loaded into the worker (its flow runs are forked), and a second call creates nothing."""
    script = (
        "import json, sys\n"
        "from worker.settings import Settings\n"
        "from tasks.clickhouse.bootstrap import ensure_embedded_analytics\n"
        f"s = Settings(_env_file=None, state_dir={str(tmp_path / 'state')!r})\n"
        "print(json.dumps([ensure_embedded_analytics(s), ensure_embedded_analytics(s),"
        " 'chdb' in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    first, second, loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(first) == sorted(ANALYTICS_TABLES)
    assert second == []
    assert loaded is False
    assert set(ANALYTICS_TABLES) <= _tables(tmp_path / "state" / "clickhouse")


@pytest.mark.parametrize("url", ["", "http://u:p@ch:8123/default"])
def test_worker_startup_leaves_servers_and_off_alone(tmp_path: Path, url: str) -> None:
    """ClickHouse off or a server: the startup helper does nothing (no child, no directory)."""
    from tasks.clickhouse.bootstrap import ensure_embedded_analytics

    settings = Settings(_env_file=None, state_dir=tmp_path, clickhouse_url=SecretStr(url))
    assert ensure_embedded_analytics(settings) == []
    assert not (tmp_path / "clickhouse").exists()
