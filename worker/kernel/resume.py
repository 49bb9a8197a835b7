"""Resumption: what Restate does when an invocation's process dies, done by the worker.

Prefect leaves a SIGKILLed flow run ``Running`` and retries nothing. Every ``ctrl-worker run``
therefore reconciles, every ``UNKEY_RECONCILE_INTERVAL_SECONDS``:

1. **Dead local runs.** A run record (``worker.kernel.run_records``) whose process is gone:
   the run is marked ``Crashed`` if Prefect still thinks it is alive, and the keys it held
   are released at once (no waiting for the lease to expire).
2. **Silent runs.** A ``Running`` run of the pool's deployments that sent no heartbeat for
   ``HEARTBEAT_WINDOW`` (90 s; every flow-run process sends one every 30 s) lost its process
   on a host no worker watches (a vanished machine): it is marked ``Crashed``.
3. **Crashed runs of the pool's deployments** (marked by 1. or 2., or by a worker when a child
   process died): the same
   flow run is rescheduled (``AwaitingRetry``), so its finished steps replay from their
   records and only the interrupted one runs again. At most ``UNKEY_RESUME_MAX_ATTEMPTS``
   resumptions (0 = never resume); then the reconciler gives up: a flow with a give-up hook
   gets one more attempt that runs only the hook (``worker.kernel.hooks``), any other is
   marked ``Failed``.
4. **Runs stuck in ``Pending``** (a worker died between claiming a run and starting its
   process) are treated like crashed ones after ``PENDING_TIMEOUT``.

**Never two live copies.** A run is rescheduled only when its process is known dead (1.) or
Prefect declared it crashed (2., 3.), and the state change is a compare-and-set: every
reconciler (and every client re-running a failed call, ``worker.kernel.calls``) changes a
run's state only while holding the ``ctrl:runs`` key, after reading the run again, and only if
its state is still the one it decided on. Two reconcilers racing on one crashed run resume it
exactly once.

Why 2. is the reconciler's and not a Prefect automation (the first kernel used one): a
proactive automation keyed by flow run keeps a trigger bucket per run in the server's
database, updated on every state event of every run; measured here it doubled the server's
CPU per call (0.84 -> 1.46 s) and the latency under load. A reconciler pass reads the
``Running`` runs once and asks for the heartbeats of only those running longer than the
window. The cost: silent runs are found while some ``ctrl-worker run`` is up (nothing would
resume them otherwise either).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
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
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled, Crashed, Failed, State

from worker.kernel import metrics, run_records
from worker.kernel.calls import RESUME_MESSAGE, change_state_if_unchanged, resumptions_of
from worker.kernel.clock import now
from worker.kernel.hooks import GIVE_UP_PREFIX, GIVE_UP_TAG, has_give_up_hook

__all__ = [
    "CRASH_AUTOMATION",
    "HEARTBEAT_WINDOW",
    "PENDING_TIMEOUT",
    "ReconcileReport",
    "reconcile_once",
    "retire_crash_automation",
]

log = logging.getLogger("ctrl.worker.resume")

CRASH_AUTOMATION = "ctrl-worker: crash flow runs without heartbeat"  # retired, see above
PENDING_TIMEOUT = timedelta(seconds=120)
HEARTBEAT_WINDOW = timedelta(seconds=90)
SILENT_MESSAGE = f"no heartbeat for {HEARTBEAT_WINDOW.seconds} s: the process is gone"
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
            # A run being cancelled whose process is gone is cancelled, not crashed (a Crashed
            # run would be resumed against the caller's wish); either way only if its state
            # is still the one read here (the worker may have ended it meanwhile).
            died = f"process {record.pid} on {record.host} died (seen by the worker)"
            ending: State[Any] = (
                Cancelled(message=died)
                if flow_run.state.type == StateType.CANCELLING
                else Crashed(message=died)
            )
            if await change_state_if_unchanged(client, flow_run, died, state=ending):
                report.marked_crashed.append(flow_run_id)
        for lease in record.leases:
            try:
                await client.release_concurrency_slots_with_lease(UUID(lease))
                report.released_leases += 1
            except Exception:  # the lease expired meanwhile: nothing left to release
                log.debug("lease %s of dead run %s already gone", lease, flow_run_id)
        run_records.delete_record(record.flow_run_id)


async def _crash_silent_runs(
    client: PrefectClient, deployment_ids: list[UUID], report: ReconcileReport
) -> None:
    from prefect.events.filters import (
        EventFilter,
        EventNameFilter,
        EventOccurredFilter,
        EventResourceFilter,
    )

    moment = now()
    since = moment - HEARTBEAT_WINDOW
    for flow_run in await _runs_in(client, deployment_ids, StateType.RUNNING):
        if flow_run.state is None or flow_run.state.timestamp > since:
            continue  # running for less than the window: it has not had to beat yet
        beats = await client.read_events(
            filter=EventFilter(
                occurred=EventOccurredFilter(since=since, until=moment + timedelta(minutes=1)),
                event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
                resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run.id}"]),
            ),
            limit=1,
        )
        if beats.events:
            continue
        crashed: State[Any] = Crashed(message=SILENT_MESSAGE)
        if await change_state_if_unchanged(client, flow_run, SILENT_MESSAGE, state=crashed):
            report.marked_crashed.append(flow_run.id)


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


async def _repair(
    client: PrefectClient,
    flow_run: FlowRun,
    max_resumes: int,
    flow_name: str,
    report: ReconcileReport,
) -> None:
    """Resume, give up (hook attempt) or fail one crashed/stuck run, if its state is unchanged."""
    assert flow_run.state is not None
    last = flow_run.state.message or flow_run.state.name or "?"
    resumed = await resumptions_of(client, flow_run.id)
    if GIVE_UP_TAG in (flow_run.tags or []) or resumed < max_resumes:
        # Crashed while running its give-up hook, or resumptions left: run it again.
        giving_up = GIVE_UP_TAG in (flow_run.tags or [])
        if giving_up and resumed >= max_resumes + 2:
            await _fail(client, flow_run, f"its give-up hook never completed (last: {last})")
            report.gave_up.append(flow_run.id)
            return
        if await change_state_if_unchanged(client, flow_run, RESUME_MESSAGE):
            report.resumed.append(flow_run.id)
            metrics.RUNS_RESUMED.labels(flow=flow_name).inc()
        return
    reason = f"gave up after {resumed + 1} attempts: the run crashed each time (last: {last})"
    if has_give_up_hook(flow_name):
        await client.update_flow_run(flow_run.id, tags=[*(flow_run.tags or []), GIVE_UP_TAG])
        changed = await change_state_if_unchanged(client, flow_run, GIVE_UP_PREFIX + reason)
    else:
        changed = await _fail(client, flow_run, reason)
    if changed:
        report.gave_up.append(flow_run.id)


async def _fail(client: PrefectClient, flow_run: FlowRun, reason: str) -> bool:
    return await change_state_if_unchanged(client, flow_run, reason, state=Failed(message=reason))


async def reconcile_once(
    client: PrefectClient,
    deployment_ids: list[UUID],
    *,
    max_resumes: int,
    flow_names: dict[UUID, str] | None = None,
) -> ReconcileReport:
    """One pass of the three repairs above over the given deployments.

    Args:
        client: a Prefect client.
        deployment_ids: the deployments whose crashed runs this worker repairs.
        max_resumes: how many times one run may be resumed (0 = never).
        flow_names: the flow name of each deployment (metrics, give-up hooks).
    """
    report = ReconcileReport()
    if not deployment_ids:
        await _release_dead_local_runs(client, report)
        return report
    await _crash_silent_runs(client, deployment_ids, report)
    crashed = await _runs_in(client, deployment_ids, StateType.CRASHED)
    stale_before = now() - PENDING_TIMEOUT
    stuck = [
        run
        for run in await _runs_in(client, deployment_ids, StateType.PENDING)
        if run.state is not None and run.state.timestamp < stale_before
    ]
    # After reading the crashed runs, not before: a run is Crashed only once its process is
    # dead, so its local record (and the keys it held) is released here before the run is
    # resumed. In the other order a run crashed in between was resumed first, its new
    # process overwrote the record, and its old lease was only freed by expiry.
    await _release_dead_local_runs(client, report)
    for flow_run in [*crashed, *stuck]:
        name = (flow_names or {}).get(flow_run.deployment_id or UUID(int=0), "unknown")
        await _repair(client, flow_run, max_resumes, name, report)
    return report


async def retire_crash_automation(client: PrefectClient) -> None:
    """Delete the heartbeat automation an earlier worker created (the reconciler does its job,
    at a fraction of the server's cost)."""
    for automation in await client.read_automations_by_name(CRASH_AUTOMATION):
        await client.delete_automation(automation.id)
