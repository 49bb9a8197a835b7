"""DeploymentService (flows/deployment.py): desired-state changes, last writer wins.

``schedule_desired_state_change`` is called in-process; the ``change_desired_state`` run it
sends goes through the Prefect API to the real worker (``served``, one subprocess for this
module, serving the whole catalogue), exactly as in production. ``change_desired_state`` is
also called in-process on a transition seeded in the DB, for its refusals and no-ops.
Every test seeds its own project and deployment and deletes them at the end.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from uuid import UUID

import pytest
import sqlalchemy as sa
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import FlowRun, StateType, TaskRun
from prefect.client.schemas.sorting import FlowRunSort

from flows.deployment import (
    change_desired_state,
    clear_scheduled_state_changes,
    schedule_desired_state_change,
)
from tasks.db.engine import transaction
from tasks.db.schema import deployment_transitions, projects
from tests.flows.helpers import fails_at_once, poll_until
from tests.support.seed import (
    Project,
    SeedIds,
    cleanup,
    desired_state,
    fresh_region,
    insert_deployment,
    insert_topology,
    insert_transition,
    new_id,
    seed_project,
    topology,
    transition,
)
from worker.kernel.errors import InvalidParameterError, RefusedError
from worker.kernel.locks import ensure_key_limit

CHANGE_DEPLOYMENT = "change_desired_state/ctrl"
TOPOLOGY_STATUS = {"running": "started", "standby": "stopped", "archived": "stopped"}
LONG_DELAY_MILLIS = 10 * 60 * 1000  # far beyond the worker's 10 s prefetch: stays Scheduled
UNFINISHED = {StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.CANCELLING}


@dataclass
class Seeded:
    url: str
    project: Project
    deployment_id: str
    regions: list[str]

    def snapshot(self) -> tuple[str | None, dict[str, tuple[str, int]]]:
        """The deployment's desired state and topology ``{region: (status, version)}``."""
        return desired_state(self.url, self.deployment_id), topology(self.url, self.deployment_id)


@pytest.fixture
def seeded(control_db) -> Iterator[Seeded]:
    """A deployment (desired state ``running``) with topology rows in two fresh regions, in a
    project whose live deployment is another one."""
    ids = SeedIds()
    project = seed_project(control_db, ids)
    deployment_id = insert_deployment(control_db, ids, project)
    regions = [fresh_region(), fresh_region()]
    for region in regions:
        insert_topology(control_db, ids, project, deployment_id, region)
    live = insert_deployment(control_db, ids, project)
    set_live_deployment(control_db, project.project_id, live)
    try:
        yield Seeded(control_db, project, deployment_id, regions)
    finally:
        cleanup(control_db, ids)


def set_live_deployment(url: str, project_id: str, deployment_id: str) -> None:
    with transaction(url) as connection:
        connection.execute(
            sa.update(projects)
            .where(projects.c.id == project_id)
            .values(live_deployment_id=deployment_id)
        )


async def change_runs(deployment_id: str) -> list[FlowRun]:
    """Every ``change_desired_state`` run sent for ``deployment_id``, oldest first."""
    async with get_client() as client:
        deployment = await client.read_deployment_by_name(CHANGE_DEPLOYMENT)
        found: list[FlowRun] = []
        while True:
            page = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id])
                ),
                sort=FlowRunSort.ID_DESC,
                limit=200,
                offset=len(found),
            )
            found.extend(page)
            if len(page) < 200:
                break
    mine = [run for run in found if run.parameters.get("deployment_id") == deployment_id]
    return sorted(mine, key=lambda run: run.created or run.expected_start_time)


def state_of(run: FlowRun) -> StateType | None:
    return run.state.type if run.state else None


async def wait_for_change_runs(deployment_id: str, count: int, timeout: float) -> list[FlowRun]:
    """Wait until ``count`` change runs of the deployment exist and none is unfinished."""
    runs: list[FlowRun] = []

    async def settled() -> bool:
        nonlocal runs
        runs = await change_runs(deployment_id)
        return len(runs) >= count and not any(state_of(run) in UNFINISHED for run in runs)

    await poll_until(settled, timeout, f"{count} change run(s) of {deployment_id} to finish")
    return runs


async def read_flow_run(flow_run_id: str) -> FlowRun:
    async with get_client() as client:
        return await client.read_flow_run(UUID(flow_run_id))


# -- through the served worker -----------------------------------------------------------------


@pytest.mark.parametrize(("initial", "new"), [("standby", "running"), ("running", "archived")])
def test_schedule_now_applies_state_and_new_topology_versions(served, control_db, initial, new):
    """A change scheduled with no delay sets the deployment's desired state and, in every
    region, the matching topology status with a fresh, greater version; the transition is
    then removed."""
    ids = SeedIds()
    project = seed_project(control_db, ids)
    deployment_id = insert_deployment(control_db, ids, project, desired_state=initial)
    for region in (fresh_region(), fresh_region()):
        insert_topology(control_db, ids, project, deployment_id, region, TOPOLOGY_STATUS[initial])
    try:
        before = topology(control_db, deployment_id)
        asyncio.run(schedule_desired_state_change(deployment_id, new, 0))
        runs = asyncio.run(wait_for_change_runs(deployment_id, 1, timeout=90))
        assert [state_of(run) for run in runs] == [StateType.COMPLETED]
        assert desired_state(control_db, deployment_id) == new
        after = topology(control_db, deployment_id)
        assert after.keys() == before.keys()
        for region, (status, version) in after.items():
            assert status == TOPOLOGY_STATUS[new]
            assert version > before[region][1]
        assert transition(control_db, deployment_id) is None
    finally:
        cleanup(control_db, ids)


def test_clear_cancels_the_delayed_change(served, seeded):
    """A change scheduled far ahead, then cleared: its scheduled run ends Cancelled, the
    transition is gone and the deployment is unchanged."""
    before = seeded.snapshot()
    asyncio.run(schedule_desired_state_change(seeded.deployment_id, "archived", LONG_DELAY_MILLIS))
    pending = transition(seeded.url, seeded.deployment_id)
    assert pending is not None and pending.state == "archived"
    assert pending.scheduled_flow_run_id
    assert state_of(asyncio.run(read_flow_run(pending.scheduled_flow_run_id))) == (
        StateType.SCHEDULED
    )

    asyncio.run(clear_scheduled_state_changes(seeded.deployment_id))

    assert transition(seeded.url, seeded.deployment_id) is None
    cancelled = asyncio.run(read_flow_run(pending.scheduled_flow_run_id))
    assert state_of(cancelled) == StateType.CANCELLED
    assert seeded.snapshot() == before


def test_newer_schedule_supersedes_and_cancels_the_older(served, seeded):
    """A newer schedule wins: the older delayed run is cancelled, the newer one applies."""
    asyncio.run(schedule_desired_state_change(seeded.deployment_id, "archived", LONG_DELAY_MILLIS))
    older = transition(seeded.url, seeded.deployment_id)
    assert older is not None and older.scheduled_flow_run_id

    asyncio.run(schedule_desired_state_change(seeded.deployment_id, "standby", 0))
    assert state_of(asyncio.run(read_flow_run(older.scheduled_flow_run_id))) == (
        StateType.CANCELLED
    )

    runs = asyncio.run(wait_for_change_runs(seeded.deployment_id, 2, timeout=90))
    assert [state_of(run) for run in runs] == [StateType.CANCELLED, StateType.COMPLETED]
    assert runs[1].parameters["state"] == "standby"
    assert desired_state(seeded.url, seeded.deployment_id) == "standby"
    assert {status for status, _ in topology(seeded.url, seeded.deployment_id).values()} == {
        "stopped"
    }
    assert transition(seeded.url, seeded.deployment_id) is None


# -- change_desired_state in-process, on a seeded transition ---------------------------------


def test_changing_the_live_deployment_is_refused(seeded):
    """The project's live deployment cannot be changed: terminal RefusedError, nothing
    written, and the transition is kept (as in the original)."""
    set_live_deployment(seeded.url, seeded.project.project_id, seeded.deployment_id)
    nonce = uuid.uuid4().hex
    insert_transition(seeded.url, seeded.deployment_id, nonce, "standby")
    before = seeded.snapshot()

    error = fails_at_once(
        RefusedError,
        change_desired_state,
        deployment_id=seeded.deployment_id,
        nonce=nonce,
        state="standby",
    )

    assert seeded.deployment_id in str(error)
    assert seeded.snapshot() == before
    kept = transition(seeded.url, seeded.deployment_id)
    assert kept is not None and kept.nonce == nonce


def test_change_of_a_deleted_deployment_is_a_noop(control_db):
    """A change whose deployment was deleted meanwhile succeeds and writes nothing."""
    deployment_id = new_id("d")
    nonce = uuid.uuid4().hex
    insert_transition(control_db, deployment_id, nonce, "archived")
    try:
        assert asyncio.run(change_desired_state(deployment_id, nonce, "archived")) is None
        assert desired_state(control_db, deployment_id) is None
        assert topology(control_db, deployment_id) == {}
        assert transition(control_db, deployment_id) is None
    finally:
        cleanup(control_db, SeedIds(), deployment_id)


def test_change_with_a_stale_nonce_is_a_noop(seeded):
    """A change whose nonce is not the pending one (superseded) changes nothing and leaves
    the pending transition to its own run."""
    nonce = uuid.uuid4().hex
    insert_transition(seeded.url, seeded.deployment_id, nonce, "standby")
    before = seeded.snapshot()

    asyncio.run(change_desired_state(seeded.deployment_id, uuid.uuid4().hex, "archived"))

    assert seeded.snapshot() == before
    kept = transition(seeded.url, seeded.deployment_id)
    assert kept is not None and kept.nonce == nonce


def test_change_without_a_transition_is_a_noop(seeded):
    """A change after a clear (no pending transition) changes nothing."""
    before = seeded.snapshot()
    asyncio.run(change_desired_state(seeded.deployment_id, uuid.uuid4().hex, "archived"))
    assert seeded.snapshot() == before
    assert transition(seeded.url, seeded.deployment_id) is None


@pytest.mark.parametrize(
    ("flow", "field", "value"),
    [
        (schedule_desired_state_change, "state", "paused"),
        (schedule_desired_state_change, "state", "UNSPECIFIED"),
        (schedule_desired_state_change, "state", 1),
        (schedule_desired_state_change, "deployment_id", ""),
        (schedule_desired_state_change, "deployment_id", None),
        (schedule_desired_state_change, "delay_millis", -1),
        (schedule_desired_state_change, "delay_millis", "100"),
        (schedule_desired_state_change, "delay_millis", 1.5),
        (change_desired_state, "nonce", ""),
        (change_desired_state, "state", "paused"),
        (change_desired_state, "deployment_id", ""),
        (clear_scheduled_state_changes, "deployment_id", ""),
        (clear_scheduled_state_changes, "deployment_id", 42),
    ],
)
def test_bad_parameters_fail_at_once_and_write_nothing(seeded, flow, field, value):
    """Bad parameters: InvalidParameterError naming the parameter, before anything is
    written (no transition, no change to the deployment)."""
    valid = {
        schedule_desired_state_change: {"deployment_id": seeded.deployment_id, "state": "standby"},
        change_desired_state: {
            "deployment_id": seeded.deployment_id,
            "nonce": uuid.uuid4().hex,
            "state": "standby",
        },
        clear_scheduled_state_changes: {"deployment_id": seeded.deployment_id},
    }[flow]
    before = seeded.snapshot()

    error = fails_at_once(InvalidParameterError, flow, **{**valid, field: value})

    assert error.parameter == field
    assert seeded.snapshot() == before
    assert transition(seeded.url, seeded.deployment_id) is None
    with transaction(seeded.url) as connection:
        assert (
            connection.execute(
                sa.select(sa.func.count())
                .select_from(deployment_transitions)
                .where(deployment_transitions.c.deployment_id.in_(["", str(value)]))
            ).scalar_one()
            == 0
        )


# -- SPEC §5 scenario 2 -----------------------------------------------------------------------


async def _locked_spans(flow_run_ids: list[UUID]) -> dict[UUID, tuple[float, float]] | None:
    """Per schedule call, from the first step's start to the last step's end (all its steps run
    under the key), as the Prefect API recorded them; None until every call's steps are in."""
    async with get_client() as client:
        found: list[TaskRun] = []
        while True:
            page = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)),
                limit=200,
                offset=len(found),
            )
            found.extend(page)
            if len(page) < 200:
                break
    steps: dict[UUID, list[TaskRun]] = {run_id: [] for run_id in flow_run_ids}
    for task_run in found:
        if task_run.flow_run_id in steps and task_run.start_time and task_run.end_time:
            steps[task_run.flow_run_id].append(task_run)
    # new_nonce, set_transition, send_call, remember_scheduled_run (+ cancel_scheduled_run).
    if any(len(task_runs) < 4 for task_runs in steps.values()):
        return None
    return {
        run_id: (
            min(t.start_time.timestamp() for t in task_runs if t.start_time),
            max(t.end_time.timestamp() for t in task_runs if t.end_time),
        )
        for run_id, task_runs in steps.items()
    }


@pytest.mark.slow
@pytest.mark.timeout(900)  # 100 critical sections in a row: 4-6 min on a loaded 2-CPU machine
def test_concurrent_schedules_last_writer_wins(served, seeded):
    """SPEC §5 scenario 2: 50 concurrent schedules with random delays (0-3 s) and random
    states on one deployment. The critical sections on ``deployment:{id}`` never overlap;
    each sent exactly one change run, in lock order; the final desired state is the one of
    the schedule that held the key last, whose change run completed; every other change run
    ended Completed (a no-op once superseded) or Cancelled (superseded while scheduled)."""
    calls = 50
    rng = random.Random(uuid.uuid4().int)
    plans = [
        (rng.choice(["running", "standby", "archived"]), rng.randint(0, 3000)) for _ in range(calls)
    ]

    async def schedule(index: int, state: str, delay: int) -> UUID:
        # All 50 calls are in flight together (each waits for the key for minutes); their
        # starts are spread over 2.5 s because 50 flow-run creations in the same instant
        # overload the test's SQLite-backed Prefect server (503 on POST /flow_runs/).
        await asyncio.sleep(index * 0.05)
        final = await schedule_desired_state_change(
            seeded.deployment_id, state, delay, return_state=True
        )
        assert final.is_completed(), final
        return final.state_details.flow_run_id

    async def schedule_all() -> list[UUID]:
        # The key's limit exists after a deployment's first call; creating it up front keeps
        # 50 first calls from racing to create it.
        await ensure_key_limit(f"deployment:{seeded.deployment_id}")
        return list(
            await asyncio.gather(
                *(schedule(index, state, delay) for index, (state, delay) in enumerate(plans))
            )
        )

    schedule_runs = asyncio.run(schedule_all())
    state_of_call = {run_id: plans[index][0] for index, run_id in enumerate(schedule_runs)}
    change = asyncio.run(wait_for_change_runs(seeded.deployment_id, calls, timeout=300))
    assert len(change) == calls, "each schedule sends exactly one change run"

    spans: dict[UUID, tuple[float, float]] = {}

    async def spans_recorded() -> bool:
        recorded = await _locked_spans(schedule_runs)
        if recorded is not None:
            spans.update(recorded)
        return recorded is not None

    asyncio.run(poll_until(spans_recorded, 60, "the schedule calls' steps to be recorded"))
    in_lock_order = sorted(schedule_runs, key=lambda run_id: spans[run_id][0])
    for previous, following in itertools.pairwise(in_lock_order):
        assert spans[following][0] >= spans[previous][1], (
            f"critical sections of {previous} and {following} overlap: "
            f"{spans[previous]} vs {spans[following]}"
        )

    # Each change run was created by send_call inside exactly one critical section: the
    # order of the change runs is the lock order, and each carries its schedule's state.
    senders = []
    for run in change:
        assert run.created is not None
        created = run.created.timestamp()
        inside = [r for r in schedule_runs if spans[r][0] <= created <= spans[r][1]]
        assert len(inside) == 1, f"change run {run.id} created outside one critical section"
        assert run.parameters["state"] == state_of_call[inside[0]]
        senders.append(inside[0])
    assert senders == in_lock_order

    last_state = state_of_call[in_lock_order[-1]]
    assert state_of(change[-1]) == StateType.COMPLETED
    assert {state_of(run) for run in change} <= {StateType.COMPLETED, StateType.CANCELLED}
    assert desired_state(seeded.url, seeded.deployment_id) == last_state
    statuses = {status for status, _ in topology(seeded.url, seeded.deployment_id).values()}
    assert statuses == {TOPOLOGY_STATUS[last_state]}
    assert transition(seeded.url, seeded.deployment_id) is None
