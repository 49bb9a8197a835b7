"""Request counts of preview deployments, for the idle-preview scale-down (reference §2.4).

The original asked ClickHouse once per deployment (a step each); here one query per page of
candidates counts them all, grouped by deployment: the same rows and the same window as the
original's ``SELECT toInt64(count()) FROM default.sentinel_requests_raw_v1 WHERE
workspace_id/project_id/environment_id/deployment_id match AND time >= since``.
"""

from __future__ import annotations

from collections.abc import Sequence

from tasks.db.previews import IdleCandidate
from worker.kernel.errors import ConfigError
from worker.kernel.steps import step

__all__ = ["COUNT_REQUESTS_SQL", "fetch_request_counts"]

COUNT_REQUESTS_SQL = (
    "SELECT deployment_id, toInt64(count()) FROM default.sentinel_requests_raw_v1 "
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
    """Requests each candidate deployment served since ``since_ms`` (absent: none).

    Args:
        after_pk: the page of preview environments the candidates belong to (the step's key).
        candidates: deployments with ``id``, ``workspace_id``, ``project_id``,
            ``environment_id``.
        since_ms: the window's start (unix ms).

    Returns:
        ``{deployment id: request count}`` for the deployments with at least one request.

    Raises:
        ConfigError: ClickHouse is not configured.
    """
    if not candidates:
        return {}
    # Imported here: the ClickHouse clients (chdb is a 500 MB engine) load only when a query
    # runs, not in every flow-run process that imports the deploy flows.
    from blocks.clickhouse import analytics_client

    client = analytics_client()
    if client is None:
        raise ConfigError("UNKEY_CLICKHOUSE_URL is not set: there are no request counts")
    keys = [(c["workspace_id"], c["project_id"], c["environment_id"], c["id"]) for c in candidates]
    rows = client.query(COUNT_REQUESTS_SQL, {"keys": keys, "since": since_ms})
    return {str(deployment_id): int(count) for deployment_id, count in rows}
