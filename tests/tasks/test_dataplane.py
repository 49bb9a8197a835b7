"""The local data plane (tasks/db/dataplane.py, worker/dataplane.py): a simulation of krane.

Each pass is driven with its own clock (``run_pass(now=...)``), so "not before the delay" is
checked without sleeping. Every test runs on MariaDB (the session database, rows seeded with
unique ids in a region of their own and deleted after) and on a fresh SQLite file.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import sqlalchemy as sa

from tasks.db.dataplane import report_instances, topologies_needing_instances
from tasks.db.engine import engine_for, transaction
from tasks.db.schema import init_schema, instances
from tests.support.seed import (
    Project,
    SeedIds,
    cleanup,
    delete_dataplane_rows,
    fresh_region,
    insert_deployment,
    insert_sentinel,
    insert_topology,
    instances_of,
    seed_project,
    sentinel_state,
    set_topology,
)
from worker.dataplane import LocalDataPlane, start_local_dataplane
from worker.settings import Settings


@pytest.fixture(params=["sqlite", pytest.param("mariadb", marks=pytest.mark.mysql)])
def url(request: pytest.FixtureRequest) -> str:
    """The control-plane database, on each backend."""
    if request.param == "mariadb":
        return str(request.getfixturevalue("mysql_url"))
    sqlite_url = str(request.getfixturevalue("sqlite_url"))
    init_schema(sqlite_url)
    return sqlite_url


@dataclass
class World:
    """One project with a deployment whose topology lives in a region only this test uses."""

    url: str
    ids: SeedIds
    project: Project
    region: str
    deployment_id: str
    sentinels: list[str] = field(default_factory=list)

    def dataplane(self, start_seconds: float = 1.0, **kw: float) -> LocalDataPlane:
        return LocalDataPlane(self.url, [self.region], start_seconds, **kw)

    def statuses(self) -> list[str]:
        return [row.status for row in instances_of(self.url, self.deployment_id)]


@pytest.fixture
def world(url: str) -> Iterator[World]:
    """A deployment with a ``starting`` topology of 2 replicas; every row removed after."""
    ids = SeedIds()
    project = seed_project(url, ids)
    region = fresh_region()
    deployment_id = insert_deployment(url, ids, project)
    insert_topology(url, ids, project, deployment_id, region, desired_status="starting")
    set_topology(url, deployment_id, region, desired_replicas=2)
    created = World(url, ids, project, region, deployment_id)
    try:
        yield created
    finally:
        delete_dataplane_rows(url, ids.deployments, created.sentinels)
        cleanup(url, ids)


def test_starting_topology_gets_its_replicas_only_after_the_start_delay(world: World) -> None:
    """A topology first seen at t has no instance before t + start delay, then exactly
    ``desired_replicas`` running ones, named and addressed as a StatefulSet's pods."""
    dataplane = world.dataplane(start_seconds=1.0)
    assert dataplane.run_pass(now=100.0).waiting == 1
    assert dataplane.run_pass(now=100.9).reported == []
    assert world.statuses() == []
    report = dataplane.run_pass(now=101.0)
    assert report.reported == [(world.deployment_id, world.region)]
    rows = instances_of(world.url, world.deployment_id)
    assert [row.k8s_name for row in rows] == [
        f"{world.deployment_id}-0",
        f"{world.deployment_id}-1",
    ]
    assert {row.status for row in rows} == {"running"}
    assert rows[0].address == f"{world.deployment_id}-0.{world.region}.local:8080"
    assert {(row.project_id, row.workspace_id, row.region) for row in rows} == {
        (world.project.project_id, world.project.workspace_id, world.region)
    }
    assert {(row.cpu_millicores, row.memory_mib) for row in rows} == {(256, 256)}
    assert all(row.id.startswith("inst_") for row in rows)


def test_zero_start_delay_reports_on_the_first_pass(world: World) -> None:
    """``UNKEY_DATAPLANE_START_SECONDS=0``: the pass that sees a topology reports it."""
    world.dataplane(start_seconds=0).run_pass(now=5.0)
    assert world.statuses() == ["running", "running"]


def test_reporting_again_adds_no_instance(world: World) -> None:
    """Idempotent: a second pass reports nothing, and reporting a topology again (after an
    instance stopped running) keeps one row per replica and sets it ``running``."""
    dataplane = world.dataplane(start_seconds=0)
    dataplane.run_pass()
    assert dataplane.run_pass().reported == []
    with transaction(world.url) as connection:
        connection.execute(
            sa.update(instances)
            .where(instances.c.k8s_name == f"{world.deployment_id}-1")
            .values(status="failed")
        )
        (topology,) = [
            t
            for t in topologies_needing_instances(connection, [world.region])
            if t.deployment_id == world.deployment_id
        ]
        report_instances(connection, topology)
        report_instances(connection, topology)
    assert world.statuses() == ["running", "running"]


def test_stopped_topology_loses_its_instances(world: World) -> None:
    """``stopping``/``stopped`` topologies: their instances are gone and never come back."""
    dataplane = world.dataplane(start_seconds=0)
    dataplane.run_pass()
    set_topology(world.url, world.deployment_id, world.region, desired_status="stopped")
    assert dataplane.run_pass().removed_instances == 2
    assert world.statuses() == []
    assert dataplane.run_pass().reported == []
    assert world.statuses() == []


def test_restarted_topology_waits_its_delay_again(world: World) -> None:
    """A topology stopped and started again is a new start: its instances come after the
    delay counted from when it was seen again, not from the first time."""
    dataplane = world.dataplane(start_seconds=1.0)
    dataplane.run_pass(now=0.0)
    dataplane.run_pass(now=1.0)
    set_topology(world.url, world.deployment_id, world.region, desired_status="stopped")
    dataplane.run_pass(now=2.0)
    set_topology(world.url, world.deployment_id, world.region, desired_status="started")
    dataplane.run_pass(now=10.0)
    assert world.statuses() == []
    dataplane.run_pass(now=11.0)
    assert world.statuses() == ["running", "running"]


def test_unknown_sentinels_become_healthy_with_every_replica(world: World) -> None:
    """A sentinel of unknown health in a served region is reported ``healthy`` with
    ``available_replicas = desired_replicas``; one in a region not served stays unknown."""
    served = insert_sentinel(world.url, world.ids, world.project, world.region, 3)
    other_region = fresh_region()
    unserved = insert_sentinel(world.url, world.ids, world.project, other_region, 1)
    world.sentinels += [served, unserved]
    assert world.dataplane().run_pass().healthy_sentinels == 1
    assert sentinel_state(world.url, served) == ("healthy", 3)
    assert sentinel_state(world.url, unserved) == ("unknown", 0)


def test_topologies_of_other_regions_are_left_alone(world: World) -> None:
    """The simulation serves only its regions (``UNKEY_AVAILABLE_REGIONS``): a topology
    elsewhere gets no instance."""
    LocalDataPlane(world.url, [fresh_region()], 0).run_pass()
    assert world.statuses() == []


async def _eventually(condition: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


def test_loop_survives_database_errors(sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A pass that fails (here: the tables do not exist yet) is logged and retried; once the
    database works, the same loop reports instances, and it stops when its event is set."""
    caplog.set_level(logging.WARNING, logger="ctrl.dataplane")
    region = fresh_region()
    engine_for(sqlite_url)  # the file exists, without tables
    dataplane = LocalDataPlane(sqlite_url, [region], start_seconds=0, poll_seconds=0.05)

    def failed_passes() -> int:
        return sum("pass failed" in record.getMessage() for record in caplog.records)

    async def scenario() -> list[str]:
        stop = asyncio.Event()
        task = asyncio.create_task(dataplane.run(stop))
        await _eventually(lambda: failed_passes() >= 2, "two failed passes")
        assert not task.done()
        init_schema(sqlite_url)
        ids = SeedIds()
        project = seed_project(sqlite_url, ids)
        deployment_id = insert_deployment(sqlite_url, ids, project)
        insert_topology(sqlite_url, ids, project, deployment_id, region)
        await _eventually(lambda: instances_of(sqlite_url, deployment_id), "instances")
        stop.set()
        await asyncio.wait_for(task, timeout=10)
        return [row.status for row in instances_of(sqlite_url, deployment_id)]

    assert asyncio.run(scenario()) == ["running"]
    assert "local data plane (simulation)" in caplog.text
    assert "not for production" in caplog.text


@pytest.fixture
def sqlite_world(sqlite_url: str) -> tuple[str, str, str]:
    """A fresh SQLite database with one ``started`` topology: ``(url, region, deployment)``."""
    init_schema(sqlite_url)
    region = fresh_region()
    ids = SeedIds()
    project = seed_project(sqlite_url, ids)
    deployment_id = insert_deployment(sqlite_url, ids, project)
    insert_topology(sqlite_url, ids, project, deployment_id, region)
    return sqlite_url, region, deployment_id


def test_loop_stops_at_once_when_its_event_is_set(sqlite_world: tuple[str, str, str]) -> None:
    """Setting ``stop`` ends the loop without waiting out its poll interval (here an hour)."""
    url, region, deployment_id = sqlite_world
    dataplane = LocalDataPlane(url, [region], start_seconds=0, poll_seconds=3600)

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(dataplane.run(stop))
        await _eventually(lambda: instances_of(url, deployment_id), "the first pass")
        stop.set()
        await asyncio.wait_for(task, timeout=10)

    asyncio.run(scenario())


def test_started_task_serves_the_settings_database_and_regions(
    sqlite_world: tuple[str, str, str],
) -> None:
    """``start_local_dataplane`` (what ``ctrl-worker run`` starts with ``UNKEY_DATAPLANE=local``)
    serves ``UNKEY_DATABASE_PRIMARY`` in ``UNKEY_AVAILABLE_REGIONS`` with
    ``UNKEY_DATAPLANE_START_SECONDS``, and ends when its task is cancelled (the runtime's
    shutdown)."""
    url, region, deployment_id = sqlite_world
    settings = Settings(database_primary=url, available_regions=[region], dataplane_start_seconds=0)

    async def scenario() -> asyncio.Task[None]:
        task = start_local_dataplane(settings)
        assert task.get_name() == "local-dataplane"
        await _eventually(lambda: instances_of(url, deployment_id), "instances")
        task.cancel()
        await asyncio.wait([task], timeout=10)
        return task

    assert asyncio.run(scenario()).cancelled()
