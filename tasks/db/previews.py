"""The reads of the idle-preview scale-down (reference §2.4): preview environments paged by
primary key, and their deployments that are ``ready`` and idle since a cutoff.

The original read the deployments one environment at a time (a step per environment); here one
step reads them for a whole page of environments (one query instead of 100).
"""

from __future__ import annotations

from typing import TypedDict

from sqlalchemy import or_, select

from tasks.db.schema import deployments, environments
from tasks.db.session import control_plane_transaction
from worker.kernel.steps import step

__all__ = [
    "PREVIEW_PAGE_SIZE",
    "IdleCandidate",
    "PreviewEnvironment",
    "find_idle_deployments",
    "list_preview_environments",
]

PREVIEW_PAGE_SIZE = 100


class PreviewEnvironment(TypedDict):
    pk: int
    id: str


class IdleCandidate(TypedDict):
    id: str
    workspace_id: str
    project_id: str
    environment_id: str


@step(name="list preview environments", key=("after_pk",), run_name="list preview environments")
def list_preview_environments(
    after_pk: int, limit: int = PREVIEW_PAGE_SIZE
) -> list[PreviewEnvironment]:
    """The next page of environments with slug ``preview``, by primary key after ``after_pk``."""
    with control_plane_transaction() as connection:
        rows = connection.execute(
            select(environments.c.pk, environments.c.id)
            .where(environments.c.slug == "preview", environments.c.pk > after_pk)
            .order_by(environments.c.pk)
            .limit(limit)
        )
        return [PreviewEnvironment(pk=int(row.pk), id=row.id) for row in rows]


@step(
    name="get deployments for environments",
    key=("after_pk",),
    run_name="get deployments for preview page after {after_pk}",
)
def find_idle_deployments(
    after_pk: int, environment_ids: list[str], cutoff_ms: int
) -> list[IdleCandidate]:
    """Deployments of these environments that are ``ready``, created before ``cutoff_ms`` and
    not updated since (``updated_at`` NULL or before it); ``after_pk`` names the page."""
    if not environment_ids:
        return []
    with control_plane_transaction() as connection:
        rows = connection.execute(
            select(
                deployments.c.id,
                deployments.c.workspace_id,
                deployments.c.project_id,
                deployments.c.environment_id,
            )
            .where(
                deployments.c.environment_id.in_(environment_ids),
                deployments.c.status == "ready",
                deployments.c.created_at < cutoff_ms,
                or_(deployments.c.updated_at.is_(None), deployments.c.updated_at < cutoff_ms),
            )
            .order_by(deployments.c.pk)
        )
        return [IdleCandidate(**row._asdict()) for row in rows]  # type: ignore[typeddict-item]
