"""Tests of tasks/clickhouse/: the analytics DDL, the request-count step and build output.

Everything runs on the real ClickHouse engine (chdb) in a temporary directory, installed as this
process's ``UNKEY_CLICKHOUSE_URL``. The step test runs a real flow on the session's Prefect
server, so the step's record and replay are Prefect's own.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from pydantic import SecretStr

from blocks.clickhouse import ClickHouseClient
from tasks.build.progress import BuildStep
from tasks.clickhouse.builds import record_build_logs, record_build_steps
from tasks.clickhouse.requests import fetch_request_counts
from tasks.clickhouse.schema import (
    ANALYTICS_TABLES,
    BILLABLE_RATELIMITS,
    BILLABLE_VERIFICATIONS,
    SENTINEL_REQUESTS,
    ensure_analytics_tables,
)
from tasks.db.previews import IdleCandidate
from tests.support.settings import installed_settings
from worker.kernel.errors import ConfigError
from worker.kernel.service import service_flow
from worker.kernel.steps import durable_call
from worker.settings import Settings

HOUR_MS = 3_600_000


@pytest.fixture
def clickhouse(chdb_analytics: ClickHouseClient) -> ClickHouseClient:
    """A chdb directory with the analytics tables, as this process's analytics ClickHouse."""
    return chdb_analytics


@pytest.fixture
def chdb_settings_with_prefect(clickhouse: ClickHouseClient, prefect_api) -> ClickHouseClient:
    """The analytics ClickHouse, with the session's Prefect server for flows."""
    return clickhouse


def _ids() -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    return {
        "workspace_id": f"ws_{tag}",
        "project_id": f"proj_{tag}",
        "environment_id": f"env_{tag}",
        "deployment_id": f"d_{tag}",
    }


def _request_rows(ids: dict[str, str], times: list[int], **override: str) -> list[tuple]:
    row = {**ids, **override}
    return [
        (
            f"req_{uuid.uuid4().hex}",
            at,
            row["workspace_id"],
            row["project_id"],
            row["environment_id"],
            row["deployment_id"],
            "GET",
            "app.example.test",
            "/",
            200,
            12,
        )
        for at in times
    ]


def _insert_requests(client: ClickHouseClient, rows: list[tuple]) -> None:
    client.insert(
        SENTINEL_REQUESTS,
        rows,
        [
            "request_id",
            "time",
            "workspace_id",
            "project_id",
            "environment_id",
            "deployment_id",
            "method",
            "host",
            "path",
            "response_status",
            "total_latency",
        ],
    )


# -- the DDL ---------------------------------------------------------------------------------------


def test_analytics_tables_are_created_once_with_the_reference_columns(
    clickhouse: ClickHouseClient,
) -> None:
    """ensure_analytics_tables is idempotent and creates every table with the column types the
    worker's queries rely on (unix-ms Int64 times, Int32 status, Int16/Int8 year/month)."""
    ensure_analytics_tables(clickhouse)  # the fixture ran it once already
    tables = {
        f"default.{name}"
        for (name,) in clickhouse.query("SELECT name FROM system.tables WHERE database = 'default'")
    }
    assert set(ANALYTICS_TABLES) <= tables
    columns = dict(
        ((table, column), kind)
        for table, column, kind in clickhouse.query(
            "SELECT table, name, type FROM system.columns WHERE database = 'default'"
        )
    )
    assert columns[("sentinel_requests_raw_v1", "time")] == "Int64"
    assert columns[("sentinel_requests_raw_v1", "response_status")] == "Int32"
    assert columns[("billable_verifications_per_month_v2", "year")] == "Int16"
    assert columns[("billable_ratelimits_per_month_v2", "month")] == "Int8"
    assert columns[("build_steps_v1", "cached")] == "Bool"
    assert columns[("build_step_logs_v1", "seq")] == "UInt64"


def test_quota_query_of_the_reference_sums_both_billable_tables(
    clickhouse: ClickHouseClient,
) -> None:
    """The reference's usage query (§9) runs on these tables: verifications and ratelimits of
    the month are summed per workspace (several rows of one key too), other months ignored."""
    heavy, light = f"ws_{uuid.uuid4().hex[:8]}", f"ws_{uuid.uuid4().hex[:8]}"
    columns = ["year", "month", "workspace_id", "count"]
    clickhouse.insert(
        BILLABLE_VERIFICATIONS,
        [(2031, 5, heavy, 100_000), (2031, 5, heavy, 50_000), (2031, 4, heavy, 900_000)],
        columns,
    )
    clickhouse.insert(BILLABLE_RATELIMITS, [(2031, 5, heavy, 150_000)], columns)
    clickhouse.insert(BILLABLE_VERIFICATIONS, [(2031, 5, light, 149_999)], columns)
    rows = clickhouse.query(
        "SELECT workspace_id, sum(count) total FROM ("
        f" SELECT workspace_id, sum(count) count FROM {BILLABLE_VERIFICATIONS}"
        "  WHERE year = {year:Int16} AND month = {month:Int8} GROUP BY workspace_id"
        " UNION ALL"
        f" SELECT workspace_id, sum(count) count FROM {BILLABLE_RATELIMITS}"
        "  WHERE year = {year:Int16} AND month = {month:Int8} GROUP BY workspace_id)"
        " WHERE workspace_id IN {ids:Array(String)}"
        " GROUP BY workspace_id HAVING total >= 150000",
        {"year": 2031, "month": 5, "ids": [heavy, light]},
    )
    assert rows == [(heavy, 300_000)]


# -- the request count ----------------------------------------------------------------------------


def test_request_count_counts_the_deployments_rows_inside_the_window(
    clickhouse: ClickHouseClient,
) -> None:
    """Only rows of this workspace/project/environment/deployment at or after since_ms count:
    not earlier rows, not other deployments, not the same deployment id in another workspace."""
    ids, since = _ids(), 1_900_000_000_000
    _insert_requests(clickhouse, _request_rows(ids, [since, since + 1, since + HOUR_MS]))
    _insert_requests(clickhouse, _request_rows(ids, [since - 1, since - 7 * HOUR_MS]))
    _insert_requests(clickhouse, _request_rows(ids, [since + 5], deployment_id="d_other"))
    _insert_requests(clickhouse, _request_rows(ids, [since + 5], workspace_id="ws_other"))
    _insert_requests(clickhouse, _request_rows(ids, [since + 5], environment_id="env_other"))
    quiet = {**ids, "deployment_id": "d_quiet"}
    page = [_candidate(ids), _candidate(quiet)]
    assert fetch_request_counts.fn(0, page, since) == {ids["deployment_id"]: 3}
    assert fetch_request_counts.fn(0, page, since + 2) == {ids["deployment_id"]: 1}
    assert fetch_request_counts.fn(0, [], since) == {}


def _candidate(ids: dict[str, str]) -> IdleCandidate:
    return IdleCandidate(
        id=ids["deployment_id"],
        workspace_id=ids["workspace_id"],
        project_id=ids["project_id"],
        environment_id=ids["environment_id"],
    )


@service_flow("test_clickhouse_request_count")
async def count_flow(ids: dict[str, str], since_ms: int) -> int:
    counts = fetch_request_counts(0, [_candidate(ids)], since_ms)
    return counts.get(ids["deployment_id"], 0)


def test_request_count_is_replayed_within_one_call(
    chdb_settings_with_prefect: ClickHouseClient,
) -> None:
    """The count is a durable step: the same call replays its recorded value even after new
    requests arrived; a new call counts again."""
    client, ids, since = chdb_settings_with_prefect, _ids(), time.time_ns() // 1_000_000
    _insert_requests(client, _request_rows(ids, [since + 1]))
    key = f"count-replay-{ids['deployment_id']}"
    with durable_call(key):
        assert asyncio.run(count_flow(ids=ids, since_ms=since)) == 1
    _insert_requests(client, _request_rows(ids, [since + 2, since + 3]))
    with durable_call(key):
        assert asyncio.run(count_flow(ids=ids, since_ms=since)) == 1
    assert asyncio.run(count_flow(ids=ids, since_ms=since)) == 3


def test_request_count_without_clickhouse_is_a_config_error() -> None:
    """With ClickHouse off (UNKEY_CLICKHOUSE_URL empty) the count is refused (terminal), never
    taken as 0, which would put every preview deployment on standby."""
    with (
        installed_settings(Settings(_env_file=None, clickhouse_url=SecretStr(""))),
        pytest.raises(ConfigError, match="UNKEY_CLICKHOUSE_URL"),
    ):
        fetch_request_counts.fn(0, [_candidate(_ids())], 0)


# -- build output ---------------------------------------------------------------------------------


def _build() -> dict[str, str]:
    ids = _ids()
    return {
        "build_id": f"build_{uuid.uuid4().hex[:10]}",
        "deployment_id": ids["deployment_id"],
        "workspace_id": ids["workspace_id"],
        "project_id": ids["project_id"],
    }


# Recent times: the tables' TTL (3 months) drops older rows as they are inserted.
T0 = time.time_ns() // 1_000_000
STEPS = [
    BuildStep(1, "[internal] load build definition", T0, T0 + 10, False, None, False),
    BuildStep(2, "[1/2] FROM alpine", T0 + 10, T0 + 20, True, None, False),
    BuildStep(3, "[2/2] RUN make", T0 + 20, None, False, "exit code: 2", True),
]
LINES = [
    '#0 building with "default" instance using docker driver',
    "#1 [internal] load build definition",
    "#1 DONE 0.0s",
    "#3 [2/2] RUN make",
    "#3 0.215 it's a 'quoted' \\ line",
    "#3 ERROR: exit code: 2",
]


def test_build_steps_are_stored_as_the_original_rows(clickhouse: ClickHouseClient) -> None:
    """Each BuildKit step becomes one build_steps_v1 row keyed by its vertex number; a step that
    never ended has completed_at 0 and no error is ''."""
    build = _build()
    record_build_steps(clickhouse, **build, steps=STEPS)
    rows = clickhouse.query(
        "SELECT step_id, deployment_id, started_at, completed_at, name, cached, error, has_logs "
        "FROM default.build_steps_v1 WHERE build_id = {b:String} ORDER BY step_id",
        {"b": build["build_id"]},
    )
    deployment = build["deployment_id"]
    assert rows == [
        ("1", deployment, T0, T0 + 10, "[internal] load build definition", False, "", False),
        ("2", deployment, T0 + 10, T0 + 20, "[1/2] FROM alpine", True, "", False),
        ("3", deployment, T0 + 20, 0, "[2/2] RUN make", False, "exit code: 2", True),
    ]


def test_build_log_lines_keep_their_order_and_step(clickhouse: ClickHouseClient) -> None:
    """Every output line is stored once with its position and the vertex it belongs to ('' for
    buildx's own notes), its text unchanged."""
    build = _build()
    record_build_logs(clickhouse, **build, lines=LINES, time_ms=1_900_000_000_000)
    rows = clickhouse.query(
        "SELECT seq, step_id, time, message FROM default.build_step_logs_v1 "
        "WHERE build_id = {b:String} ORDER BY seq",
        {"b": build["build_id"]},
    )
    assert rows == [
        (seq, step, 1_900_000_000_000, line)
        for seq, (step, line) in enumerate(zip(["", "1", "1", "3", "3", "3"], LINES, strict=True))
    ]


def test_retried_build_batches_are_stored_once(clickhouse: ClickHouseClient) -> None:
    """A batch sent again with the same rows (a retry after a lost answer) is deduplicated by
    the tables' deduplication window: no step or line is stored twice."""
    build = _build()
    for _ in range(2):
        record_build_steps(clickhouse, **build, steps=STEPS)
        record_build_logs(clickhouse, **build, lines=LINES, time_ms=1_900_000_000_000)
    for table in ("build_steps_v1", "build_step_logs_v1"):
        counted = clickhouse.query(
            f"SELECT count() FROM default.{table} WHERE build_id = {{b:String}}",
            {"b": build["build_id"]},
        )
        assert counted == [(len(STEPS) if table == "build_steps_v1" else len(LINES),)]


def test_empty_build_output_writes_nothing(clickhouse: ClickHouseClient) -> None:
    """A build without steps or lines inserts no rows (and sends no statement)."""
    build = _build()
    record_build_steps(clickhouse, **build, steps=[])
    record_build_logs(clickhouse, **build, lines=[])
    assert clickhouse.query(
        "SELECT count() FROM default.build_steps_v1 WHERE build_id = {b:String}",
        {"b": build["build_id"]},
    ) == [(0,)]
