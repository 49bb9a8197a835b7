"""DeployService reads and status writes in the control-plane DB (reference §2.1-2.3).

Every function here is a durable step named as the original's ``restate.Run`` (so the Prefect
UI reads like its journal). Reads that guard a write are ``fresh``: they run again each time
the call's key is (re)taken. Rows come back as plain dicts (step results are JSON).
"""

from __future__ import annotations

from typing import Any, TypedDict

from sqlalchemy import Connection, delete, select, update

from tasks.db.schema import (
    deployment_failures,
    deployments,
    environment_runtime_settings,
    environments,
    projects,
    workspaces,
)
from tasks.db.session import control_plane_transaction
from worker.kernel.clock import new_dns_label, now_ms
from worker.kernel.errors import NotFoundError
from worker.kernel.steps import step

__all__ = [
    "DeploymentRow",
    "EnvironmentRow",
    "ProjectRow",
    "WorkspaceRow",
    "failure_message",
    "find_deployment",
    "find_deployment_project",
    "find_environment",
    "find_project",
    "find_region_config",
    "find_source_deployment",
    "find_target_deployment",
    "find_workspace",
    "mark_deployment_failed",
    "read_project",
    "set_status_deploying",
    "set_status_ready",
    "update_deployment_build_id",
    "update_deployment_image",
]

MESSAGE_MAX = 1024


class DeploymentRow(TypedDict):
    id: str
    k8s_name: str
    workspace_id: str
    project_id: str
    environment_id: str
    status: str
    image: str | None
    git_commit_sha: str | None
    git_branch: str | None
    port: int
    cpu_millicores: int
    memory_mib: int


class WorkspaceRow(TypedDict):
    id: str
    slug: str
    k8s_namespace: str


class ProjectRow(TypedDict):
    id: str
    workspace_id: str
    slug: str
    live_deployment_id: str | None
    is_rolled_back: bool
    depot_project_id: str | None


class EnvironmentRow(TypedDict):
    id: str
    project_id: str
    slug: str


def _deployment(connection: Connection, deployment_id: str) -> DeploymentRow:
    row = connection.execute(
        select(
            deployments.c.id,
            deployments.c.k8s_name,
            deployments.c.workspace_id,
            deployments.c.project_id,
            deployments.c.environment_id,
            deployments.c.status,
            deployments.c.image,
            deployments.c.git_commit_sha,
            deployments.c.git_branch,
            deployments.c.port,
            deployments.c.cpu_millicores,
            deployments.c.memory_mib,
        ).where(deployments.c.id == deployment_id)
    ).first()
    if row is None:
        raise NotFoundError(f"deployment '{deployment_id}' not found")
    return DeploymentRow(**row._asdict())  # type: ignore[typeddict-item]


@step(name="finding deployment project")
def find_deployment_project(deployment_id: str) -> str:
    """The project of a deployment (it never changes: safe to replay before the key is held).

    Raises:
        NotFoundError: there is no such deployment.
    """
    with control_plane_transaction() as connection:
        return _deployment(connection, deployment_id)["project_id"]


def _read_deployment(deployment_id: str) -> DeploymentRow:
    """The deployment row.

    Raises:
        NotFoundError: there is no such deployment.
    """
    with control_plane_transaction() as connection:
        return _deployment(connection, deployment_id)


# One read, three journal names: the deploy's own deployment, and a promote's or rollback's
# target and source (each fresh: it guards what the call writes).
find_deployment = step(name="finding deployment", fresh=True)(_read_deployment)
find_target_deployment = step(name="finding target deployment", fresh=True)(_read_deployment)
find_source_deployment = step(name="finding source deployment", fresh=True)(_read_deployment)


@step(name="find workspace", fresh=True)
def find_workspace(workspace_id: str) -> WorkspaceRow:
    """The workspace, with its Kubernetes namespace assigned once, lazily.

    The namespace is written only while the column is NULL (a compare-and-set), so two deploys
    of one workspace never give it two namespaces.

    Raises:
        NotFoundError: there is no such workspace.
    """
    with control_plane_transaction() as connection:
        query = select(workspaces.c.id, workspaces.c.slug, workspaces.c.k8s_namespace).where(
            workspaces.c.id == workspace_id
        )
        row = connection.execute(query).first()
        if row is None:
            raise NotFoundError(f"workspace '{workspace_id}' not found")
        if row.k8s_namespace is None:
            connection.execute(
                update(workspaces)
                .where(workspaces.c.id == workspace_id, workspaces.c.k8s_namespace.is_(None))
                .values(k8s_namespace=new_dns_label(), updated_at_m=now_ms())
            )
            row = connection.execute(query).first()
        assert row is not None
        return WorkspaceRow(id=row.id, slug=row.slug, k8s_namespace=row.k8s_namespace)


def read_project(connection: Connection, project_id: str) -> ProjectRow:
    """The project row (for steps that read it inside their own transaction).

    Raises:
        NotFoundError: there is no such project.
    """
    row = connection.execute(
        select(
            projects.c.id,
            projects.c.workspace_id,
            projects.c.slug,
            projects.c.live_deployment_id,
            projects.c.is_rolled_back,
            projects.c.depot_project_id,
        ).where(projects.c.id == project_id)
    ).first()
    if row is None:
        raise NotFoundError(f"project '{project_id}' not found")
    return ProjectRow(
        id=row.id,
        workspace_id=row.workspace_id,
        slug=row.slug,
        live_deployment_id=row.live_deployment_id,
        is_rolled_back=bool(row.is_rolled_back),
        depot_project_id=row.depot_project_id,
    )


@step(name="finding project", fresh=True)
def find_project(project_id: str) -> ProjectRow:
    """The project (its live deployment and rolled-back flag guard what a call writes).

    Raises:
        NotFoundError: there is no such project.
    """
    with control_plane_transaction() as connection:
        return read_project(connection, project_id)


@step(name="finding environment", fresh=True)
def find_environment(environment_id: str) -> EnvironmentRow:
    """The environment.

    Raises:
        NotFoundError: there is no such environment.
    """
    with control_plane_transaction() as connection:
        row = connection.execute(
            select(environments.c.id, environments.c.project_id, environments.c.slug).where(
                environments.c.id == environment_id
            )
        ).first()
    if row is None:
        raise NotFoundError(f"environment '{environment_id}' not found")
    return EnvironmentRow(id=row.id, project_id=row.project_id, slug=row.slug)


@step(name="find runtime settings for region config")
def find_region_config(environment_id: str) -> dict[str, int]:
    """The environment's ``{region: replicas}`` plan (empty: the caller uses every region x 1).

    Entries with a non-positive or non-integer replica count are dropped.
    """
    with control_plane_transaction() as connection:
        config = connection.execute(
            select(environment_runtime_settings.c.region_config).where(
                environment_runtime_settings.c.environment_id == environment_id
            )
        ).scalar_one_or_none()
    if not isinstance(config, dict):
        return {}
    return {
        str(region): int(replicas)
        for region, replicas in sorted(config.items())
        if isinstance(replicas, int) and not isinstance(replicas, bool) and replicas > 0
    }


def _set_columns(deployment_id: str, **values: Any) -> None:
    with control_plane_transaction() as connection:
        connection.execute(
            update(deployments)
            .where(deployments.c.id == deployment_id)
            .values(**values, updated_at=now_ms())
        )


@step(name="update deployment build id")
def update_deployment_build_id(deployment_id: str, build_id: str) -> None:
    """Record the build that produced the deployment's image."""
    _set_columns(deployment_id, build_id=build_id)


@step(name="update deployment image")
def update_deployment_image(deployment_id: str, image: str) -> None:
    """Record the image the deployment runs."""
    _set_columns(deployment_id, image=image)


@step(name="updating deployment status to deploying")
def set_status_deploying(deployment_id: str) -> None:
    """``deploying``: the rollout started."""
    _set_columns(deployment_id, status="deploying")


@step(name="updating deployment status to ready")
def set_status_ready(deployment_id: str) -> None:
    """``ready``: every region runs its instances and the routes point here (a failure
    recorded by an earlier attempt of this deployment is dropped with it)."""
    with control_plane_transaction() as connection:
        connection.execute(
            update(deployments)
            .where(deployments.c.id == deployment_id)
            .values(status="ready", updated_at=now_ms())
        )
        connection.execute(
            delete(deployment_failures).where(deployment_failures.c.deployment_id == deployment_id)
        )


def mark_deployment_failed(deployment_id: str, message: str, flow_run_id: str | None) -> bool:
    """Leave a deployment ``failed`` with ``message`` (the give-up hook of ``deploy``).

    A deployment that reached ``ready`` stays ``ready``: it serves, whatever failed after.
    Idempotent: a second call rewrites the same status and message.

    Returns:
        Whether the deployment is ``failed`` now.
    """
    message = message[:MESSAGE_MAX]
    at = now_ms()
    with control_plane_transaction() as connection:
        changed = connection.execute(
            update(deployments)
            .where(deployments.c.id == deployment_id, deployments.c.status != "ready")
            .values(status="failed", updated_at=at)
        ).rowcount
        if not changed:
            return False
        values = {"message": message, "flow_run_id": flow_run_id, "failed_at": at}
        exists = connection.execute(
            select(deployment_failures.c.deployment_id).where(
                deployment_failures.c.deployment_id == deployment_id
            )
        ).first()
        if exists is None:
            connection.execute(
                deployment_failures.insert().values(deployment_id=deployment_id, **values)
            )
        else:
            connection.execute(
                update(deployment_failures)
                .where(deployment_failures.c.deployment_id == deployment_id)
                .values(**values)
            )
        return True


def failure_message(deployment_id: str) -> str | None:
    """Why the deployment failed, if it did (for the CLI, the client and tests)."""
    with control_plane_transaction() as connection:
        message = connection.execute(
            select(deployment_failures.c.message).where(
                deployment_failures.c.deployment_id == deployment_id
            )
        ).scalar_one_or_none()
    return None if message is None else str(message)
