"""The analytics tables the worker reads and writes, as the original's ClickHouse schema has them.

The worker does not own these tables in production (the platform's migrations create them);
``ensure_analytics_tables`` creates whichever are missing, for the embedded chdb default and the
tests, with ``CREATE TABLE IF NOT EXISTS`` (idempotent, safe to run from several processes).

- ``sentinel_requests_raw_v1``: one row per request a sentinel proxied; ``time`` is unix ms.
  The idle-preview scale-down counts a deployment's rows since a cutoff (reference §2.4).
- ``billable_verifications_per_month_v2`` / ``billable_ratelimits_per_month_v2``: monthly
  billable counts per workspace (SummingMergeTree: rows of one key add up on merge, so readers
  ``sum(count)``); the quota check sums both for a year and month (reference §9).
- ``build_steps_v1`` / ``build_step_logs_v1``: the deploy's build output (BuildKit steps and
  their log lines). ``build_id`` is added to both (the original keyed them by deployment only);
  ``seq`` orders the lines of one build, as the original's later ``seq`` column does.

The build and request tables keep the original's ``non_replicated_deduplication_window``: an
insert batch retried with the same rows is stored once. TTLs are the original's (30 days for
requests, 3 months for builds).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing the block loads Prefect; the embedded init runs without it
    from blocks.clickhouse import ClickHouseClient

__all__ = [
    "ANALYTICS_TABLES",
    "BILLABLE_RATELIMITS",
    "BILLABLE_VERIFICATIONS",
    "BUILD_STEPS",
    "BUILD_STEP_LOGS",
    "SENTINEL_REQUESTS",
    "ensure_analytics_tables",
]

SENTINEL_REQUESTS = "default.sentinel_requests_raw_v1"
BILLABLE_VERIFICATIONS = "default.billable_verifications_per_month_v2"
BILLABLE_RATELIMITS = "default.billable_ratelimits_per_month_v2"
BUILD_STEPS = "default.build_steps_v1"
BUILD_STEP_LOGS = "default.build_step_logs_v1"

_DEDUPLICATE = "SETTINGS non_replicated_deduplication_window = 10000"

_SENTINEL_REQUESTS_DDL = f"""
CREATE TABLE IF NOT EXISTS {SENTINEL_REQUESTS} (
    request_id String,
    time Int64 CODEC(Delta, LZ4),
    workspace_id String,
    environment_id String,
    project_id String,
    sentinel_id String,
    deployment_id String,
    instance_id String,
    instance_address String,
    region LowCardinality(String),
    method LowCardinality(String),
    host String,
    path String,
    query_string String,
    request_headers Array(String),
    response_status Int32,
    response_headers Array(String),
    user_agent String,
    ip_address String,
    total_latency Int64,
    instance_latency Int64,
    sentinel_latency Int64,
    INDEX idx_request_id (request_id) TYPE bloom_filter GRANULARITY 1,
    INDEX idx_deployment_id (deployment_id) TYPE bloom_filter GRANULARITY 1
) ENGINE = MergeTree()
ORDER BY (workspace_id, project_id, environment_id, time, deployment_id)
TTL toDateTime(fromUnixTimestamp64Milli(time)) + toIntervalDay(30)
{_DEDUPLICATE}
"""


def _billable_ddl(table: str) -> str:
    return f"""
CREATE TABLE IF NOT EXISTS {table} (
    year Int16,
    month Int8,
    workspace_id String,
    count Int64
) ENGINE = SummingMergeTree()
ORDER BY (workspace_id, year, month)
"""


_BUILD_STEPS_DDL = f"""
CREATE TABLE IF NOT EXISTS {BUILD_STEPS} (
    step_id String,
    build_id String,
    deployment_id String,
    workspace_id String,
    project_id String,
    started_at Int64 CODEC(Delta(8), LZ4),
    completed_at Int64 CODEC(Delta(8), LZ4),
    name String,
    cached Bool,
    error String,
    has_logs Bool
) ENGINE = MergeTree()
ORDER BY (workspace_id, project_id, deployment_id, build_id)
TTL toDateTime(fromUnixTimestamp64Milli(started_at)) + toIntervalMonth(3)
{_DEDUPLICATE}
"""

_BUILD_STEP_LOGS_DDL = f"""
CREATE TABLE IF NOT EXISTS {BUILD_STEP_LOGS} (
    build_id String,
    step_id String,
    deployment_id String,
    workspace_id String,
    project_id String,
    time Int64 CODEC(Delta(8), LZ4),
    seq UInt64,
    message String
) ENGINE = MergeTree()
ORDER BY (workspace_id, project_id, deployment_id, build_id, seq)
TTL toDateTime(fromUnixTimestamp64Milli(time)) + toIntervalMonth(3)
{_DEDUPLICATE}
"""

ANALYTICS_TABLES: dict[str, str] = {
    SENTINEL_REQUESTS: _SENTINEL_REQUESTS_DDL,
    BILLABLE_VERIFICATIONS: _billable_ddl(BILLABLE_VERIFICATIONS),
    BILLABLE_RATELIMITS: _billable_ddl(BILLABLE_RATELIMITS),
    BUILD_STEPS: _BUILD_STEPS_DDL,
    BUILD_STEP_LOGS: _BUILD_STEP_LOGS_DDL,
}


def ensure_analytics_tables(client: ClickHouseClient) -> None:
    """Create every analytics table that does not exist yet (existing ones are left as is).

    Args:
        client: the analytics ClickHouse client.

    Raises:
        ClickHouseQueryError: a statement was refused (for example: no CREATE privilege).
        ClickHouseUnavailableError: ClickHouse could not answer now.
    """
    for ddl in ANALYTICS_TABLES.values():
        client.command(ddl)
