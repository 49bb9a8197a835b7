"""The phases of a deploy (reference §2.1 steps 4-15), called by ``flows.deploy.deploy`` while
it holds ``deploy:project:{project_id}``. Orchestration only: every side effect is a step in
``tasks/``, every other service a subflow under its own key.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger

from flows.deployment import schedule_desired_state_change
from flows.routing import assign_frontline_routes
from tasks.artifacts import Progress
from tasks.cilium import network_policies
from tasks.db.deploys import DeploymentRow, EnvironmentRow, ProjectRow, WorkspaceRow
from tasks.db.frontline import (
    find_previous_live,
    find_sticky_routes,
    insert_frontline_route,
    swap_live_deployment,
)
from tasks.db.rollout import (
    SentinelSpec,
    TopologyRow,
    ensure_sentinel,
    find_existing_policies,
    find_existing_sentinels,
    insert_topologies,
    record_wait_deadline,
    upsert_network_policy,
    wait_for_instances,
)
from tasks.db.versions import take_version
from tasks.domains import build_domains, commit_suffix
from worker.kernel.steps import call_subflow, step
from worker.settings import worker_settings

__all__ = [
    "STANDBY_DELAY_MILLIS",
    "Rollout",
    "assign_routes",
    "plan_regions",
    "swap_live",
    "wait_for_regions",
    "write_desired_rows",
]

# The previous live deployment keeps serving for 30 minutes, then goes to standby.
STANDBY_DELAY_MILLIS = 30 * 60 * 1000
PRODUCTION = "production"


@dataclass(frozen=True)
class Rollout:
    """What one deploy works on (read after its key was taken)."""

    deployment: DeploymentRow
    workspace: WorkspaceRow
    project: ProjectRow
    environment: EnvironmentRow

    @property
    def is_production(self) -> bool:
        return self.environment["slug"] == PRODUCTION

    @property
    def moves_live(self) -> bool:
        """A production deploy of a project that is not rolled back becomes live **(fix:** a
        rolled-back project keeps its live routes where the rollback put them)."""
        return self.is_production and not self.project["is_rolled_back"]


def plan_regions(region_config: dict[str, int]) -> dict[str, int]:
    """``{region: replicas}``: the environment's region config, else every region x 1."""
    if region_config:
        return dict(sorted(region_config.items()))
    return {region: 1 for region in sorted(worker_settings().available_regions)}


def write_desired_rows(rollout: Rollout, plan: dict[str, int]) -> list[TopologyRow]:
    """Topology per region, one sentinel per environment and region, Cilium policies."""
    deployment = rollout.deployment
    topologies = [
        TopologyRow(region=region, replicas=replicas, version=take_version(region, "topology"))
        for region, replicas in plan.items()
    ]
    insert_topologies(deployment["workspace_id"], deployment["id"], topologies)
    have_sentinel = set(find_existing_sentinels(deployment["environment_id"]))
    spec = SentinelSpec(
        workspace_id=deployment["workspace_id"],
        project_id=deployment["project_id"],
        environment_id=deployment["environment_id"],
        image=worker_settings().sentinel_image,
        replicas=3 if rollout.is_production else 1,
    )
    for region in plan:
        if region not in have_sentinel:
            ensure_sentinel(spec, region, take_version(region, "sentinel"))
    _write_policies(rollout, plan)
    return topologies


def _write_policies(rollout: Rollout, plan: dict[str, int]) -> None:
    deployment = rollout.deployment
    existing = find_existing_policies(deployment["id"])
    for region in plan:
        for policy in network_policies(
            workspace_id=deployment["workspace_id"],
            environment_id=deployment["environment_id"],
            deployment_id=deployment["id"],
            deployment_k8s_name=deployment["k8s_name"],
            workspace_namespace=rollout.workspace["k8s_namespace"],
            region=region,
            port=deployment["port"],
        ):
            if existing.get(f"{region}/{policy.k8s_name}") == policy.document:
                continue  # unchanged: no new version, no write
            row = {
                "id": policy.id,
                "workspace_id": deployment["workspace_id"],
                "project_id": deployment["project_id"],
                "environment_id": deployment["environment_id"],
                "deployment_id": deployment["id"],
                "k8s_namespace": policy.k8s_namespace,
            }
            version = take_version(region, f"policy:{policy.k8s_name}")
            upsert_network_policy(row, region, policy.k8s_name, policy.document, version)


async def wait_for_regions(rollout: Rollout, plan: dict[str, int], progress: Progress) -> None:
    """Wait until every region runs its instances; the deadline counts from the first try.

    Raises:
        InstanceWaitTimeout: a region was not ready by the deadline.
    """
    settings = worker_settings()
    deadline = record_wait_deadline("instances", settings.deploy_wait_timeout_seconds)
    waits = [
        wait_for_instances(
            rollout.deployment["id"], region, replicas, deadline, settings.deploy_poll_seconds
        )
        for region, replicas in plan.items()
    ]
    for finished in asyncio.as_completed(waits):
        await finished
        await progress.done("instances", f"{len(plan)} region(s)")


@step(name="building domains")
def _domains(
    project_slug: str,
    environment_slug: str,
    workspace_slug: str,
    commit_sha: str | None,
    branch: str | None,
) -> list[dict[str, str]]:
    # A step: the commit domain's random suffix must be the same on replay.
    domains = build_domains(
        project_slug=project_slug,
        environment_slug=environment_slug,
        workspace_slug=workspace_slug,
        apex=worker_settings().default_domain,
        commit_sha=commit_sha,
        branch=branch,
        suffix=commit_suffix(),
    )
    return [{"fqdn": d.fqdn, "sticky": d.sticky} for d in domains]


async def assign_routes(rollout: Rollout, commit_sha: str | None) -> list[dict[str, str]]:
    """Create the deploy's routes and point them (and the sticky ones) at the deployment.

    Returns:
        The deploy's domains (``fqdn``, ``sticky``).
    """
    deployment = rollout.deployment
    domains = _domains(
        rollout.project["slug"],
        rollout.environment["slug"],
        rollout.workspace["slug"],
        commit_sha or deployment["git_commit_sha"],
        deployment["git_branch"],
    )
    if not rollout.moves_live:
        domains = [d for d in domains if d["sticky"] != "live"]
    route_ids = [
        insert_frontline_route(
            deployment["project_id"],
            deployment["id"],
            deployment["environment_id"],
            domain["fqdn"],
            domain["sticky"],
        )
        for domain in domains
    ]
    sticky = find_sticky_routes(deployment["environment_id"], rollout.moves_live)
    await call_subflow(
        assign_frontline_routes,
        "routing",
        project_id=deployment["project_id"],
        deployment_id=deployment["id"],
        frontline_route_ids=list(dict.fromkeys(route_ids + sticky)),
    )
    return domains


async def swap_live(rollout: Rollout) -> str | None:
    """Production, not rolled back: make the deployment live; the previous live deployment
    goes to standby in 30 minutes (one schedule per new deployment, whoever asks again).

    Returns:
        The previous live deployment, if one was put on the standby schedule.
    """
    if not rollout.moves_live:
        return None
    deployment_id = rollout.deployment["id"]
    project_id = rollout.project["id"]
    previous = find_previous_live(project_id)
    swap_live_deployment(project_id, deployment_id)
    if previous is None or previous == deployment_id:
        return None
    await call_subflow(
        schedule_desired_state_change,
        "standby-previous-live",
        idempotency_key=f"standby-after-{deployment_id}",
        deployment_id=previous,
        state="standby",
        delay_millis=STANDBY_DELAY_MILLIS,
    )
    get_run_logger().info(
        "deployment %s is live; %s goes to standby in 30 min", deployment_id, previous
    )
    return previous


def result_rows(
    plan: dict[str, int], topologies: list[TopologyRow], domains: list[dict[str, str]]
) -> list[dict[str, Any]]:
    """The final table: one row per region and domain (region, version, instances, domain,
    sticky)."""
    versions = {t["region"]: t["version"] for t in topologies}
    return [
        {
            "region": region,
            "version": versions.get(region),
            "instances": replicas,
            "domain": domain["fqdn"],
            "sticky": domain["sticky"],
        }
        for region, replicas in plan.items()
        for domain in domains
    ]
