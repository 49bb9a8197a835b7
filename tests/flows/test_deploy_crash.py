"""DeployService under SIGKILL and under concurrency, through real worker subprocesses.

The crash matrix stops a deploy at a step boundary (its next write blocked on a row lock the
test holds, or the instance wait with no data plane yet), SIGKILLs the worker and the run's
process, and starts a new worker: the same run resumes and ends ``ready`` with exactly one
topology row per region, one sentinel per environment and region, two policies per region and
one route per domain (the commit domain's random suffix replays). The local data plane runs in
this process (``running_dataplane``), so it survives the kills.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import pytest
import sqlalchemy as sa
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from tasks.db.deploys import failure_message
from tasks.db.schema import frontline_routes, projects, region_versions, workspaces
from tasks.db.versions import increment_region_version
from tests.flows.deploy_support import running_dataplane
from tests.support.deploy_seed import (
    DeploySeed,
    add_deployment,
    cleanup_deploy,
    deployment_row,
    policies_of,
    routes_of,
    seed_deploy,
    sentinels_of,
    topologies_of,
)
from tests.support.seed import new_id
from tests.support.waits import holding_row_lock, row_lock_waits, run_pid, wait_for
from worker import client as worker_client
from worker.kernel.clock import now_ms

pytestmark = [pytest.mark.slow, pytest.mark.mysql]

FAST = {"UNKEY_DEPLOY_POLL_SECONDS": "0.1", "UNKEY_DEFAULT_DOMAIN": "unkey.test"}


def _seed_with_sticky_route(url: str) -> tuple[DeploySeed, str]:
    seed = seed_deploy(url)
    route_id = new_id("fr")
    with sa.create_engine(url).begin() as connection:
        connection.execute(
            frontline_routes.insert().values(
                id=route_id,
                project_id=seed.project_id,
                deployment_id="d_before",
                environment_id=seed.environment_id,
                fully_qualified_domain_name=f"{route_id}.custom.test",
                sticky="environment",
                created_at=now_ms(),
            )
        )
        for region in seed.regions:  # counters exist, so a test can lock one
            increment_region_version(connection, region)
    return seed, route_id


BLOCKERS: dict[str, Callable[[DeploySeed, str], Any] | None] = {
    # find workspace: the namespace is written while the workspace row is locked
    "workspace": lambda s, r: sa.select(workspaces).where(workspaces.c.id == s.workspace_id),
    # the first region version (for the topology rows)
    "versions": lambda s, r: sa.select(region_versions).where(
        region_versions.c.region == s.regions[0]
    ),
    # the instance wait: rows written, no data plane yet
    "instances": None,
    # routing's reassignment (the environment-sticky route is one it moves)
    "routing": lambda s, r: sa.select(frontline_routes).where(frontline_routes.c.id == r),
    # the live swap (after `ready`)
    "live": lambda s, r: sa.select(projects).where(projects.c.id == s.project_id),
}


def _kill_at(seed: DeploySeed, route: str, blocker: str, prefect_api, worker_factory) -> UUID:
    """Start a deploy on a worker, let it reach ``blocker``, SIGKILL worker and run."""
    url = seed.url
    query = BLOCKERS[blocker]
    holding = holding_row_lock(url, query(seed, route)) if query else _nothing()
    # The instances are reported except when the wait itself is the boundary.
    plane = running_dataplane(url, seed.regions) if query else _nothing()
    with holding, plane:
        first = worker_factory(**FAST)
        run_id = asyncio.run(worker_client.deploy(seed.deployment_id, docker_image="nginx:1.27"))
        if query is None:
            wait_for(lambda: len(policies_of(url, seed.deployment_id)) == 4, 90, "the rows")
        else:
            wait_for(lambda: row_lock_waits(url) > 0, 90, f"the deploy to block at {blocker}")
        pid = run_pid(prefect_api.state_dir, run_id)
        first.kill()
        os.kill(pid, signal.SIGKILL)
    return UUID(str(run_id))


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@pytest.mark.parametrize("blocker", list(BLOCKERS))
def test_deploy_killed_at_a_step_boundary_resumes_to_ready_once(
    prefect_api, control_db, worker_factory, blocker: str
) -> None:
    """SIGKILL of the worker at a step boundary of a deploy (parametrized over boundaries):
    after a new worker starts, the run completes `ready` with one topology row per region,
    one sentinel per environment and region, two policies per region and one route per
    domain, all on the deployment."""
    seed, route = _seed_with_sticky_route(control_db)
    try:
        run_id = _kill_at(seed, route, blocker, prefect_api, worker_factory)
        with running_dataplane(control_db, seed.regions):
            worker_factory(**FAST)
            result = asyncio.run(worker_client.wait_for_result(run_id, timeout=180))

        assert result["status"] == "ready"
        assert deployment_row(control_db, seed.deployment_id).status == "ready"
        assert [t.region for t in topologies_of(control_db, seed.deployment_id)] == seed.regions
        assert [s.region for s in sentinels_of(control_db, seed.environment_id)] == seed.regions
        assert len(policies_of(control_db, seed.deployment_id)) == 4
        routes = routes_of(control_db, seed.project_id)
        assert len(routes) == 5, routes  # commit, branch, environment, live + the seeded one
        assert {deployment for deployment, _ in routes.values()} == {seed.deployment_id}
    finally:
        cleanup_deploy(seed)


def test_deploy_killed_beyond_the_resume_limit_ends_failed(
    prefect_api, control_db, worker_factory
) -> None:
    """A deploy killed more often than the worker resumes (limit 0 here) is given up: the
    give-up hook leaves the deployment `failed` with a message, never `deploying`."""
    seed, route = _seed_with_sticky_route(control_db)
    try:
        run_id = _kill_at(seed, route, "instances", prefect_api, worker_factory)
        worker_factory(**FAST, UNKEY_RESUME_MAX_ATTEMPTS="0")
        wait_for(
            lambda: deployment_row(control_db, seed.deployment_id).status == "failed",
            120,
            "the deployment to be marked failed",
        )
        message = failure_message(seed.deployment_id)
        assert message, "a failed deployment carries its reason"
        with pytest.raises(worker_client.FlowRunFailed):
            asyncio.run(worker_client.wait_for_result(run_id, timeout=60))
    finally:
        cleanup_deploy(seed)


async def _critical_intervals(run_ids: list[UUID]) -> list[tuple[float, float]]:
    """Per run: from its first step under the key to its last step (task run times)."""
    intervals = []
    async with get_client() as client:
        for run_id in run_ids:
            tasks = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
            )
            inside = [
                t
                for t in tasks
                if t.start_time
                and t.end_time
                # task run names carry a suffix ("finding deployment project-e65")
                and not t.name.startswith("finding deployment project")
            ]
            intervals.append(
                (
                    min(t.start_time.timestamp() for t in inside),  # type: ignore[union-attr]
                    max(t.end_time.timestamp() for t in inside),  # type: ignore[union-attr]
                )
            )
    return sorted(intervals)


def _overlaps(intervals: list[tuple[float, float]]) -> int:
    return sum(1 for (_, end), (start, _) in itertools.pairwise(intervals) if start < end)


def test_deploys_on_one_project_never_overlap_and_on_ten_projects_do(
    prefect_api, control_db, worker_factory
) -> None:
    """10 concurrent deploys on one project run one at a time (their critical sections,
    recorded from their steps' times, never overlap); 10 deploys on 10 projects do overlap."""
    one = seed_deploy(control_db, regions=1)
    for _ in range(9):
        add_deployment(one)
    many = [seed_deploy(control_db, regions=1) for _ in range(10)]
    seeds = [one, *many]
    try:
        regions = [region for seed in seeds for region in seed.regions]
        with running_dataplane(control_db, regions):
            worker_factory(**FAST)

            async def deploy_all(deployment_ids: list[str]) -> list[UUID]:
                runs = await asyncio.gather(
                    *(worker_client.deploy(d, docker_image="nginx:1.27") for d in deployment_ids)
                )
                await asyncio.gather(*(worker_client.wait_for_result(r, timeout=300) for r in runs))
                return [UUID(str(r)) for r in runs]

            same = asyncio.run(deploy_all(one.deployment_ids))
            spread = asyncio.run(deploy_all([seed.deployment_id for seed in many]))

        assert _overlaps(asyncio.run(_critical_intervals(same))) == 0
        assert _overlaps(asyncio.run(_critical_intervals(spread))) > 0
    finally:
        for seed in seeds:
            cleanup_deploy(seed)
