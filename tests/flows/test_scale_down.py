"""DeployService.ScaleDownIdlePreviewDeployments: the original's 8 tests (reference §2.4).

Request counts come from a real ClickHouse engine (chdb in a temporary directory, the
``default.sentinel_requests_raw_v1`` table the worker creates); deployments live in the
session's MariaDB. The sweep scans every preview environment of the database, so each test
asserts on the deployments it seeded and removes them after.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from blocks.clickhouse import ClickHouseClient
from flows.deploy import scale_down_idle_preview_deployments
from tasks.clickhouse.schema import SENTINEL_REQUESTS
from tasks.db.engine import engine_for
from tasks.db.schema import deployments, environments, projects, workspaces
from tests.support.deploy_seed import (
    DeploySeed,
    add_deployment,
    cleanup_deploy,
    seed_deploy,
    set_project,
)
from worker.kernel.clock import now_ms

pytestmark = pytest.mark.mysql

HOUR_MS = 3_600_000


@pytest.fixture
def clickhouse(control_db, chdb_analytics: ClickHouseClient) -> ClickHouseClient:
    """The analytics ClickHouse (chdb), installed with the control DB's settings."""
    return chdb_analytics


@pytest.fixture
def seeds(control_db) -> Iterator[list[DeploySeed]]:
    made: list[DeploySeed] = []
    yield made
    for seed in made:
        cleanup_deploy(seed)


def _environment(url: str, seeds: list[DeploySeed], slug: str = "preview") -> DeploySeed:
    seed = seed_deploy(url, environment_slug=slug, regions=0, commit_sha=None, branch=None)
    seed.deployment_ids.clear()
    seed.ids.deployments.clear()
    seeds.append(seed)
    return seed


def _deployment(
    seed: DeploySeed, *, status: str = "ready", age_h: float = 8, updated_h: float | None = 8
) -> str:
    at = now_ms()
    return add_deployment(
        seed,
        status=status,
        created_at=at - int(age_h * HOUR_MS),
        updated_at=None if updated_h is None else at - int(updated_h * HOUR_MS),
    )


def _requests(client: ClickHouseClient, seed: DeploySeed, deployment_id: str, count: int) -> None:
    at = now_ms()
    rows = [
        (
            f"req_{uuid.uuid4().hex}",
            at - i * 1000,
            seed.workspace_id,
            seed.project_id,
            seed.environment_id,
            deployment_id,
        )
        for i in range(count)
    ]
    client.insert(
        SENTINEL_REQUESTS,
        rows,
        ["request_id", "time", "workspace_id", "project_id", "environment_id", "deployment_id"],
    )


def _states(url: str, ids: list[str]) -> dict[str, str]:
    with engine_for(url).connect() as connection:
        rows = connection.execute(
            sa.select(deployments.c.id, deployments.c.desired_state).where(
                deployments.c.id.in_(ids)
            )
        )
        return {row.id: row.desired_state for row in rows}


def _sweep() -> dict[str, object]:
    return asyncio.run(scale_down_idle_preview_deployments())


def test_idle_preview_deployment_goes_to_standby(control_db, clickhouse, seeds) -> None:
    """A ready preview deployment created and updated 8 h ago with no requests: standby."""
    deployment = _deployment(_environment(control_db, seeds))

    result = _sweep()

    assert _states(control_db, [deployment]) == {deployment: "standby"}
    assert deployment in result["scaled_down"]  # type: ignore[operator]


def test_recent_requests_keep_it_running(control_db, clickhouse, seeds) -> None:
    """Requests in the last 6 h keep an otherwise idle preview deployment running."""
    seed = _environment(control_db, seeds)
    deployment = _deployment(seed)
    _requests(clickhouse, seed, deployment, 3)

    _sweep()

    assert _states(control_db, [deployment]) == {deployment: "running"}


def test_non_preview_environment_is_ignored(control_db, clickhouse, seeds) -> None:
    """An idle deployment of a non-preview environment is never scaled down."""
    deployment = _deployment(_environment(control_db, seeds, slug="staging"))

    _sweep()

    assert _states(control_db, [deployment]) == {deployment: "running"}


def test_deployment_that_is_not_ready_is_ignored(control_db, clickhouse, seeds) -> None:
    """A preview deployment that is not ready (here: failed) is left alone."""
    deployment = _deployment(_environment(control_db, seeds), status="failed")

    _sweep()

    assert _states(control_db, [deployment]) == {deployment: "running"}


def test_recently_created_deployment_is_ignored(control_db, clickhouse, seeds) -> None:
    """A preview deployment created less than 6 h ago is left alone."""
    deployment = _deployment(_environment(control_db, seeds), age_h=1, updated_h=None)

    _sweep()

    assert _states(control_db, [deployment]) == {deployment: "running"}


def test_recently_updated_deployment_is_ignored(control_db, clickhouse, seeds) -> None:
    """A preview deployment updated less than 6 h ago is left alone."""
    deployment = _deployment(_environment(control_db, seeds), age_h=10, updated_h=1)

    _sweep()

    assert _states(control_db, [deployment]) == {deployment: "running"}


def test_mixed_environments_scale_down_only_the_idle(control_db, clickhouse, seeds) -> None:
    """Across preview and other environments, only the idle preview deployments change."""
    preview = _environment(control_db, seeds)
    idle = _deployment(preview)
    busy = _deployment(preview)
    _requests(clickhouse, preview, busy, 1)
    fresh = _deployment(preview, age_h=2, updated_h=None)
    production = _deployment(_environment(control_db, seeds, slug="production"))

    _sweep()

    assert _states(control_db, [idle, busy, fresh, production]) == {
        idle: "standby",
        busy: "running",
        fresh: "running",
        production: "running",
    }


def _bulk_preview_deployments(url: str, count: int) -> tuple[str, list[str], list[str]]:
    """One workspace with ``count`` projects, each with a preview environment holding one idle
    ready deployment (bulk inserts: the sweep is what is measured, not the seeding)."""
    tag = uuid.uuid4().hex[:8]
    workspace = f"ws_bulk_{tag}"
    at = now_ms() - 8 * HOUR_MS
    project_ids = [f"proj_{tag}_{i}" for i in range(count)]
    environment_ids = [f"env_{tag}_{i}" for i in range(count)]
    deployment_ids = [f"d_{tag}_{i}" for i in range(count)]
    with engine_for(url).begin() as connection:
        connection.execute(
            workspaces.insert().values(
                id=workspace,
                org_id=f"org_{tag}",
                name="bulk",
                slug=f"bulk{tag}",
                beta_features={},
                features={},
            )
        )
        connection.execute(
            projects.insert(),
            [
                {"id": p, "workspace_id": workspace, "name": p, "slug": p, "created_at": at}
                for p in project_ids
            ],
        )
        connection.execute(
            environments.insert(),
            [
                {
                    "id": e,
                    "workspace_id": workspace,
                    "project_id": p,
                    "slug": "preview",
                    "sentinel_config": b"",
                    "created_at": at,
                }
                for p, e in zip(project_ids, environment_ids, strict=True)
            ],
        )
        connection.execute(
            deployments.insert(),
            [
                {
                    "id": d,
                    "k8s_name": d.replace("_", "-"),
                    "workspace_id": workspace,
                    "project_id": p,
                    "environment_id": e,
                    "sentinel_config": b"",
                    "cpu_millicores": 256,
                    "memory_mib": 256,
                    "encrypted_environment_variables": b"",
                    "status": "ready",
                    "created_at": at,
                    "updated_at": at,
                }
                for p, e, d in zip(project_ids, environment_ids, deployment_ids, strict=True)
            ],
        )
    return workspace, project_ids, deployment_ids


@pytest.mark.slow
def test_two_thousand_preview_environments_are_paginated_and_all_scaled_down(
    control_db, clickhouse
) -> None:
    """2000 preview environments (20 pages of 100) with an idle deployment each: every one
    of them is scaled down."""
    workspace, project_ids, deployment_ids = _bulk_preview_deployments(control_db, 2000)
    try:
        result = _sweep()

        states = _states(control_db, deployment_ids)
        assert set(states.values()) == {"standby"} and len(states) == 2000
        assert set(deployment_ids) <= set(result["scaled_down"])  # type: ignore[arg-type]
    finally:
        with engine_for(control_db).begin() as connection:
            for table, column in (
                (deployments, deployments.c.id.in_(deployment_ids)),
                (environments, environments.c.project_id.in_(project_ids)),
                (projects, projects.c.id.in_(project_ids)),
                (workspaces, workspaces.c.id == workspace),
            ):
                connection.execute(sa.delete(table).where(column))


def test_live_idle_preview_deployment_is_left_running(control_db, clickhouse, seeds) -> None:
    """DeploymentService refuses to change a project's live deployment: an idle preview
    deployment that is live stays running, and the rest of its page is still scaled down."""
    live_seed = _environment(control_db, seeds)
    live = _deployment(live_seed)
    set_project(control_db, live_seed.project_id, live_deployment_id=live)
    other = _deployment(_environment(control_db, seeds))

    result = _sweep()

    assert _states(control_db, [live, other]) == {live: "running", other: "standby"}
    assert live not in result["scaled_down"]  # type: ignore[operator]
