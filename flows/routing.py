"""RoutingService: point frontline routes at a deployment.

Guarantees: calls on one project run one at a time (key ``routing:project:{project_id}``) and
the reassignment is one DB transaction: every route moves, or none does **(+)**. Before
anything is written, each route must exist and belong to the project, and so must the
deployment (terminal otherwise). Side effect: the ``reassign_routes`` step. Database errors
are retried.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from flows.params import Id, Params
from tasks.db.routes import reassign_routes
from worker.kernel.service import critical_section, parse, service_flow

__all__ = ["assign_frontline_routes"]


class AssignParams(Params):
    project_id: Id
    deployment_id: Id
    frontline_route_ids: Annotated[list[Id], Field(max_length=1000)]

    @field_validator("frontline_route_ids")
    @classmethod
    def _unique(cls, ids: list[str]) -> list[str]:
        return list(dict.fromkeys(ids))


@service_flow("assign_frontline_routes")
async def assign_frontline_routes(
    project_id: str, deployment_id: str, frontline_route_ids: list[str]
) -> int:
    """Reassign the given frontline routes to a deployment of the project; returns the count."""
    params = parse(
        AssignParams,
        project_id=project_id,
        deployment_id=deployment_id,
        frontline_route_ids=frontline_route_ids,
    )
    async with critical_section(f"routing:project:{params.project_id}"):
        return reassign_routes(params.project_id, params.deployment_id, params.frontline_route_ids)
