"""DeployService (flows/deploy.py): an image deploy end to end on the local data plane, the
wait's timeout, and the refusals of every new flow.

Deploys run in-process against the session's MariaDB and Prefect server, with the real local
data plane in a thread; a real worker (module scope) has registered the catalogue, so the calls
a deploy sends (the previous live deployment's standby) find their deployments. Each test
seeds its own workspace, project and environment in fresh regions and removes them after.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterName,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType

from flows.deploy import deploy, promote, rollback, scale_down_idle_preview_deployments
from tasks.db.deploys import failure_message
from tests.flows.deploy_support import deploy_settings, running_dataplane
from tests.flows.helpers import fails_at_once
from tests.support.deploy_seed import (
    DeploySeed,
    add_deployment,
    cleanup_deploy,
    deployment_row,
    policies_of,
    project_row,
    routes_of,
    seed_deploy,
    sentinels_of,
    set_project,
    topologies_of,
)
from worker.kernel.errors import InvalidParameterError, TerminalError

pytestmark = pytest.mark.mysql


@pytest.fixture
def seed(control_db) -> Iterator[DeploySeed]:
    """A production environment in two fresh regions with one pending deployment."""
    seeded = seed_deploy(control_db)
    try:
        yield seeded
    finally:
        cleanup_deploy(seeded)


async def _scheduled_standby_runs(previous: str) -> list[Any]:
    async with get_client() as client:
        runs = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["ctrl"])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
            ),
        )
    return [
        run
        for run in runs
        if run.parameters.get("deployment_id") == previous
        and run.parameters.get("state") == "standby"
    ]


async def _run_and_artifacts(deployment_id: str) -> tuple[list[Any], list[Any]]:
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"deploy-{deployment_id}"]))
        )
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run.id for run in runs])
            )
        )
    return runs, artifacts


def test_deploy_is_visible_in_the_ui(served, seed: DeploySeed) -> None:
    """A deploy's run is named after its deployment, its progress artifact ends at 100 %
    (every phase done), and its table artifact lists region, version, instances, domain and
    sticky for each region and domain."""
    with deploy_settings(), running_dataplane(seed.url, seed.regions):
        asyncio.run(deploy(deployment_id=seed.deployment_id, docker_image="nginx:1.27"))

    runs, artifacts = asyncio.run(_run_and_artifacts(seed.deployment_id))

    assert len(runs) == 1
    progress = [a for a in artifacts if a.type == "progress"]
    assert len(progress) == 1 and float(progress[0].data) == 100.0  # type: ignore[arg-type]
    tables = [a for a in artifacts if a.type == "table"]
    assert len(tables) == 1
    rows = tables[0].data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert {row["region"] for row in rows} == set(seed.regions)
    assert set(rows[0]) == {"region", "version", "instances", "domain", "sticky"}


def test_image_deploy_to_two_regions_reaches_ready(served, seed: DeploySeed) -> None:
    """An image deploy to two regions: `ready`; one topology row per region with distinct
    increasing versions; one sentinel per region (3 replicas in production); two Cilium policies
    per region; the original's exact FQDNs; every route on the deployment; the project's live
    deployment swapped; the previous live deployment's standby scheduled 30 min out."""
    url = seed.url
    previous = add_deployment(seed, status="ready")
    with deploy_settings(), running_dataplane(url, seed.regions):
        set_project(url, seed.project_id, live_deployment_id=previous)
        before = datetime.now(UTC)
        result = asyncio.run(deploy(deployment_id=seed.deployment_id, docker_image="nginx:1.27"))

    row = deployment_row(url, seed.deployment_id)
    assert (row.status, row.image) == ("ready", "nginx:1.27")
    topologies = topologies_of(url, seed.deployment_id)
    assert [t.region for t in topologies] == seed.regions
    assert all(t.desired_status == "starting" for t in topologies)
    sentinels = sentinels_of(url, seed.environment_id)
    assert [(s.region, s.desired_replicas) for s in sentinels] == [(r, 3) for r in seed.regions]
    policies = policies_of(url, seed.deployment_id)
    assert len(policies) == 4
    for region, topology, sentinel in zip(seed.regions, topologies, sentinels, strict=True):
        # One counter per region, shared by the three tables: distinct and increasing.
        policy_versions = sorted(int(p.version) for p in policies if p.region == region)
        versions = [int(topology.version), int(sentinel.version), *policy_versions]
        assert versions == sorted(set(versions)) and versions[0] >= 1, (region, versions)
    assert {(p.region, p.k8s_name.split("-to-")[0]) for p in policies} == {
        (r, kind) for r in seed.regions for kind in ("sentinel-ingress", "sentinel-egress")
    }
    sha7, ws, app = "0123456", seed.workspace_slug, seed.project_slug
    routes = routes_of(url, seed.project_id)
    commit = [fqdn for fqdn in routes if fqdn.startswith(f"{app}-git-{sha7}-")]
    assert len(commit) == 1 and commit[0].endswith(f"-{ws}.unkey.test")
    assert routes == {
        commit[0]: (seed.deployment_id, "none"),
        f"{app}-git-feature-login-page-{ws}.unkey.test": (seed.deployment_id, "branch"),
        f"{app}-production-{ws}.unkey.test": (seed.deployment_id, "environment"),
        f"{app}-{ws}.unkey.test": (seed.deployment_id, "live"),
    }
    project = project_row(url, seed.project_id)
    assert (project.live_deployment_id, project.is_rolled_back) == (seed.deployment_id, False)
    assert result["status"] == "ready" and result["previous_live"] == previous
    standby = asyncio.run(_scheduled_standby_runs(previous))
    assert len(standby) == 1
    due = standby[0].expected_start_time
    assert before + timedelta(minutes=29) < due < datetime.now(UTC) + timedelta(minutes=31)


def test_wait_timeout_leaves_the_deployment_failed_with_a_message(served, seed: DeploySeed) -> None:
    """A data plane that never reports instances does not hang the deploy: at the wait's
    timeout the call fails (terminal) and the give-up hook leaves the deployment `failed`
    with a message naming the region."""
    with deploy_settings(deploy_wait_timeout_seconds=1.0):
        error = fails_at_once(
            TerminalError, deploy, deployment_id=seed.deployment_id, docker_image="nginx:1.27"
        )

    assert "instance" in str(error)
    assert deployment_row(seed.url, seed.deployment_id).status == "failed"
    message = failure_message(seed.deployment_id)
    assert message is not None and any(region in message for region in seed.regions)


BAD_CALLS: list[tuple[Any, dict[str, Any], str]] = [
    (deploy, {"deployment_id": "", "docker_image": "nginx"}, "deployment_id"),
    (deploy, {"deployment_id": 12, "docker_image": "nginx"}, "deployment_id"),
    (deploy, {"deployment_id": "d_x"}, "docker_image"),
    (
        deploy,
        {
            "deployment_id": "d_x",
            "docker_image": "nginx",
            "git": {"installation_id": 1, "repository": "a/b", "commit_sha": "abcdef0"},
        },
        "docker_image",
    ),
    (deploy, {"deployment_id": "d_x", "docker_image": ""}, "docker_image"),
    (deploy, {"deployment_id": "d_x", "git": {"repository": "a/b"}}, "git"),
    (
        deploy,
        {"deployment_id": "d_x", "git": {"installation_id": "1", "repository": "a/b"}},
        "git.installation_id",
    ),
    (
        deploy,
        {
            "deployment_id": "d_x",
            "git": {"installation_id": 1, "repository": "no-slash", "commit_sha": "abcdef0"},
        },
        "git.repository",
    ),
    (promote, {"target_deployment_id": ""}, "target_deployment_id"),
    (promote, {"target_deployment_id": ["d_1"]}, "target_deployment_id"),
    (rollback, {"source_deployment_id": "d_1", "target_deployment_id": ""}, "target"),
    (rollback, {"source_deployment_id": "d_1", "target_deployment_id": "d_1"}, "source"),
    (rollback, {"source_deployment_id": None, "target_deployment_id": "d_2"}, "source"),
]


@pytest.mark.parametrize(("flow", "params", "named"), BAD_CALLS)
def test_bad_parameters_fail_at_once_naming_the_parameter(
    control_db, seed: DeploySeed, flow: Any, params: dict[str, Any], named: str
) -> None:
    """Every new flow refuses bad parameters (wrong types, empty ids, both or neither source,
    same source and target) at once, with no step retried, naming the parameter, and writes
    nothing (the seeded deployment stays pending, nothing failed)."""
    error = fails_at_once(InvalidParameterError, flow, **params)

    assert named in str(error)
    row = deployment_row(seed.url, seed.deployment_id)
    assert row.status == "pending"
    assert topologies_of(seed.url, seed.deployment_id) == []
    assert failure_message(seed.deployment_id) is None


def test_scale_down_without_clickhouse_changes_nothing(control_db, seed: DeploySeed) -> None:
    """With UNKEY_CLICKHOUSE_URL unset the scale-down has nothing to measure: it completes and
    changes no deployment."""
    with deploy_settings(clickhouse_url=None):
        result = asyncio.run(scale_down_idle_preview_deployments())

    assert result == {"deployments_checked": 0, "idle": 0, "scaled_down": []}
    assert deployment_row(seed.url, seed.deployment_id).desired_state == "running"
