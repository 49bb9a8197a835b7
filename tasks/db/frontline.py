"""Frontline routes and the project's live deployment, as DeployService writes them
(reference §2.1 steps 12-15, §2.2, §2.3).

A route is unique by FQDN: inserting one that exists returns the existing route's id (it is
then reassigned through RoutingService, under the routing key). The live swap and the live
update are each one transaction on the project row.
"""

from __future__ import annotations

from sqlalchemy import select, update

from tasks.db.schema import frontline_routes, projects
from tasks.db.session import control_plane_transaction
from worker.kernel.clock import new_id, now_ms
from worker.kernel.errors import NotFoundError
from worker.kernel.steps import step

__all__ = [
    "find_previous_live",
    "find_routes_for_promotion",
    "find_routes_for_rollback",
    "find_sticky_routes",
    "insert_frontline_route",
    "swap_live_deployment",
    "update_project_live",
]


@step(name="inserting frontline route", key=("fqdn",), run_name="inserting frontline route {fqdn}")
def insert_frontline_route(
    project_id: str, deployment_id: str, environment_id: str, fqdn: str, sticky: str
) -> str:
    """The id of the route for ``fqdn``: the existing one, or a new one pointing here."""
    with control_plane_transaction() as connection:
        query = select(frontline_routes.c.id).where(
            frontline_routes.c.fully_qualified_domain_name == fqdn
        )
        existing = connection.execute(query).scalar_one_or_none()
        if existing is not None:
            return str(existing)
        route_id = new_id("fr")
        connection.execute(
            frontline_routes.insert().values(
                id=route_id,
                project_id=project_id,
                deployment_id=deployment_id,
                environment_id=environment_id,
                fully_qualified_domain_name=fqdn,
                sticky=sticky,
                created_at=now_ms(),
            )
        )
        return route_id


def _routes(environment_id: str, stickies: tuple[str, ...]) -> list[str]:
    with control_plane_transaction() as connection:
        return list(
            connection.execute(
                select(frontline_routes.c.id)
                .where(
                    frontline_routes.c.environment_id == environment_id,
                    frontline_routes.c.sticky.in_(stickies),
                )
                .order_by(frontline_routes.c.pk)
            ).scalars()
        )


@step(name="finding sticky routes", fresh=True)
def find_sticky_routes(environment_id: str, include_live: bool) -> list[str]:
    """The environment's ``environment``-sticky routes, plus its ``live`` ones if asked."""
    return _routes(environment_id, ("environment", "live") if include_live else ("environment",))


@step(name="finding frontlineRoutes for promotion", fresh=True)
def find_routes_for_promotion(environment_id: str) -> list[str]:
    """The environment's ``live`` and ``environment`` routes (what a promote moves)."""
    return _routes(environment_id, ("live", "environment"))


@step(name="finding frontlineRoutes for rollback", fresh=True)
def find_routes_for_rollback(environment_id: str) -> list[str]:
    """The environment's ``live`` and ``environment`` routes (what a rollback moves)."""
    return _routes(environment_id, ("live", "environment"))


@step(name="finding previous live deployment")
def find_previous_live(project_id: str) -> str | None:
    """The project's live deployment before this call swaps it (recorded once, so a resumed
    call still knows which deployment to put on standby after its swap committed)."""
    with control_plane_transaction() as connection:
        live = connection.execute(
            select(projects.c.live_deployment_id).where(projects.c.id == project_id)
        ).scalar_one_or_none()
    return None if live is None else str(live)


def _set_live(project_id: str, deployment_id: str, rolled_back: bool) -> None:
    with control_plane_transaction() as connection:
        changed = connection.execute(
            update(projects)
            .where(projects.c.id == project_id)
            .values(
                live_deployment_id=deployment_id, is_rolled_back=rolled_back, updated_at=now_ms()
            )
        ).rowcount
    if not changed:
        raise NotFoundError(f"project '{project_id}' not found")


@step(name="swapping project live deployment")
def swap_live_deployment(project_id: str, deployment_id: str) -> None:
    """Make the deployment the project's live one and clear ``is_rolled_back``.

    Raises:
        NotFoundError: the project is gone.
    """
    _set_live(project_id, deployment_id, rolled_back=False)


@step(name="updating project live deployment")
def update_project_live(project_id: str, deployment_id: str, rolled_back: bool) -> None:
    """Set the project's live deployment (promote: not rolled back; rollback: rolled back).

    Raises:
        NotFoundError: the project is gone.
    """
    _set_live(project_id, deployment_id, rolled_back)
