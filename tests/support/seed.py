"""Seed rows for the service tests: each insert returns the new row's id and remembers it in a
``SeedIds``; ``cleanup`` deletes exactly those rows (crons scan the whole database, so tests
never leave rows behind and never delete rows they did not create).

Ids are unique per call (uuid based), so tests never see each other's rows. Regions are unique
too (``fresh_region``): their version counters start at 0 and their topology rows never
collide on ``UNIQUE(region, version)``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import sqlalchemy as sa

from tasks.db.engine import engine_for
from tasks.db.schema import (
    deployment_topology,
    deployment_transitions,
    deployments,
    environments,
    frontline_routes,
    projects,
    region_versions,
    workspaces,
)
from tasks.db.versions import increment_region_version
from worker.kernel.clock import now_ms

__all__ = [
    "Project",
    "SeedIds",
    "cleanup",
    "desired_state",
    "fresh_region",
    "insert_deployment",
    "insert_environment",
    "insert_project",
    "insert_route",
    "insert_topology",
    "insert_transition",
    "insert_workspace",
    "new_id",
    "region_counters",
    "route_deployments",
    "seed_project",
    "topology",
    "transition",
]


def new_id(prefix: str) -> str:
    """A unique id such as ``d_1f2e3d4c5b6a7980``."""
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def fresh_region() -> str:
    """A region name no other test uses (valid for the ``region`` parameter)."""
    return f"t-{uuid.uuid4().hex[:12]}.test"


@dataclass
class SeedIds:
    """Every row a test created, by table (plus the regions whose counters it used)."""

    workspaces: list[str] = field(default_factory=list)
    projects: list[str] = field(default_factory=list)
    environments: list[str] = field(default_factory=list)
    deployments: list[str] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)
    regions: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Project:
    """A workspace, one of its projects and one environment of that project."""

    workspace_id: str
    project_id: str
    environment_id: str


def insert_workspace(url: str, ids: SeedIds) -> str:
    workspace_id = new_id("ws")
    with engine_for(url).begin() as connection:
        connection.execute(
            workspaces.insert().values(
                id=workspace_id,
                org_id=new_id("org"),
                name=f"test {workspace_id}",
                slug=workspace_id,
                beta_features={},
                features={},
            )
        )
    ids.workspaces.append(workspace_id)
    return workspace_id


def insert_project(
    url: str, ids: SeedIds, workspace_id: str, live_deployment_id: str | None = None
) -> str:
    project_id = new_id("proj")
    with engine_for(url).begin() as connection:
        connection.execute(
            projects.insert().values(
                id=project_id,
                workspace_id=workspace_id,
                name=f"test {project_id}",
                slug=project_id,
                live_deployment_id=live_deployment_id,
                created_at=now_ms(),
            )
        )
    ids.projects.append(project_id)
    return project_id


def insert_environment(url: str, ids: SeedIds, workspace_id: str, project_id: str) -> str:
    environment_id = new_id("env")
    with engine_for(url).begin() as connection:
        connection.execute(
            environments.insert().values(
                id=environment_id,
                workspace_id=workspace_id,
                project_id=project_id,
                slug="production",
                sentinel_config=b"",
                created_at=now_ms(),
            )
        )
    ids.environments.append(environment_id)
    return environment_id


def seed_project(url: str, ids: SeedIds) -> Project:
    """A new workspace with one project and one environment."""
    workspace_id = insert_workspace(url, ids)
    project_id = insert_project(url, ids, workspace_id)
    environment_id = insert_environment(url, ids, workspace_id, project_id)
    return Project(workspace_id, project_id, environment_id)


def insert_deployment(
    url: str, ids: SeedIds, project: Project, desired_state: str = "running"
) -> str:
    deployment_id = new_id("d")
    with engine_for(url).begin() as connection:
        connection.execute(
            deployments.insert().values(
                id=deployment_id,
                k8s_name=deployment_id,
                workspace_id=project.workspace_id,
                project_id=project.project_id,
                environment_id=project.environment_id,
                image="nginx:latest",
                sentinel_config=b"",
                cpu_millicores=256,
                memory_mib=256,
                desired_state=desired_state,
                encrypted_environment_variables=b"",
                status="ready",
                created_at=now_ms(),
            )
        )
    ids.deployments.append(deployment_id)
    return deployment_id


def insert_topology(
    url: str,
    ids: SeedIds,
    project: Project,
    deployment_id: str,
    region: str,
    desired_status: str = "started",
) -> int:
    """A topology row of ``deployment_id`` in ``region``; returns its version (taken from the
    region's counter, as the deploy flow does, so later versions are greater)."""
    with engine_for(url).begin() as connection:
        version = increment_region_version(connection, region)
        connection.execute(
            deployment_topology.insert().values(
                workspace_id=project.workspace_id,
                deployment_id=deployment_id,
                region=region,
                desired_replicas=1,
                version=version,
                desired_status=desired_status,
                created_at=now_ms(),
            )
        )
    if region not in ids.regions:
        ids.regions.append(region)
    return version


def insert_route(url: str, ids: SeedIds, project: Project, deployment_id: str) -> str:
    route_id = new_id("fr")
    with engine_for(url).begin() as connection:
        connection.execute(
            frontline_routes.insert().values(
                id=route_id,
                project_id=project.project_id,
                deployment_id=deployment_id,
                environment_id=project.environment_id,
                fully_qualified_domain_name=f"{route_id}.example.test",
                created_at=now_ms(),
            )
        )
    ids.routes.append(route_id)
    return route_id


def insert_transition(url: str, deployment_id: str, nonce: str, state: str) -> None:
    """A pending desired-state transition, as ``schedule_desired_state_change`` records it.

    ``cleanup`` removes it with its deployment (pass a deployment id without a row as one of
    its ``extra_deployment_ids``)."""
    with engine_for(url).begin() as connection:
        connection.execute(
            deployment_transitions.insert().values(
                deployment_id=deployment_id, nonce=nonce, state=state, created_at=now_ms()
            )
        )


def cleanup(url: str, ids: SeedIds, *extra_deployment_ids: str) -> None:
    """Delete every row ``ids`` names (and the transitions and topology of its deployments and
    of ``extra_deployment_ids``, which may have no deployment row)."""
    deployment_ids = [*ids.deployments, *extra_deployment_ids]
    with engine_for(url).begin() as connection:
        if deployment_ids:
            connection.execute(
                sa.delete(deployment_transitions).where(
                    deployment_transitions.c.deployment_id.in_(deployment_ids)
                )
            )
            connection.execute(
                sa.delete(deployment_topology).where(
                    deployment_topology.c.deployment_id.in_(deployment_ids)
                )
            )
        for table, key in (
            (frontline_routes, ids.routes),
            (deployments, ids.deployments),
            (environments, ids.environments),
            (projects, ids.projects),
            (workspaces, ids.workspaces),
        ):
            if key:
                connection.execute(sa.delete(table).where(table.c.id.in_(key)))
        if ids.regions:
            connection.execute(
                sa.delete(region_versions).where(region_versions.c.region.in_(ids.regions))
            )


# -- reading back what the services wrote -------------------------------------------------------


def desired_state(url: str, deployment_id: str) -> str | None:
    """``deployments.desired_state`` of the deployment (None if it has no row)."""
    with engine_for(url).connect() as connection:
        return connection.execute(
            sa.select(deployments.c.desired_state).where(deployments.c.id == deployment_id)
        ).scalar_one_or_none()


def topology(url: str, deployment_id: str) -> dict[str, tuple[str, int]]:
    """``{region: (desired_status, version)}`` of the deployment's topology rows."""
    with engine_for(url).connect() as connection:
        rows = connection.execute(
            sa.select(
                deployment_topology.c.region,
                deployment_topology.c.desired_status,
                deployment_topology.c.version,
            ).where(deployment_topology.c.deployment_id == deployment_id)
        )
        return {row.region: (row.desired_status, int(row.version)) for row in rows}


def transition(url: str, deployment_id: str) -> sa.Row | None:
    """The deployment's pending transition row (nonce, state, scheduled_flow_run_id), if any."""
    with engine_for(url).connect() as connection:
        return connection.execute(
            sa.select(
                deployment_transitions.c.nonce,
                deployment_transitions.c.state,
                deployment_transitions.c.scheduled_flow_run_id,
            ).where(deployment_transitions.c.deployment_id == deployment_id)
        ).first()


def route_deployments(url: str, route_ids: list[str]) -> dict[str, str]:
    """``{route id: deployment id}`` of the given frontline routes."""
    with engine_for(url).connect() as connection:
        rows = connection.execute(
            sa.select(frontline_routes.c.id, frontline_routes.c.deployment_id).where(
                frontline_routes.c.id.in_(route_ids)
            )
        )
        return {row.id: row.deployment_id for row in rows}


def region_counters(url: str) -> dict[str, int]:
    """Every region's version counter (``region_versions``)."""
    with engine_for(url).connect() as connection:
        rows = connection.execute(sa.select(region_versions.c.region, region_versions.c.version))
        return {row.region: int(row.version) for row in rows}


# -- the data plane: sentinels, topology changes, instances (tests of the local data plane) -----
# Appended as a section of its own (with its imports) so that the module's head stays as it was.

from tasks.db.schema import instances, sentinels  # noqa: E402

__all__ += [
    "delete_dataplane_rows",
    "insert_sentinel",
    "instances_of",
    "sentinel_state",
    "set_topology",
]


def insert_sentinel(
    url: str, ids: SeedIds, project: Project, region: str, desired_replicas: int = 3
) -> str:
    """A sentinel of ``project``'s environment in ``region`` with health ``unknown``, as the
    deploy flow writes it; returns its id (remove it with ``delete_dataplane_rows``)."""
    sentinel_id = new_id("sen")
    with engine_for(url).begin() as connection:
        version = increment_region_version(connection, region)
        connection.execute(
            sentinels.insert().values(
                id=sentinel_id,
                workspace_id=project.workspace_id,
                project_id=project.project_id,
                environment_id=project.environment_id,
                k8s_name=sentinel_id.replace("_", "-"),
                k8s_address=f"{sentinel_id}.sentinel.svc.cluster.local:8040",
                region=region,
                image="ghcr.io/unkeyed/unkey:latest",
                desired_replicas=desired_replicas,
                available_replicas=0,
                cpu_millicores=256,
                memory_mib=256,
                version=version,
                created_at=now_ms(),
            )
        )
    if region not in ids.regions:
        ids.regions.append(region)
    return sentinel_id


def set_topology(url: str, deployment_id: str, region: str, **values: object) -> None:
    """Change columns of a topology row (``desired_replicas=2``, ``desired_status="stopped"``)."""
    with engine_for(url).begin() as connection:
        connection.execute(
            sa.update(deployment_topology)
            .where(
                deployment_topology.c.deployment_id == deployment_id,
                deployment_topology.c.region == region,
            )
            .values(**values)
        )


def instances_of(url: str, deployment_id: str) -> list[sa.Row]:
    """The deployment's instances (k8s_name, region, address, status, ...), by k8s_name."""
    with engine_for(url).connect() as connection:
        return list(
            connection.execute(
                sa.select(instances)
                .where(instances.c.deployment_id == deployment_id)
                .order_by(instances.c.k8s_name)
            )
        )


def sentinel_state(url: str, sentinel_id: str) -> tuple[str, int] | None:
    """``(health, available_replicas)`` of the sentinel (None if it has no row)."""
    with engine_for(url).connect() as connection:
        row = connection.execute(
            sa.select(sentinels.c.health, sentinels.c.available_replicas).where(
                sentinels.c.id == sentinel_id
            )
        ).first()
    return None if row is None else (row.health, int(row.available_replicas))


def delete_dataplane_rows(
    url: str, deployment_ids: list[str], sentinel_ids: list[str] | tuple[str, ...] = ()
) -> None:
    """Delete the instances of ``deployment_ids`` and the sentinels ``sentinel_ids`` (before
    ``cleanup``, which removes the rest)."""
    with engine_for(url).begin() as connection:
        if deployment_ids:
            connection.execute(
                sa.delete(instances).where(instances.c.deployment_id.in_(deployment_ids))
            )
        if sentinel_ids:
            connection.execute(sa.delete(sentinels).where(sentinels.c.id.in_(sentinel_ids)))
