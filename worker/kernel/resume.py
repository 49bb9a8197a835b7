"""Resumption: what Restate does when an invocation's process dies, done by the worker.

Prefect leaves a SIGKILLed flow run ``Running`` and retries nothing. Every worker therefore
reconciles, every ``UNKEY_RECONCILE_INTERVAL_SECONDS``:

1. **Dead local runs.** A run record (``worker.kernel.run_records``) whose process is gone:
   the run is marked ``Crashed`` if Prefect still thinks it is alive, and the keys it held
   are released at once (no waiting for the lease to expire).
2. **Crashed runs of the worker's deployments** (marked by 1., by the Runner when a child
   process dies, or by the heartbeat automation below for runs on a host that vanished): the
   same flow run is rescheduled (``AwaitingRetry``), so its finished steps replay from their
   records and only the interrupted one runs again. After ``UNKEY_RESUME_MAX_ATTEMPTS``
   resumptions it is marked ``Failed`` instead, so nothing loops forever.
3. **Runs stuck in ``Pending``** (the worker died between claiming a run and starting its
   process) are rescheduled after ``PENDING_TIMEOUT``.

The heartbeat automation (``ensure_crash_automation``) marks a ``Running`` run with no
heartbeat for 90 s ``Crashed``: no run stays ``Running`` forever even when no worker ever
comes back on its host.

Never two live copies: a run is rescheduled only when its process is known dead (1.) or
Prefect declared it crashed (2., 3.). A run declared crashed that is in fact alive (a
partitioned host) can overlap with its resumed copy only outside its critical section: the
per-key lock is held by the old copy until its lease is lost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.concurrency._asyncio import arelease_concurrency_slots_with_lease
from prefect.exceptions import ObjectNotFound
from prefect.states import AwaitingRetry, Crashed, Failed

from worker.kernel import metrics, run_records
from worker.kernel.clock import now

__all__ = ["CRASH_AUTOMATION", "ReconcileReport", "ensure_crash_automation", "reconcile_once"]

log = logging.getLogger("ctrl.worker.resume")

CRASH_AUTOMATION = "ctrl-worker: crash flow runs without heartbeat"
PENDING_TIMEOUT = timedelta(seconds=120)
_ALIVE = {StateType.RUNNING, StateType.PENDING, StateType.CANCELLING}


@dataclass
class ReconcileReport:
    marked_crashed: list[UUID] = field(default_factory=list)
    released_leases: int = 0
    resumed: list[UUID] = field(default_factory=list)
    gave_up: list[UUID] = field(default_factory=list)


async def _release_dead_local_runs(client: PrefectClient, report: ReconcileReport) -> None:
    for record in run_records.list_records():
        if run_records.process_alive(record):
            continue
        flow_run_id = UUID(record.flow_run_id)
        try:
            flow_run = await client.read_flow_run(flow_run_id)
        except ObjectNotFound:
            flow_run = None
        if flow_run is not None and flow_run.state is not None and flow_run.state.type in _ALIVE:
            await client.set_flow_run_state(
                flow_run_id,
                Crashed(message=f"process {record.pid} on {record.host} died (seen by the worker)"),
                force=True,
            )
            report.marked_crashed.append(flow_run_id)
        for lease in record.leases:
            try:
                await arelease_concurrency_slots_with_lease(UUID(lease))
                report.released_leases += 1
            except Exception:  # the lease expired meanwhile: nothing left to release
                log.debug("lease %s of dead run %s already gone", lease, flow_run_id)
        run_records.delete_record(record.flow_run_id)


async def _runs_in(
    client: PrefectClient, deployment_ids: list[UUID], state: StateType
) -> list[FlowRun]:
    return await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[state]))
        ),
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=deployment_ids)),
        limit=200,
    )


async def reconcile_once(
    client: PrefectClient,
    deployment_ids: list[UUID],
    *,
    max_attempts: int,
    flow_names: dict[UUID, str] | None = None,
) -> ReconcileReport:
    """One pass of the three repairs above over the given deployments."""
    report = ReconcileReport()
    await _release_dead_local_runs(client, report)
    if not deployment_ids:
        return report
    crashed = await _runs_in(client, deployment_ids, StateType.CRASHED)
    stale_before = now() - PENDING_TIMEOUT
    stuck = [
        run
        for run in await _runs_in(client, deployment_ids, StateType.PENDING)
        if run.state is not None and run.state.timestamp < stale_before
    ]
    for flow_run in [*crashed, *stuck]:
        if flow_run.run_count > max_attempts:
            await client.set_flow_run_state(
                flow_run.id,
                Failed(
                    message=f"gave up after {flow_run.run_count} attempts: the run crashed "
                    f"each time (last: {flow_run.state.message if flow_run.state else '?'})"
                ),
                force=True,
            )
            report.gave_up.append(flow_run.id)
            continue
        await client.set_flow_run_state(
            flow_run.id,
            AwaitingRetry(message="resumed by the worker after a crash; finished steps replay"),
            force=True,
        )
        report.resumed.append(flow_run.id)
        name = (flow_names or {}).get(flow_run.deployment_id or UUID(int=0), "unknown")
        metrics.RUNS_RESUMED.labels(flow=name).inc()
    return report


async def ensure_crash_automation(client: PrefectClient, window_seconds: int = 90) -> None:
    """Create (once) the automation that marks runs without heartbeats ``Crashed``."""
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    existing = await client.read_automations_by_name(CRASH_AUTOMATION)
    if existing:
        return
    await client.create_automation(
        AutomationCore(
            name=CRASH_AUTOMATION,
            description="Marks a flow run Crashed when its heartbeats stop (the worker then "
            "resumes it). Created by ctrl-worker.",
            trigger=EventTrigger(
                after={"prefect.flow-run.heartbeat"},
                expect={
                    "prefect.flow-run.heartbeat",
                    "prefect.flow-run.Completed",
                    "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled",
                    "prefect.flow-run.Crashed",
                    "prefect.flow-run.AwaitingRetry",
                    "prefect.flow-run.Paused",
                    "prefect.flow-run.Suspended",
                },
                match={"prefect.resource.id": ["prefect.flow-run.*"]},
                for_each={"prefect.resource.id"},
                posture=Posture.Proactive,
                threshold=1,
                within=timedelta(seconds=window_seconds),
            ),
            actions=[
                ChangeFlowRunState(
                    state=StateType.CRASHED,
                    message=f"no heartbeat for {window_seconds} s: the process is gone",
                )
            ],
        )
    )
