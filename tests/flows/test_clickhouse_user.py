"""ClickhouseUserService (flows/clickhouse_user.py) through the flow, on MariaDB, the session's
Prefect server, the local vault and a stand-in for ClickHouse's HTTP interface as
``UNKEY_CLICKHOUSE_ADMIN_URL`` (``tests.support.clickhouse_standin``): the statements
clickhouse-connect really sends are recorded and the stand-in keeps ClickHouse's user/password
semantics. No server here can run ``CREATE USER`` (chdb cannot either): the statements' syntax
and the row-policy predicates are checked in tests/tasks/test_clickhouse_users.py.

Each test seeds its own ``ws_<random>`` workspace quota row and removes its rows after.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Iterator
from typing import Any
from uuid import UUID

import pytest

from blocks.clickhouse import ClickHouseQueryError
from flows.clickhouse_user import configure_clickhouse_user
from tasks.clickhouse.users import DEFAULT_LIMITS, UserLimits, user_statements
from tests.flows.clickhouse_user_support import (
    RETENTION_DAYS,
    configure,
    configure_state,
    settings_rows,
    stored,
)
from tests.flows.helpers import fails_at_once
from tests.support.clickhouse_standin import ClickHouseStandIn, Failure
from tests.support.fixtures import PrefectApi
from tests.support.settings import installed_settings
from worker.kernel.errors import ConfigError, InvalidParameterError
from worker.settings import Settings, worker_settings

pytestmark = pytest.mark.mysql


def test_a_new_user_gets_a_row_a_user_a_quota_and_a_profile(
    admin_settings: Settings, standin: ClickHouseStandIn, workspace: str
) -> None:
    """The original's first integration test: a new workspace gets a settings row (username =
    workspace id, default limits, the password only as ciphertext) and, over the admin
    connection, exactly the generated statements in order: the user with that password, its
    row policies with the workspace's retention, quota, profile, revoke and grants."""
    result = configure(workspace_id=workspace)

    assert result == {"workspace_id": workspace, "username": workspace, "created": True}
    row, password = stored(workspace)
    assert row.username == workspace
    assert password not in row.password_encrypted and len(password) == 64
    assert {name: row._mapping[name] for name in DEFAULT_LIMITS.as_row()} == (
        DEFAULT_LIMITS.as_row()
    )
    expected = user_statements(workspace, password, DEFAULT_LIMITS, RETENTION_DAYS)
    assert standin.statements == [s.sql for s in expected]
    assert standin.users == {workspace: password}
    assert any(s.startswith("CREATE QUOTA OR REPLACE") for s in standin.statements)
    assert any(s.startswith("CREATE SETTINGS PROFILE OR REPLACE") for s in standin.statements)
    assert f"workspace_id = '{workspace}'" in standin.statements[2]
    assert f"INTERVAL {RETENTION_DAYS} DAY" in standin.statements[2]


def test_a_second_call_keeps_the_password_and_applies_new_limits(
    admin_settings: Settings, standin: ClickHouseStandIn, workspace: str
) -> None:
    """The original's second integration test: a second call keeps ``password_encrypted``,
    stores max_queries_per_window=2000 and sends a quota with it; ``created`` is false."""
    configure(workspace_id=workspace)
    before, password = stored(workspace)
    start = len(standin.statements)

    result = configure(workspace_id=workspace, max_queries_per_window=2000)

    after, same_password = stored(workspace)
    assert result["created"] is False
    assert after.password_encrypted == before.password_encrypted and same_password == password
    assert after.max_queries_per_window == 2000
    limits = UserLimits(max_queries_per_window=2000)
    expected = user_statements(workspace, password, limits, RETENTION_DAYS)
    assert standin.sent_since(start) == [s.sql for s in expected]
    assert any("MAX queries = 2000" in s for s in standin.sent_since(start))


def test_a_lost_or_reset_user_is_recreated_with_the_stored_password(
    admin_settings: Settings, standin: ClickHouseStandIn, workspace: str
) -> None:
    """(fix) A user that exists in the table but not in ClickHouse is created again with the
    stored password, and a user whose password was changed in ClickHouse gets the stored one
    back; the row is not touched."""
    configure(workspace_id=workspace)
    row, password = stored(workspace)

    standin.users.clear()  # the user was lost (a ClickHouse restore, a manual DROP USER)
    configure(workspace_id=workspace)
    assert standin.users == {workspace: password}

    standin.users[workspace] = "Changed-by-someone-1234"  # reset behind the worker's back
    configure(workspace_id=workspace)
    assert standin.users == {workspace: password}
    assert stored(workspace)[0].password_encrypted == row.password_encrypted


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        if record.exc_info:
            self.lines.append("".join(traceback.format_exception(*record.exc_info)))


@pytest.fixture
def all_logs() -> Iterator[_Records]:
    """Every log record of the test (DEBUG and up, Prefect's run loggers included)."""
    handler = _Records()
    loggers = [logging.getLogger(n) for n in ("", "prefect", "werkzeug", "clickhouse_connect")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)


async def _api_texts(flow_run_ids: list[UUID]) -> list[str]:
    """What the Prefect API holds about the runs: parameters, states, task runs, artifacts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    texts: list[str] = []
    async with get_client() as client:
        only = FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids))
        for run_id in flow_run_ids:
            run = await client.read_flow_run(run_id)
            texts.append(run.model_dump_json())
            states = await client.read_flow_run_states(run_id)
            texts += [s.model_dump_json() for s in states]
        texts += [t.model_dump_json() for t in await client.read_task_runs(flow_run_filter=only)]
        texts += [a.model_dump_json() for a in await client.read_artifacts(flow_run_filter=only)]
    return texts


def test_the_password_appears_nowhere_in_plaintext(
    prefect_api: PrefectApi,
    admin_settings: Settings,
    standin: ClickHouseStandIn,
    workspace: str,
    all_logs: _Records,
) -> None:
    """After a successful call and one that ClickHouse refuses with an error quoting the
    statement, the password is in no settings column but the ciphertext, no result file, no
    log record (the statements are logged with ``[HIDDEN]``), no request URL, nothing the
    Prefect API holds (runs, states, task runs, artifacts) and not in the error or its
    traceback; the error names the statement and ClickHouse's code."""
    ok = configure_state(workspace_id=workspace)
    row, password = stored(workspace)
    standin.failures["ALTER USER"] = Failure(400, "62", "Code: 62. Syntax error: failed at ({sql})")
    failed = configure_state(workspace_id=workspace)
    error = failed.result(raise_on_failure=False)

    assert ok.is_completed() and failed.is_failed()
    assert isinstance(error, ClickHouseQueryError) and error.code == 62
    assert str(error).startswith(f"ALTER USER `{workspace}`") and "***" in str(error)
    error_text = "".join(traceback.format_exception(error)) + repr(error)
    assert any(password in s for s in standin.statements)  # it did reach "ClickHouse"
    assert password not in error_text
    columns = {k: v for k, v in row._mapping.items() if k != "password_encrypted"}
    assert password not in str(columns)
    hits = [
        p
        for p in (prefect_api.state_dir / "results").rglob("*")
        if p.is_file() and password.encode() in p.read_bytes()
    ]
    assert hits == []
    assert any("[HIDDEN]" in line for line in all_logs.lines), "the statements were not logged"
    assert not [line for line in all_logs.lines if password in line]
    assert not [url for url in standin.urls if password in url]
    run_ids = [s.state_details.flow_run_id for s in (ok, failed)]
    texts = asyncio.run(_api_texts([r for r in run_ids if r is not None]))
    assert len(texts) > 4 and not [t for t in texts if password in t]


def test_a_failed_revoke_is_only_logged(
    admin_settings: Settings, standin: ClickHouseStandIn, workspace: str, all_logs: _Records
) -> None:
    """As the original: a refused ``REVOKE ALL`` is logged as a warning and the grants still
    follow; the call succeeds."""
    standin.failures["REVOKE ALL"] = Failure(403, "497", "Code: 497. ACCESS_DENIED")

    configure(workspace_id=workspace)

    grants = [s for s in standin.statements if s.startswith("GRANT SELECT")]
    assert len(grants) == 9
    assert any(
        "REVOKE ALL ON *.* FROM" in line and "ACCESS_DENIED" in line for line in all_logs.lines
    )


def _nothing_written(workspace: str, standin: ClickHouseStandIn) -> None:
    assert settings_rows(workspace) == []
    assert standin.statements == [] and standin.urls == []


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"workspace_id": ""}, "workspace_id"),
        ({"workspace_id": "ws-1"}, "workspace_id"),
        ({"workspace_id": "ws'; DROP USER default; --"}, "workspace_id"),
        ({"workspace_id": "ws`1"}, "workspace_id"),
        ({"workspace_id": 17}, "workspace_id"),
        ({"quota_duration_seconds": 2**31}, "quota_duration_seconds"),
        ({"max_queries_per_window": "1000"}, "max_queries_per_window"),
        ({"max_execution_time_per_window": True}, "max_execution_time_per_window"),
        ({"max_query_execution_time": 1.5}, "max_query_execution_time"),
        ({"max_query_memory_bytes": 2**63}, "max_query_memory_bytes"),
        ({"max_query_result_rows": -(2**31) - 1}, "max_query_result_rows"),
    ],
)
def test_bad_parameters_fail_at_once_with_nothing_written(
    admin_settings: Settings,
    standin: ClickHouseStandIn,
    workspace: str,
    params: dict[str, Any],
    parameter: str,
) -> None:
    """A workspace id outside ``[A-Za-z0-9_]+``, a wrong type or a limit beyond the original's
    int32/int64 fields fails at once naming the parameter: no row, nothing sent to ClickHouse.
    (Zero and negative limits are not errors: they take the defaults, as in the original.)"""
    call = {"workspace_id": workspace, **params}
    error = fails_at_once(InvalidParameterError, configure_clickhouse_user, **call)

    assert error.parameter == parameter
    _nothing_written(workspace, standin)


def test_disabled_without_the_admin_url(
    control_db: str, standin: ClickHouseStandIn, workspace: str
) -> None:
    """Without ``UNKEY_CLICKHOUSE_ADMIN_URL`` the call fails at once with a ConfigError naming
    it; nothing is written."""
    settings = worker_settings().model_copy(update={"clickhouse_admin_url": None})
    with installed_settings(settings):
        error = fails_at_once(ConfigError, configure_clickhouse_user, workspace_id=workspace)

    assert "UNKEY_CLICKHOUSE_ADMIN_URL" in str(error)
    _nothing_written(workspace, standin)


def test_disabled_with_a_remote_vault_without_its_token(
    admin_settings: Settings, standin: ClickHouseStandIn, workspace: str
) -> None:
    """A remote vault without ``UNKEY_VAULT_TOKEN`` fails the call at once with a ConfigError
    naming the variable, before anything is written or sent."""
    settings = worker_settings().model_copy(update={"vault_url": "http://127.0.0.1:9/vault"})
    with installed_settings(settings):
        error = fails_at_once(ConfigError, configure_clickhouse_user, workspace_id=workspace)

    assert "UNKEY_VAULT_TOKEN" in str(error)
    _nothing_written(workspace, standin)
