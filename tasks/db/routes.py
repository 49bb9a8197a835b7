"""Frontline routes (RoutingService): reassign routes to a deployment in one transaction."""

from __future__ import annotations

from sqlalchemy import select, update

from tasks.db.engine import is_mysql
from tasks.db.schema import deployments, frontline_routes
from tasks.db.session import control_plane_transaction
from worker.kernel.clock import now_ms
from worker.kernel.errors import ConflictError, NotFoundError
from worker.kernel.steps import step

__all__ = ["reassign_routes"]


@step
def reassign_routes(project_id: str, deployment_id: str, route_ids: list[str]) -> int:
    """Point every route in ``route_ids`` at ``deployment_id``, all or none.

    Raises:
        NotFoundError: the deployment or a route does not exist.
        ConflictError: the deployment or a route belongs to another project.
    """
    with control_plane_transaction() as connection:
        owner = connection.execute(
            select(deployments.c.project_id).where(deployments.c.id == deployment_id)
        ).scalar_one_or_none()
        if owner is None:
            raise NotFoundError(f"deployment '{deployment_id}' not found")
        if owner != project_id:
            raise ConflictError(
                f"deployment '{deployment_id}' belongs to project '{owner}', not '{project_id}'"
            )
        if not route_ids:
            return 0
        query = select(frontline_routes.c.id, frontline_routes.c.project_id).where(
            frontline_routes.c.id.in_(route_ids)
        )
        if is_mysql(connection):
            query = query.with_for_update()
        found = {row.id: row.project_id for row in connection.execute(query)}
        missing = [route for route in route_ids if route not in found]
        if missing:
            raise NotFoundError(f"frontline route(s) not found: {', '.join(missing)}")
        foreign = [route for route in route_ids if found[route] != project_id]
        if foreign:
            raise ConflictError(
                f"frontline route(s) {', '.join(foreign)} do not belong to project '{project_id}'"
            )
        result = connection.execute(
            update(frontline_routes)
            .where(frontline_routes.c.id.in_(route_ids))
            .values(deployment_id=deployment_id, updated_at=now_ms())
        )
        return int(result.rowcount)
