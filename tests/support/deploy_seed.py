"""Seed rows for the DeployService tests, and reading back what a deploy wrote.

``seed_deploy`` writes a workspace, a project, an environment (with runtime settings naming its
regions) and a ``pending`` deployment, each with unique ids and slugs; ``cleanup_deploy``
deletes those and every row a deploy, promote, rollback or the data plane wrote for them
(topologies, sentinels, policies, instances, routes, failures, transitions, region counters).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sqlalchemy as sa

from tasks.db.engine import engine_for
from tasks.db.schema import (
    cilium_network_policies,
    deployment_failures,
    deployment_topology,
    deployments,
    environment_runtime_settings,
    environments,
    frontline_routes,
    instances,
    projects,
    sentinels,
    workspaces,
)
from tests.support.seed import SeedIds, cleanup, fresh_region, new_id
from worker.kernel.clock import now_ms

__all__ = [
    "DeploySeed",
    "add_deployment",
    "cleanup_deploy",
    "deployment_row",
    "policies_of",
    "project_row",
    "routes_of",
    "seed_deploy",
    "sentinels_of",
    "set_project",
    "topologies_of",
]


@dataclass
class DeploySeed:
    """One workspace, project and environment, and the deployments made in it."""

    url: str
    workspace_id: str
    workspace_slug: str
    project_id: str
    project_slug: str
    environment_id: str
    environment_slug: str
    regions: list[str]
    deployment_ids: list[str] = field(default_factory=list)
    ids: SeedIds = field(default_factory=SeedIds)

    @property
    def deployment_id(self) -> str:
        """The first deployment."""
        return self.deployment_ids[0]


def seed_deploy(
    url: str,
    *,
    environment_slug: str = "production",
    regions: int = 2,
    replicas: int = 1,
    commit_sha: str | None = "0123456789abcdef0123456789abcdef01234567",
    branch: str | None = "Feature/Login_Page",
) -> DeploySeed:
    """A fresh workspace/project/environment with ``regions`` fresh regions of ``replicas``
    each, and one pending deployment of that commit and branch."""
    ids = SeedIds()
    suffix = new_id("s").split("_")[1].lower()[:10]
    seed = DeploySeed(
        url=url,
        workspace_id=new_id("ws"),
        workspace_slug=f"ws{suffix}",
        project_id=new_id("proj"),
        project_slug=f"app{suffix}",
        environment_id=new_id("env"),
        environment_slug=environment_slug,
        regions=sorted(fresh_region() for _ in range(regions)),
        ids=ids,
    )
    at = now_ms()
    with engine_for(url).begin() as connection:
        connection.execute(
            workspaces.insert().values(
                id=seed.workspace_id,
                org_id=new_id("org"),
                name="deploy test",
                slug=seed.workspace_slug,
                beta_features={},
                features={},
            )
        )
        connection.execute(
            projects.insert().values(
                id=seed.project_id,
                workspace_id=seed.workspace_id,
                name="deploy test",
                slug=seed.project_slug,
                created_at=at,
            )
        )
        connection.execute(
            environments.insert().values(
                id=seed.environment_id,
                workspace_id=seed.workspace_id,
                project_id=seed.project_id,
                slug=environment_slug,
                sentinel_config=b"",
                created_at=at,
            )
        )
        connection.execute(
            environment_runtime_settings.insert().values(
                workspace_id=seed.workspace_id,
                environment_id=seed.environment_id,
                region_config={region: replicas for region in seed.regions},
                created_at=at,
            )
        )
    ids.workspaces.append(seed.workspace_id)
    ids.projects.append(seed.project_id)
    ids.environments.append(seed.environment_id)
    ids.regions.extend(seed.regions)
    add_deployment(seed, commit_sha=commit_sha, branch=branch)
    return seed


def add_deployment(
    seed: DeploySeed,
    *,
    status: str = "pending",
    commit_sha: str | None = None,
    branch: str | None = None,
    created_at: int | None = None,
    updated_at: int | None = None,
) -> str:
    """Another deployment in the seed's environment; returns its id."""
    deployment_id = new_id("d")
    with engine_for(seed.url).begin() as connection:
        connection.execute(
            deployments.insert().values(
                id=deployment_id,
                k8s_name=new_id("k").split("_")[1].lower(),
                workspace_id=seed.workspace_id,
                project_id=seed.project_id,
                environment_id=seed.environment_id,
                git_commit_sha=commit_sha,
                git_branch=branch,
                sentinel_config=b"",
                cpu_millicores=256,
                memory_mib=256,
                encrypted_environment_variables=b"",
                status=status,
                created_at=created_at if created_at is not None else now_ms(),
                updated_at=updated_at,
            )
        )
    seed.deployment_ids.append(deployment_id)
    seed.ids.deployments.append(deployment_id)
    return deployment_id


def cleanup_deploy(seed: DeploySeed) -> None:
    """Delete everything of the seed and what the services wrote for it."""
    ids = seed.deployment_ids
    with engine_for(seed.url).begin() as connection:
        for table, column in (
            (instances, instances.c.deployment_id),
            (cilium_network_policies, cilium_network_policies.c.deployment_id),
            (deployment_failures, deployment_failures.c.deployment_id),
            (deployment_topology, deployment_topology.c.deployment_id),
        ):
            connection.execute(sa.delete(table).where(column.in_(ids)))
        connection.execute(
            sa.delete(sentinels).where(sentinels.c.environment_id == seed.environment_id)
        )
        connection.execute(
            sa.delete(frontline_routes).where(frontline_routes.c.project_id == seed.project_id)
        )
        connection.execute(
            sa.delete(environment_runtime_settings).where(
                environment_runtime_settings.c.environment_id == seed.environment_id
            )
        )
    cleanup(seed.url, seed.ids)


def deployment_row(url: str, deployment_id: str) -> sa.Row:
    """The deployment's row."""
    with engine_for(url).connect() as connection:
        return connection.execute(
            sa.select(deployments).where(deployments.c.id == deployment_id)
        ).one()


def project_row(url: str, project_id: str) -> sa.Row:
    """The project's row."""
    with engine_for(url).connect() as connection:
        return connection.execute(sa.select(projects).where(projects.c.id == project_id)).one()


def _all(url: str, query: sa.Select) -> list[sa.Row]:
    with engine_for(url).connect() as connection:
        return list(connection.execute(query))


def topologies_of(url: str, deployment_id: str) -> list[sa.Row]:
    """The deployment's topology rows, by region."""
    table = deployment_topology
    query = sa.select(table).where(table.c.deployment_id == deployment_id)
    return _all(url, query.order_by(table.c.region))


def sentinels_of(url: str, environment_id: str) -> list[sa.Row]:
    """The environment's sentinels, by region."""
    query = sa.select(sentinels).where(sentinels.c.environment_id == environment_id)
    return _all(url, query.order_by(sentinels.c.region))


def policies_of(url: str, deployment_id: str) -> list[sa.Row]:
    """The deployment's Cilium policies, by region and name."""
    table = cilium_network_policies
    query = sa.select(table).where(table.c.deployment_id == deployment_id)
    return _all(url, query.order_by(table.c.region, table.c.k8s_name))


def routes_of(url: str, project_id: str) -> dict[str, tuple[str, str]]:
    """``{fqdn: (deployment id, sticky)}`` of the project's routes."""
    with engine_for(url).connect() as connection:
        rows = connection.execute(
            sa.select(
                frontline_routes.c.fully_qualified_domain_name,
                frontline_routes.c.deployment_id,
                frontline_routes.c.sticky,
            ).where(frontline_routes.c.project_id == project_id)
        )
        return {row[0]: (row[1], row[2]) for row in rows}


def set_project(url: str, project_id: str, **values: object) -> None:
    """Change columns of the project (``live_deployment_id=...``, ``is_rolled_back=True``)."""
    with engine_for(url).begin() as connection:
        connection.execute(sa.update(projects).where(projects.c.id == project_id).values(**values))


# -- promote / rollback tests: routes, another environment, deployment columns -----------------

__all__ += ["add_environment", "insert_route", "set_deployment"]


def insert_route(seed: DeploySeed, fqdn: str, sticky: str, deployment_id: str) -> str:
    """A frontline route of the seed's project and environment for ``fqdn`` with ``sticky``
    (``none``/``branch``/``environment``/``live``) pointing at ``deployment_id``; returns its
    id (``cleanup_deploy`` removes it)."""
    route_id = new_id("fr")
    with engine_for(seed.url).begin() as connection:
        connection.execute(
            frontline_routes.insert().values(
                id=route_id,
                project_id=seed.project_id,
                deployment_id=deployment_id,
                environment_id=seed.environment_id,
                fully_qualified_domain_name=fqdn,
                sticky=sticky,
                created_at=now_ms(),
            )
        )
    seed.ids.routes.append(route_id)
    return route_id


def add_environment(seed: DeploySeed, slug: str) -> str:
    """Another environment (no runtime settings) of the seed's project; returns its id."""
    environment_id = new_id("env")
    with engine_for(seed.url).begin() as connection:
        connection.execute(
            environments.insert().values(
                id=environment_id,
                workspace_id=seed.workspace_id,
                project_id=seed.project_id,
                slug=slug,
                sentinel_config=b"",
                created_at=now_ms(),
            )
        )
    seed.ids.environments.append(environment_id)
    return environment_id


def set_deployment(url: str, deployment_id: str, **values: object) -> None:
    """Change columns of a deployment (``desired_state="standby"``, ``environment_id=...``)."""
    with engine_for(url).begin() as connection:
        connection.execute(
            sa.update(deployments).where(deployments.c.id == deployment_id).values(**values)
        )
