"""DeploymentService under a kill: a change resumed after its transition was cleared while it
was dead applies nothing (the apply is a compare-and-set on the pending nonce, not a replay
of a read made before the crash)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from uuid import UUID

import pytest
import sqlalchemy as sa
from prefect.client.orchestration import get_client

from flows.deployment import clear_scheduled_state_changes
from tasks.db.schema import deployment_transitions
from tests.support.seed import (
    SeedIds,
    cleanup,
    desired_state,
    fresh_region,
    insert_deployment,
    insert_topology,
    insert_transition,
    seed_project,
    topology,
    transition,
)
from tests.support.waits import row_lock_waits, wait_for
from worker import client as worker_client
from worker.kernel.resume import reconcile_once

pytestmark = [pytest.mark.slow, pytest.mark.mysql]


def test_a_change_resumed_after_a_clear_applies_nothing(prefect_api, control_db, worker_factory):
    """change_desired_state is killed while applying (its write blocked on a row lock), the
    transition is cleared while it is dead, then a worker resumes the same run: it completes
    and the deployment's desired state and topology are untouched."""
    ids = SeedIds()
    project = seed_project(control_db, ids)
    deployment_id = insert_deployment(control_db, ids, project)  # desired state: running
    for region in (fresh_region(), fresh_region()):
        insert_topology(control_db, ids, project, deployment_id, region)
    nonce = uuid.uuid4().hex
    insert_transition(control_db, deployment_id, nonce, "standby")
    before = (desired_state(control_db, deployment_id), topology(control_db, deployment_id))
    blocker_engine = sa.create_engine(control_db)
    blocker = blocker_engine.connect()
    try:
        # Hold the transition row: the change's compare-and-set waits on it, mid-step.
        blocker.begin()
        blocker.execute(
            sa.select(deployment_transitions)
            .where(deployment_transitions.c.deployment_id == deployment_id)
            .with_for_update()
        )
        first = worker_factory()
        run_id = asyncio.run(
            worker_client.trigger(
                "change_desired_state",
                {"deployment_id": deployment_id, "nonce": nonce, "state": "standby"},
                idempotency_key=f"crash-change-{nonce}",
            )
        )
        wait_for(lambda: row_lock_waits(control_db) > 0, 60, "the change to block on the row")
        record = prefect_api.state_dir / "runs" / f"{run_id}.json"
        pid = json.loads(record.read_text())["pid"]
        first.kill()
        os.kill(pid, signal.SIGKILL)
        blocker.rollback()

        async def release_and_clear() -> None:
            async with get_client() as client:  # what the restarted worker would do first
                report = await reconcile_once(client, [], max_resumes=3)
            assert report.marked_crashed == [UUID(str(run_id))]
            await clear_scheduled_state_changes(deployment_id)

        asyncio.run(release_and_clear())
        assert transition(control_db, deployment_id) is None

        worker_factory()
        asyncio.run(worker_client.wait_for_result(run_id, timeout=120))
        assert (desired_state(control_db, deployment_id), topology(control_db, deployment_id)) == (
            before
        )
    finally:
        blocker.close()
        blocker_engine.dispose()
        cleanup(control_db, ids)
