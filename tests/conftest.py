"""Shared fixtures: real MariaDB databases, SQLite files, and (in tests/prefect_fixtures.py) a
real local Prefect server.

MariaDB is reached at ``CTRL_TEST_MYSQL_URL`` (default ``mysql+pymysql://ctrl:ctrl@127.0.0.1:3306``,
the user `.ci/run` creates). Each session gets its own database, dropped at the end, so runs
never see each other's rows.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa

MYSQL_SERVER_URL = os.environ.get("CTRL_TEST_MYSQL_URL", "mysql+pymysql://ctrl:ctrl@127.0.0.1:3306")


@contextmanager
def _mysql_database(prefix: str) -> Iterator[str]:
    """A new, empty database on the test server, dropped (with its pooled connections) after."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(f"{MYSQL_SERVER_URL}/?charset=utf8mb4")
    with admin.begin() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    try:
        yield f"{MYSQL_SERVER_URL}/{name}?charset=utf8mb4"
    finally:
        from tasks.db.engine import dispose_engines

        dispose_engines()
        with admin.begin() as connection:
            connection.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
        admin.dispose()


@pytest.fixture(scope="session")
def mysql_url() -> Iterator[str]:
    """A fresh MariaDB database with the control-plane schema, for the whole session."""
    from tasks.db.schema import init_schema

    with _mysql_database("ctrl_test") as url:
        init_schema(url)
        yield url


@pytest.fixture
def empty_mysql_url() -> Iterator[str]:
    """A fresh, empty MariaDB database (no tables) for one test."""
    with _mysql_database("ctrl_empty") as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    """A path for a fresh SQLite database file (no tables yet)."""
    return f"sqlite:///{tmp_path / 'ctrl.db'}"


pytest_plugins = ["tests.support.fixtures", "tests.support.acme_fixtures"]

# The developer's own UNKEY_* variables (fixtures may set others later, e.g. UNKEY_STATE_DIR).
_DEVELOPER_UNKEY = [name for name in os.environ if name.startswith("UNKEY_")]


@pytest.fixture(autouse=True)
def _no_unkey_env(monkeypatch) -> None:
    """Tests never pick up the developer's UNKEY_* variables."""
    for name in _DEVELOPER_UNKEY:
        monkeypatch.delenv(name, raising=False)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Complete the markers from what a test uses: every test that needs MariaDB (directly or
    through another fixture) is ``mysql``; every test that starts real workers is ``slow``."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & {"mysql_url", "empty_mysql_url", "control_db"}:
            item.add_marker(pytest.mark.mysql)
        if "worker_factory" in fixtures:
            item.add_marker(pytest.mark.slow)
