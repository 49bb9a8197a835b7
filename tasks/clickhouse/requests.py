"""Request counts of deployments, for the idle-preview scale-down (reference §2.4 step 4).

The original asked once per deployment (``Run("fetch request count for <dep>")``:
``SELECT toInt64(count()) FROM default.sentinel_requests_raw_v1 WHERE workspace_id/project_id/
environment_id/deployment_id match AND time >= now-6h (ms)``). Here one query counts a whole
page of candidates, grouped by deployment: the same rows, the same window, one durable step per
page. ``since_ms`` is the caller's recorded cutoff, so a replayed call asks about the same
window, and the step replays its counts within one call.
"""

from __future__ import annotations

from collections.abc import Sequence

from blocks.clickhouse import analytics_client
from tasks.clickhouse.schema import SENTINEL_REQUESTS
from tasks.db.previews import IdleCandidate
from worker.kernel.errors import ConfigError
from worker.kernel.steps import step
from worker.settings import env_name

__all__ = ["REQUEST_COUNTS_SQL", "fetch_request_counts"]

REQUEST_COUNTS_SQL = (
    f"SELECT deployment_id, toInt64(count()) FROM {SENTINEL_REQUESTS} "
    "WHERE (workspace_id, project_id, environment_id, deployment_id) IN "
    "{keys:Array(Tuple(String, String, String, String))} AND time >= {since:Int64} "
    "GROUP BY deployment_id"
)


@step(
    name="fetch request counts",
    key=("after_pk",),
    run_name="fetch request counts for preview page after {after_pk}",
)
def fetch_request_counts(
    after_pk: int, candidates: Sequence[IdleCandidate], since_ms: int
) -> dict[str, int]:
    """Requests each candidate deployment served at or after ``since_ms``.

    Args:
        after_pk: the page of preview environments the candidates belong to (the step's key).
        candidates: deployments with ``id``, ``workspace_id``, ``project_id``,
            ``environment_id``.
        since_ms: the window's start (unix ms, inclusive).

    Returns:
        ``{deployment id: request count}`` for the deployments with at least one request.

    Raises:
        ConfigError: ClickHouse is off (``UNKEY_CLICKHOUSE_URL``; a missing count is never a zero:
            the scale-down would take every preview deployment for idle).
        ClickHouseQueryError: the query was refused (no table, no privilege).
        ClickHouseUnavailableError: ClickHouse could not answer now (retried).
    """
    if not candidates:
        return {}
    client = analytics_client()
    if client is None:
        raise ConfigError(
            f"ClickHouse is off ({env_name('clickhouse_url')}): request counts are unknown"
        )
    keys = [(c["workspace_id"], c["project_id"], c["environment_id"], c["id"]) for c in candidates]
    rows = client.query(REQUEST_COUNTS_SQL, {"keys": keys, "since": since_ms})
    return {str(deployment_id): int(count) for deployment_id, count in rows}
