"""RoutingService (flows/routing.py): reassign frontline routes, all or none.

In-process flow calls against the session's real Prefect server (per-key locks) and MariaDB.
Each test seeds its own project: deployments ``old`` and ``new``, three routes on ``old``, and
a second project with its own deployment and route; everything is deleted at the end.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from flows.routing import assign_frontline_routes
from tests.flows.helpers import fails_at_once
from tests.support.seed import (
    SeedIds,
    cleanup,
    insert_deployment,
    insert_route,
    new_id,
    route_deployments,
    seed_project,
)
from worker.kernel.errors import ConflictError, InvalidParameterError, NotFoundError


@dataclass
class Routing:
    url: str
    project_id: str
    old: str  # the deployment the routes point at
    new: str  # another deployment of the project
    routes: list[str]
    other_deployment: str  # a deployment of another project
    other_route: str  # a route of another project

    def where(self) -> dict[str, str]:
        """Every seeded route's current deployment."""
        return route_deployments(self.url, [*self.routes, self.other_route])

    def untouched(self) -> dict[str, str]:
        return {**dict.fromkeys(self.routes, self.old), self.other_route: self.other_deployment}


@pytest.fixture
def seeded(control_db):
    ids = SeedIds()
    project = seed_project(control_db, ids)
    other = seed_project(control_db, ids)
    old = insert_deployment(control_db, ids, project)
    new = insert_deployment(control_db, ids, project)
    other_deployment = insert_deployment(control_db, ids, other)
    try:
        yield Routing(
            url=control_db,
            project_id=project.project_id,
            old=old,
            new=new,
            routes=[insert_route(control_db, ids, project, old) for _ in range(3)],
            other_deployment=other_deployment,
            other_route=insert_route(control_db, ids, other, other_deployment),
        )
    finally:
        cleanup(control_db, ids)


def test_all_routes_move_in_one_call(seeded):
    """Every given route points at the deployment afterwards; the count is returned."""
    moved = asyncio.run(assign_frontline_routes(seeded.project_id, seeded.new, seeded.routes))
    assert moved == 3
    assert seeded.where() == {
        **dict.fromkeys(seeded.routes, seeded.new),
        seeded.other_route: seeded.other_deployment,
    }


def test_missing_route_is_terminal_and_moves_nothing(seeded):
    """A route that does not exist: NotFoundError naming it, and no other route moved (one
    transaction, not one update per route)."""
    missing = new_id("fr")
    ids = [seeded.routes[0], missing, seeded.routes[1]]
    error = fails_at_once(
        NotFoundError,
        assign_frontline_routes,
        project_id=seeded.project_id,
        deployment_id=seeded.new,
        frontline_route_ids=ids,
    )
    assert missing in str(error)
    assert seeded.where() == seeded.untouched()


def test_route_of_another_project_is_a_conflict_and_moves_nothing(seeded):
    """A route of another project: ConflictError naming it, nothing moved."""
    error = fails_at_once(
        ConflictError,
        assign_frontline_routes,
        project_id=seeded.project_id,
        deployment_id=seeded.new,
        frontline_route_ids=[*seeded.routes, seeded.other_route],
    )
    assert seeded.other_route in str(error)
    assert seeded.where() == seeded.untouched()


@pytest.mark.parametrize(
    ("whose", "terminal"), [("other project", ConflictError), ("missing", NotFoundError)]
)
def test_deployment_outside_the_project_is_terminal_and_moves_nothing(seeded, whose, terminal):
    """A deployment of another project (conflict) or none at all (not found) is terminal;
    nothing moved."""
    deployment = seeded.other_deployment if whose == "other project" else new_id("d")
    error = fails_at_once(
        terminal,
        assign_frontline_routes,
        project_id=seeded.project_id,
        deployment_id=deployment,
        frontline_route_ids=seeded.routes,
    )
    assert deployment in str(error)
    assert seeded.where() == seeded.untouched()


def test_duplicate_route_ids_are_accepted(seeded):
    """A route listed twice moves once."""
    ids = [seeded.routes[0], seeded.routes[0], seeded.routes[1]]
    assert asyncio.run(assign_frontline_routes(seeded.project_id, seeded.new, ids)) == 2
    assert seeded.where() == {
        seeded.routes[0]: seeded.new,
        seeded.routes[1]: seeded.new,
        seeded.routes[2]: seeded.old,
        seeded.other_route: seeded.other_deployment,
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("project_id", ""),
        ("project_id", None),
        ("project_id", " p"),
        ("deployment_id", ""),
        ("deployment_id", 123),
        ("frontline_route_ids", "fr_1"),
        ("frontline_route_ids", None),
        ("frontline_route_ids", ["ok", ""]),
        ("frontline_route_ids", ["ok", 7]),
        ("frontline_route_ids", {"fr_1": True}),
    ],
)
def test_bad_parameters_fail_at_once_and_move_nothing(seeded, field, value):
    """Bad parameters: InvalidParameterError naming the parameter, before any DB change."""
    params = {
        "project_id": seeded.project_id,
        "deployment_id": seeded.new,
        "frontline_route_ids": seeded.routes,
        field: value,
    }
    error = fails_at_once(InvalidParameterError, assign_frontline_routes, **params)
    assert error.parameter.split(".")[0] == field
    assert seeded.where() == seeded.untouched()


def test_concurrent_calls_on_one_project_serialize(seeded):
    """Two concurrent reassignments of the same routes (in opposite orders) to two
    deployments: the calls run one after the other, so every route ends on the same one."""

    async def both() -> list[int]:
        return list(
            await asyncio.gather(
                assign_frontline_routes(seeded.project_id, seeded.old, seeded.routes),
                assign_frontline_routes(seeded.project_id, seeded.new, seeded.routes[::-1]),
            )
        )

    for _ in range(2):
        assert asyncio.run(both()) == [3, 3]
        final = {seeded.where()[route] for route in seeded.routes}
        assert len(final) == 1 and final <= {seeded.old, seeded.new}, seeded.where()
