"""What the ClickhouseUserService tests share: the stand-in admin connection, a seeded
workspace and reading its stored credentials back.

The stand-in (``tests.support.clickhouse_standin``) answers as ``UNKEY_CLICKHOUSE_ADMIN_URL``;
each test seeds its own ``ws_<random>`` workspace quota row and removes its rows after.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from prefect.states import State
from pydantic import SecretStr
from pytest_httpserver import HTTPServer

from blocks.clickhouse import close_cached_clients
from blocks.vault import vault_from_settings
from flows.clickhouse_user import configure_clickhouse_user
from tasks.db.engine import engine_for
from tasks.db.schema import clickhouse_workspace_settings, quota
from tests.support.clickhouse_standin import ClickHouseStandIn
from tests.support.settings import installed_settings
from worker.kernel.clock import new_id
from worker.settings import Settings, worker_settings

__all__ = [
    "ADMIN_PASSWORD",
    "RETENTION_DAYS",
    "admin_settings",
    "admin_url",
    "configure",
    "configure_state",
    "created_with",
    "settings_rows",
    "standin",
    "stored",
    "workspace",
]

ADMIN_PASSWORD = "admin-secret-9f3b"
RETENTION_DAYS = 30
_CREATE = re.compile(r"CREATE USER IF NOT EXISTS `\w+` IDENTIFIED WITH sha256_password BY '(.*)'")


@pytest.fixture
def standin(httpserver: HTTPServer) -> ClickHouseStandIn:
    """The stand-in ClickHouse, answering on pytest-httpserver's port."""
    handler = ClickHouseStandIn()
    httpserver.expect_request("/").respond_with_handler(handler)
    return handler


def admin_url(httpserver: HTTPServer) -> str:
    """The stand-in as an admin URL (its password is the admin's, not a workspace's)."""
    return f"http://admin:{ADMIN_PASSWORD}@127.0.0.1:{httpserver.port}/default"


@pytest.fixture
def admin_settings(
    control_db: str, httpserver: HTTPServer, standin: ClickHouseStandIn
) -> Iterator[Settings]:
    """The session's settings with the stand-in as the admin connection."""
    url = SecretStr(admin_url(httpserver))
    settings = worker_settings().model_copy(update={"clickhouse_admin_url": url})
    with installed_settings(settings):
        try:
            yield settings
        finally:
            close_cached_clients()


@pytest.fixture
def workspace(control_db: str) -> Iterator[str]:
    """A fresh workspace id with a quota row (30 days of logs); its rows removed afterwards."""
    workspace_id = new_id("ws")
    with engine_for(control_db).begin() as connection:
        connection.execute(
            sa.insert(quota).values(workspace_id=workspace_id, logs_retention_days=RETENTION_DAYS)
        )
    try:
        yield workspace_id
    finally:
        with engine_for(control_db).begin() as connection:
            for table in (clickhouse_workspace_settings, quota):
                connection.execute(sa.delete(table).where(table.c.workspace_id == workspace_id))


def settings_rows(workspace_id: str) -> list[sa.Row[Any]]:
    with engine_for(worker_settings().database_url()).connect() as connection:
        return list(
            connection.execute(
                sa.select(clickhouse_workspace_settings).where(
                    clickhouse_workspace_settings.c.workspace_id == workspace_id
                )
            )
        )


def stored(workspace_id: str) -> tuple[sa.Row[Any], str]:
    """The one settings row of the workspace and its decrypted password."""
    found = settings_rows(workspace_id)
    assert len(found) == 1
    password = vault_from_settings(worker_settings()).decrypt(
        workspace_id, found[0].password_encrypted
    )
    return found[0], password


def configure(**params: Any) -> Any:
    return asyncio.run(configure_clickhouse_user(**params))


def configure_state(**params: Any) -> State[Any]:
    """The call's final state (its flow run id, and the error when it failed)."""
    call: Any = configure_clickhouse_user(**params, return_state=True)
    state: State[Any] = asyncio.run(call)
    return state


def created_with(statements: list[str]) -> list[str]:
    return [m.group(1) for s in statements if (m := _CREATE.match(s))]
