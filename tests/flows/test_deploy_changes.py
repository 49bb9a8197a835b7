"""DeployService promote and rollback (flows/deploy_changes.py, reference §2.2-2.3), and the
**(fix)** that a deploy to a rolled-back project leaves its live route alone.

Flows run in-process against the session's MariaDB and Prefect server. Each test seeds its own
workspace, project and production environment (fresh regions), with an ``environment``-sticky
and a ``live``-sticky route on the old live deployment, and removes everything after. A real
worker (module scope) has served the catalogue: promote *sends* the old live deployment's
standby schedule as a run of its own, which that worker executes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.client.schemas.objects import FlowRun, StateType

from flows.deploy import deploy, promote, rollback
from flows.rollout import STANDBY_DELAY_MILLIS
from tasks.db.engine import engine_for
from tasks.db.schema import deployment_transitions, deployments, frontline_routes, projects
from tests.flows.deploy_support import deploy_settings, running_dataplane
from tests.flows.helpers import fails_at_once, poll_until
from tests.support.deploy_seed import (
    DeploySeed,
    add_deployment,
    add_environment,
    cleanup_deploy,
    deployment_row,
    insert_route,
    project_row,
    routes_of,
    seed_deploy,
    set_deployment,
    set_project,
)
from tests.support.seed import desired_state, insert_transition, new_id, transition
from worker.kernel.errors import (
    ConflictError,
    InvalidParameterError,
    NotFoundError,
    RefusedError,
    TerminalError,
)

pytestmark = pytest.mark.mysql


@dataclass
class Scene:
    """A project whose live deployment ``live`` holds the environment and live routes, and
    another ready deployment ``target`` (with a pending desired-state transition)."""

    seed: DeploySeed
    live: str
    target: str
    env_fqdn: str
    live_fqdn: str
    branch_fqdn: str
    others: list[DeploySeed] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.seed.url


@pytest.fixture
def scene(control_db) -> Iterator[Scene]:
    """A fresh production environment set up as ``Scene`` describes (removed after)."""
    seed = seed_deploy(control_db)
    s = Scene(
        seed=seed,
        live=add_deployment(seed, status="ready"),
        target=add_deployment(seed, status="ready"),
        env_fqdn=f"{seed.project_slug}-production-{seed.workspace_slug}.unkey.test",
        live_fqdn=f"{seed.project_slug}-{seed.workspace_slug}.unkey.test",
        branch_fqdn=f"{seed.project_slug}-git-main-{seed.workspace_slug}.unkey.test",
    )
    try:
        set_project(seed.url, seed.project_id, live_deployment_id=s.live)
        insert_route(seed, s.env_fqdn, "environment", s.live)
        insert_route(seed, s.live_fqdn, "live", s.live)
        insert_route(seed, s.branch_fqdn, "branch", s.live)  # not sticky to live: stays
        insert_transition(seed.url, s.target, new_id("n"), "standby")
        yield s
    finally:
        for other in [*s.others, seed]:
            cleanup_deploy(other)


def _snapshot(s: Scene) -> dict[str, Any]:
    """Every row a promote or rollback could write: the projects, their deployments, routes
    and pending transitions (whole rows, ``updated_at`` included)."""
    seeds = [s.seed, *s.others]
    project_ids = [x.project_id for x in seeds]
    deployment_ids = [d for x in seeds for d in x.deployment_ids]
    tables = {
        "projects": sa.select(projects).where(projects.c.id.in_(project_ids)),
        "deployments": sa.select(deployments).where(deployments.c.id.in_(deployment_ids)),
        "routes": sa.select(frontline_routes).where(frontline_routes.c.project_id.in_(project_ids)),
        "transitions": sa.select(deployment_transitions).where(
            deployment_transitions.c.deployment_id.in_(deployment_ids)
        ),
    }
    with engine_for(s.url).connect() as connection:
        return {
            name: sorted(tuple(row) for row in connection.execute(query))
            for name, query in tables.items()
        }


def _drop_sticky_routes(s: Scene) -> None:
    with engine_for(s.url).begin() as connection:
        connection.execute(
            sa.delete(frontline_routes).where(
                frontline_routes.c.fully_qualified_domain_name.in_([s.env_fqdn, s.live_fqdn])
            )
        )


async def _runs_of(flow_name: str, deployment_id: str) -> list[FlowRun]:
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name]))
        )
    return [run for run in runs if run.parameters.get("deployment_id") == deployment_id]


def test_promote_moves_live_routes_and_schedules_old_live_standby(served, scene) -> None:
    """Promote (§2.2): the environment and live routes move to the target (a branch route
    stays), the project's live deployment is the target and not rolled back, the target's
    pending transition is cleared, and the old live deployment's standby is *sent* as a
    ``schedule_desired_state_change`` run (30 min), which schedules its change."""
    s = scene
    before = datetime.now(UTC)
    with deploy_settings():
        result = asyncio.run(promote(target_deployment_id=s.target))

    assert result == {"live_deployment_id": s.target, "previous_live": s.live, "routes": 2}
    assert routes_of(s.url, s.seed.project_id) == {
        s.env_fqdn: (s.target, "environment"),
        s.live_fqdn: (s.target, "live"),
        s.branch_fqdn: (s.live, "branch"),
    }
    project = project_row(s.url, s.seed.project_id)
    assert (project.live_deployment_id, project.is_rolled_back) == (s.target, False)
    assert transition(s.url, s.target) is None

    sent = asyncio.run(_runs_of("schedule_desired_state_change", s.live))
    assert [run.parameters for run in sent] == [
        {"deployment_id": s.live, "state": "standby", "delay_millis": STANDBY_DELAY_MILLIS}
    ]

    async def scheduled() -> bool:
        runs = await _runs_of("change_desired_state", s.live)
        return any(r.state is not None and r.state.type == StateType.SCHEDULED for r in runs)

    asyncio.run(poll_until(scheduled, 60, "the worker to schedule the old live's standby"))
    (change,) = asyncio.run(_runs_of("change_desired_state", s.live))
    assert change.parameters["state"] == "standby"
    due = change.expected_start_time
    assert due is not None and before + timedelta(minutes=29) < due
    pending = transition(s.url, s.live)
    assert pending is not None and pending.state == "standby"
    assert desired_state(s.url, s.live) == "running"  # only in 30 minutes


def test_rollback_moves_routes_marks_rolled_back_and_runs_target(control_db, scene) -> None:
    """Rollback (§2.3): the environment and live routes move back to the target, the project's
    live deployment is the target *rolled back*, the target's pending transition is cleared
    and **(fix)** its desired state is ``running`` again (it was on standby); the source's
    desired state is not touched."""
    s = scene
    set_deployment(s.url, s.target, desired_state="standby")
    with deploy_settings():
        result = asyncio.run(rollback(source_deployment_id=s.live, target_deployment_id=s.target))

    assert result == {"live_deployment_id": s.target, "rolled_back_from": s.live, "routes": 2}
    assert routes_of(s.url, s.seed.project_id) == {
        s.env_fqdn: (s.target, "environment"),
        s.live_fqdn: (s.target, "live"),
        s.branch_fqdn: (s.live, "branch"),
    }
    project = project_row(s.url, s.seed.project_id)
    assert (project.live_deployment_id, project.is_rolled_back) == (s.target, True)
    assert desired_state(s.url, s.target) == "running"
    assert transition(s.url, s.target) is None
    assert desired_state(s.url, s.live) == "running"


def _missing(s: Scene) -> tuple[str, list[str]]:
    missing = new_id("d")
    return missing, [missing]


def _status(status: str) -> Callable[[Scene], tuple[str, list[str]]]:
    def setup(s: Scene) -> tuple[str, list[str]]:
        set_deployment(s.url, s.target, status=status)
        return s.target, [s.target]

    return setup


def _no_live(s: Scene) -> tuple[str, list[str]]:
    set_project(s.url, s.seed.project_id, live_deployment_id=None)
    return s.target, [s.seed.project_id]


def _already_live(s: Scene) -> tuple[str, list[str]]:
    set_project(s.url, s.seed.project_id, live_deployment_id=s.target)
    return s.target, [s.target]


def _promote_no_routes(s: Scene) -> tuple[str, list[str]]:
    _drop_sticky_routes(s)
    return s.target, [s.target, s.seed.environment_id]


PROMOTE_REFUSALS: dict[str, tuple[type[TerminalError], Callable[[Scene], Any]]] = {
    "target not found": (NotFoundError, _missing),
    "target deploying": (RefusedError, _status("deploying")),
    "target failed": (RefusedError, _status("failed")),
    "project has no live deployment": (RefusedError, _no_live),
    "target already live": (RefusedError, _already_live),
    "no live or environment routes": (RefusedError, _promote_no_routes),
}


@pytest.mark.parametrize("case", list(PROMOTE_REFUSALS))
def test_promote_refusal_is_terminal_and_writes_nothing(control_db, scene, case: str) -> None:
    """Every refusal of §2.2 (not found, not ready, no live deployment, already live, no
    live/environment routes) fails at once with its error class, names the id, and writes
    nothing: routes, project, deployments and transitions are unchanged."""
    error, setup = PROMOTE_REFUSALS[case]
    target, named = setup(scene)
    before = _snapshot(scene)

    with deploy_settings():
        caught = fails_at_once(error, promote, target_deployment_id=target)

    assert all(ident in str(caught) for ident in named), (named, str(caught))
    assert _snapshot(scene) == before


def _same(s: Scene) -> tuple[str, str, list[str]]:
    return s.live, s.live, [s.live]


def _source_missing(s: Scene) -> tuple[str, str, list[str]]:
    missing = new_id("d")
    return missing, s.target, [missing]


def _target_missing(s: Scene) -> tuple[str, str, list[str]]:
    missing = new_id("d")
    return s.live, missing, [missing]


def _other_project(s: Scene) -> tuple[str, str, list[str]]:
    other = seed_deploy(s.url)
    s.others.append(other)
    foreign = add_deployment(other, status="ready")
    return s.live, foreign, [s.live, foreign]


def _other_environment(s: Scene) -> tuple[str, str, list[str]]:
    set_deployment(s.url, s.target, environment_id=add_environment(s.seed, "preview"))
    return s.live, s.target, [s.live, s.target]


def _source_not_live(s: Scene) -> tuple[str, str, list[str]]:
    earlier = add_deployment(s.seed, status="ready")
    return s.target, earlier, [s.target]


def _rollback_no_routes(s: Scene) -> tuple[str, str, list[str]]:
    _drop_sticky_routes(s)
    return s.live, s.target, [s.target]


ROLLBACK_REFUSALS: dict[str, tuple[type[TerminalError], Callable[[Scene], Any]]] = {
    "source is target": (InvalidParameterError, _same),
    "source not found": (NotFoundError, _source_missing),
    "target not found": (NotFoundError, _target_missing),
    "different project": (ConflictError, _other_project),
    "different environment": (ConflictError, _other_environment),
    "source not live": (RefusedError, _source_not_live),
    "no live or environment routes": (RefusedError, _rollback_no_routes),
}


@pytest.mark.parametrize("case", list(ROLLBACK_REFUSALS))
def test_rollback_refusal_is_terminal_and_writes_nothing(control_db, scene, case: str) -> None:
    """Every refusal of §2.3 (same deployment, source or target not found, another project or
    environment, source not live, no routes) fails at once with its error class, names the
    id, and writes nothing: no route moved, no live change, the target's transition not
    cleared and its (standby) desired state not forced to running."""
    set_deployment(scene.url, scene.target, desired_state="standby")
    error, setup = ROLLBACK_REFUSALS[case]
    source, target, named = setup(scene)
    before = _snapshot(scene)

    with deploy_settings():
        caught = fails_at_once(
            error, rollback, source_deployment_id=source, target_deployment_id=target
        )

    assert all(ident in str(caught) for ident in named), (named, str(caught))
    assert _snapshot(scene) == before


def test_deploy_to_rolled_back_project_keeps_live_route(control_db, scene) -> None:
    """**(fix)** A production deploy to a rolled-back project reaches ``ready`` and takes the
    environment route (as the original), but leaves the live route, the project's live
    deployment and its rolled-back flag where the rollback put them, and schedules no
    standby."""
    s = scene
    set_project(s.url, s.seed.project_id, is_rolled_back=True)
    new = s.seed.deployment_id
    with deploy_settings(), running_dataplane(s.url, s.seed.regions):
        result = asyncio.run(deploy(deployment_id=new, docker_image="nginx:1.27"))

    assert deployment_row(s.url, new).status == "ready"
    assert (result["live"], result["previous_live"]) == (False, None)
    routes = routes_of(s.url, s.seed.project_id)
    assert routes[s.live_fqdn] == (s.live, "live")
    assert routes[s.env_fqdn] == (new, "environment")
    assert [sticky for _, sticky in routes.values()].count("live") == 1
    project = project_row(s.url, s.seed.project_id)
    assert (project.live_deployment_id, project.is_rolled_back) == (s.live, True)
    assert transition(s.url, s.live) is None
