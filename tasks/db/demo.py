"""Demo rows for ``ctrl-worker seed-demo``: everything a first image deploy needs.

``seed_demo`` writes, in one transaction, a workspace, a project, its ``production``
environment with runtime settings (``region_config`` ``{}``: every available region, one
replica each) and a ``pending`` deployment. Every call creates new rows with new ids, so it can
be run again at any time and never touches rows it did not write.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection

from tasks.db.engine import transaction
from tasks.db.schema import (
    deployments,
    environment_runtime_settings,
    environments,
    projects,
    workspaces,
)
from worker.kernel.clock import new_dns_label, new_id, now_ms

__all__ = ["DemoIds", "seed_demo"]

CPU_MILLICORES = 256
MEMORY_MIB = 256


@dataclass(frozen=True)
class DemoIds:
    """The ids of the rows ``seed_demo`` wrote."""

    workspace_id: str
    project_id: str
    environment_id: str
    deployment_id: str


def seed_demo(url: str) -> DemoIds:
    """Write a demo workspace, project, ``production`` environment and ``pending`` deployment.

    Args:
        url: the control-plane database (its tables must exist: ``ctrl-worker db init``).

    Returns:
        The new rows' ids.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the database refused the rows (for instance, no tables).
    """
    ids = DemoIds(new_id("ws"), new_id("proj"), new_id("env"), new_id("d"))
    with transaction(url) as connection:
        _insert_workspace_and_project(connection, ids)
        _insert_environment(connection, ids)
        connection.execute(
            deployments.insert().values(
                id=ids.deployment_id,
                k8s_name=new_dns_label(),
                workspace_id=ids.workspace_id,
                project_id=ids.project_id,
                environment_id=ids.environment_id,
                sentinel_config=b"",
                cpu_millicores=CPU_MILLICORES,
                memory_mib=MEMORY_MIB,
                encrypted_environment_variables=b"",
                status="pending",
                created_at=now_ms(),
            )
        )
    return ids


def _insert_workspace_and_project(connection: Connection, ids: DemoIds) -> None:
    # The workspace's slug and org are unique across the database: derived from its new id.
    suffix = ids.workspace_id.removeprefix("ws_").lower()
    connection.execute(
        workspaces.insert().values(
            id=ids.workspace_id,
            org_id=f"org_{suffix}",
            name="Demo workspace",
            slug=f"demo-{suffix}",
            beta_features={},
            features={},
            created_at_m=now_ms(),
        )
    )
    connection.execute(
        projects.insert().values(
            id=ids.project_id,
            workspace_id=ids.workspace_id,
            name="Demo project",
            slug="demo",
            created_at=now_ms(),
        )
    )


def _insert_environment(connection: Connection, ids: DemoIds) -> None:
    connection.execute(
        environments.insert().values(
            id=ids.environment_id,
            workspace_id=ids.workspace_id,
            project_id=ids.project_id,
            slug="production",
            description="Demo production environment",
            sentinel_config=b"",
            created_at=now_ms(),
        )
    )
    connection.execute(
        environment_runtime_settings.insert().values(
            workspace_id=ids.workspace_id,
            environment_id=ids.environment_id,
            cpu_millicores=CPU_MILLICORES,
            memory_mib=MEMORY_MIB,
            # Empty: every available region, one replica each (reference §2.1 step 6).
            region_config={},
            created_at=now_ms(),
        )
    )
