"""Billable usage of workspaces in a month, for the quota check (reference §9.1 step 3).

Usage = billable verifications + billable ratelimits of the year and month (both
SummingMergeTree tables, so rows of one key are summed). As the original, one query asks for
every workspace at or above the 150 000 floor (below it a workspace is never flagged), once
per check, in one durable step: the check then reads those workspaces' quotas page by page.
"""

from __future__ import annotations

from blocks.clickhouse import analytics_client
from tasks.clickhouse.schema import BILLABLE_RATELIMITS, BILLABLE_VERIFICATIONS
from worker.kernel.errors import ConfigError
from worker.kernel.steps import step
from worker.settings import env_name

__all__ = ["USAGE_FLOOR", "USAGE_SQL", "fetch_billable_usage"]

USAGE_FLOOR = 150_000  # below it a workspace is never flagged, whatever its quota

_PART = (
    "SELECT workspace_id, sum(count) AS total FROM {table} "
    "WHERE year = {{year:Int16}} AND month = {{month:Int8}} GROUP BY workspace_id"
)
USAGE_SQL = (
    "SELECT workspace_id, toInt64(sum(total)) AS usage FROM ("
    f"{_PART.format(table=BILLABLE_VERIFICATIONS)} UNION ALL "
    f"{_PART.format(table=BILLABLE_RATELIMITS)}"
    ") GROUP BY workspace_id HAVING usage >= {floor:Int64}"
)


@step(name="get billable usage")
def fetch_billable_usage(year: int, month: int) -> dict[str, int]:
    """Usage in ``year``-``month`` of every workspace at or above the floor (one query).

    Args:
        year: the billing year.
        month: the billing month (1-12).

    Returns:
        ``{workspace id: verifications + ratelimits}`` for those with usage ≥ 150 000.

    Raises:
        ConfigError: ClickHouse is off (a missing usage is never a zero).
        ClickHouseQueryError: the query was refused (no table, no privilege).
        ClickHouseUnavailableError: ClickHouse could not answer now (retried).
    """
    client = analytics_client()
    if client is None:
        raise ConfigError(f"ClickHouse is off ({env_name('clickhouse_url')}): usage is unknown")
    rows = client.query(USAGE_SQL, {"year": year, "month": month, "floor": USAGE_FLOOR})
    return {str(workspace_id): int(usage) for workspace_id, usage in rows}
