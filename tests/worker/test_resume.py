"""The reconciler: crashed runs are resumed as the same flow run, a bounded number of times."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.states import Crashed, Running

from tests.support.kernel_flows import kernel_three_steps
from worker.kernel import run_records
from worker.kernel.calls import RESUME_MESSAGE
from worker.kernel.resume import reconcile_once


async def _deployment(client, name: str):
    flow_id = await client.create_flow(kernel_three_steps)
    return await client.create_deployment(flow_id=flow_id, name=name, entrypoint="x.py:y")


def test_crashed_runs_are_resumed_then_given_up(prefect_api):
    """A crashed run of one of the worker's deployments is rescheduled (same flow run) at most
    ``max_resumes`` times; the next crash marks it Failed, never looped forever."""

    async def main() -> list[StateType]:
        seen = []
        async with get_client() as client:
            deployment_id = await _deployment(client, f"resume-{uuid.uuid4().hex[:8]}")
            flow_run = await client.create_flow_run_from_deployment(
                deployment_id, parameters={"tag": "x"}
            )
            for _ in range(3):
                await client.set_flow_run_state(flow_run.id, Running())
                await client.set_flow_run_state(flow_run.id, Crashed(message="killed"), force=True)
                report = await reconcile_once(client, [deployment_id], max_resumes=2)
                state = (await client.read_flow_run(flow_run.id)).state
                seen.append(state.type)
                assert (flow_run.id in report.resumed) == (state.type == StateType.SCHEDULED)
            final = await client.read_flow_run(flow_run.id)
            assert "gave up after 3 attempts" in final.state.message
        return seen

    assert asyncio.run(main()) == [StateType.SCHEDULED, StateType.SCHEDULED, StateType.FAILED]


def test_runs_of_other_deployments_are_left_alone(prefect_api):
    """The reconciler touches only the deployments it serves."""

    async def main() -> StateType:
        async with get_client() as client:
            ours = await _deployment(client, f"ours-{uuid.uuid4().hex[:8]}")
            theirs = await _deployment(client, f"theirs-{uuid.uuid4().hex[:8]}")
            flow_run = await client.create_flow_run_from_deployment(theirs, parameters={"tag": "x"})
            await client.set_flow_run_state(flow_run.id, Running())
            await client.set_flow_run_state(flow_run.id, Crashed(message="killed"), force=True)
            await reconcile_once(client, [ours], max_resumes=5)
            return (await client.read_flow_run(flow_run.id)).state.type

    assert asyncio.run(main()) == StateType.CRASHED


def test_a_dead_local_run_left_running_is_marked_crashed(prefect_api):
    """A run record whose process is gone turns a Running run Crashed and is removed."""

    async def main() -> StateType:
        async with get_client() as client:
            deployment_id = await _deployment(client, f"dead-{uuid.uuid4().hex[:8]}")
            flow_run = await client.create_flow_run_from_deployment(
                deployment_id, parameters={"tag": "x"}
            )
            await client.set_flow_run_state(flow_run.id, Running())
            record = run_records.records_dir() / f"{flow_run.id}.json"
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(
                json.dumps(
                    {
                        "flow_run_id": str(flow_run.id),
                        "pid": 999999,
                        "process_start": "1",
                        "host": socket.gethostname(),
                        "started_at": 0.0,
                        "leases": [],
                    }
                )
            )
            report = await reconcile_once(client, [], max_resumes=5)
            assert report.marked_crashed == [flow_run.id]
            assert not record.exists()
            return (await client.read_flow_run(flow_run.id)).state.type

    assert asyncio.run(main()) == StateType.CRASHED


async def _crashed_run(client, name: str):
    deployment_id = await _deployment(client, f"{name}-{uuid.uuid4().hex[:8]}")
    flow_run = await client.create_flow_run_from_deployment(deployment_id, parameters={"tag": "x"})
    await client.set_flow_run_state(flow_run.id, Running())
    await client.set_flow_run_state(flow_run.id, Crashed(message="killed"), force=True)
    return deployment_id, flow_run


def test_zero_max_resumes_never_resumes(prefect_api):
    """UNKEY_RESUME_MAX_ATTEMPTS=0: the first crash is final (Failed), never a resumption."""

    async def main():
        async with get_client() as client:
            deployment_id, flow_run = await _crashed_run(client, "zero")
            report = await reconcile_once(client, [deployment_id], max_resumes=0)
            return report, (await client.read_flow_run(flow_run.id)).state

    report, state = asyncio.run(main())
    assert report.resumed == [] and len(report.gave_up) == 1
    assert state.type == StateType.FAILED


def test_two_reconcilers_racing_resume_a_crashed_run_once(prefect_api):
    """Two reconcilers see the same crashed run at the same time: the state change is a
    compare-and-set, so the run is resumed exactly once (never two live copies)."""

    async def main():
        async with get_client() as a, get_client() as b:
            deployment_id, flow_run = await _crashed_run(a, "race")
            reports = await asyncio.gather(
                reconcile_once(a, [deployment_id], max_resumes=3),
                reconcile_once(b, [deployment_id], max_resumes=3),
            )
            states = await a.read_flow_run_states(flow_run.id)
            return reports, states

    reports, states = asyncio.run(main())
    assert sum(len(report.resumed) for report in reports) == 1
    assert sum(1 for s in states if s.message == RESUME_MESSAGE) == 1
