"""DeploymentService: desired-state changes of one deployment, last writer wins.

Guarantees: changes of one deployment run one at a time (key ``deployment:{deployment_id}``).
``schedule_desired_state_change`` records a new nonce as the deployment's pending transition
(superseding any older one) and sends ``change_desired_state`` for it, delayed by
``delay_millis`` as a scheduled flow run; the superseded scheduled run is cancelled, and even
if it already started it changes nothing because its nonce no longer matches.
``change_desired_state`` applies the change only for the pending nonce (a compare-and-set in
the write's own transaction, so a call resumed after a clear applies nothing): it writes
``deployments.desired_state`` and every region's topology status, each with a new version.
``clear_scheduled_state_changes`` drops the pending transition and cancels its run.
``change_desired_states_now`` (and ``change_desired_state_now`` for one) is the same change
without a delay for callers inside another call (rollback, the idle-preview scale-down): under
the deployments' keys (taken at once), one transaction per deployment drops any pending
transition (the immediate change is the newest writer) and applies the change.
Side-effect steps: ``set_transition``, ``send_call``, ``cancel_scheduled_run``,
``apply_desired_state``, ``take_version``, ``update_topology_status``, ``clear_transition``,
``applying desired state now to a batch``.
Failure: an unknown state or bad id is terminal before anything is written; changing the
project's live deployment is refused (terminal, the transition stays); a deployment deleted
in the meantime makes the change a no-op.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

from flows.params import Id, Params
from tasks.db.transitions import (
    DELETED,
    REFUSED,
    SUPERSEDED,
    apply_desired_state,
    apply_desired_state_now_to_batch,
    clear_transition,
    find_deployment_regions,
    remember_scheduled_run,
    set_transition,
    update_topology_status,
)
from tasks.db.versions import take_version
from tasks.ids import new_nonce
from tasks.prefect_calls import cancel_scheduled_run, send_call
from worker.kernel.errors import RefusedError
from worker.kernel.service import critical_section, critical_sections, parse, service_flow

__all__ = [
    "change_desired_state",
    "change_desired_state_now",
    "change_desired_states_now",
    "clear_scheduled_state_changes",
    "schedule_desired_state_change",
]

DesiredState = Literal["running", "standby", "archived"]
# The original's enum names are accepted too (DESIRED_STATE_RUNNING, RUNNING).
_ALIASES = {
    f"{p}{s.upper()}": s for s in ("running", "standby", "archived") for p in ("", "DESIRED_STATE_")
}

# topology desired_status for each desired state (reference §3).
TOPOLOGY_STATUS = {"running": "started", "standby": "stopped", "archived": "stopped"}

MAX_DELAY_MILLIS = 90 * 24 * 3600 * 1000
SUPERSEDED_BY_NOW = "superseded by an immediate change"


def _state_alias(value: object) -> object:
    return _ALIASES.get(value, value) if isinstance(value, str) else value


State = Annotated[DesiredState, BeforeValidator(_state_alias)]


class ScheduleParams(Params):
    deployment_id: Id
    state: State
    delay_millis: int = Field(default=0, ge=0, le=MAX_DELAY_MILLIS)


class ChangeParams(Params):
    deployment_id: Id
    nonce: Annotated[str, Field(min_length=1, max_length=64)]
    state: State


class ClearParams(Params):
    deployment_id: Id


def _key(deployment_id: str) -> str:
    return f"deployment:{deployment_id}"


@service_flow("schedule_desired_state_change")
async def schedule_desired_state_change(
    deployment_id: str, state: str, delay_millis: int = 0
) -> None:
    """Schedule a desired-state change of a deployment (0 ms = now); newer schedules win."""
    params = parse(
        ScheduleParams, deployment_id=deployment_id, state=state, delay_millis=delay_millis
    )
    async with critical_section(_key(params.deployment_id)):
        nonce = new_nonce()
        superseded = set_transition(params.deployment_id, nonce, params.state)
        run_id = await send_call(
            "change_desired_state",
            {"deployment_id": params.deployment_id, "nonce": nonce, "state": params.state},
            idempotency_key=f"change-desired-state-{nonce}",
            delay_millis=params.delay_millis,
        )
        remember_scheduled_run(params.deployment_id, nonce, run_id)
        if superseded:
            await cancel_scheduled_run(superseded, f"superseded by transition {nonce}")


@service_flow("change_desired_state")
async def change_desired_state(deployment_id: str, nonce: str, state: str) -> None:
    """Apply a scheduled desired-state change if ``nonce`` is still the pending one."""
    params = parse(ChangeParams, deployment_id=deployment_id, nonce=nonce, state=state)
    async with critical_section(_key(params.deployment_id)):
        # The check of the pending nonce is part of the write (a compare-and-set), never a
        # replayed read: a call resumed after a clear or a newer schedule writes nothing.
        outcome = apply_desired_state(params.deployment_id, params.nonce, params.state)
        if outcome == SUPERSEDED:
            return  # cleared or superseded: the newer call decides
        if outcome == DELETED:
            clear_transition(params.deployment_id, params.nonce)
            return  # the deployment was deleted meanwhile: nothing to change
        status = TOPOLOGY_STATUS[params.state]
        for region in find_deployment_regions(params.deployment_id):
            version = take_version(region, purpose="topology")
            update_topology_status(params.deployment_id, region, status, version)
        clear_transition(params.deployment_id, params.nonce)


@service_flow("clear_scheduled_state_changes")
async def clear_scheduled_state_changes(deployment_id: str) -> None:
    """Drop the deployment's pending desired-state change and cancel its scheduled run."""
    params = parse(ClearParams, deployment_id=deployment_id)
    async with critical_section(_key(params.deployment_id)):
        scheduled = clear_transition(params.deployment_id)
        if scheduled:
            await cancel_scheduled_run(scheduled, "scheduled state changes cleared")


class BatchParams(Params):
    deployment_ids: Annotated[list[Id], Field(min_length=1, max_length=1000)]
    state: State


async def change_desired_states_now(
    deployment_ids: list[str], state: str, batch: str
) -> dict[str, str]:
    """``change_desired_state_now`` for many deployments at once, from inside another call.

    Takes every ``deployment:{id}`` key at once (all or none, one lease) and applies the
    change to each in its own transaction: one key acquisition and one step for the batch
    instead of one per deployment.

    Args:
        deployment_ids: the deployments (at most 1000).
        state: ``running``, ``standby`` or ``archived``.
        batch: names the batch within the calling call (its steps' key).

    Returns:
        Each deployment's outcome: ``applied``, ``deleted`` or ``refused`` (the live one).

    Raises:
        InvalidParameterError: a bad id or state.
    """
    params = parse(BatchParams, deployment_ids=deployment_ids, state=state)
    ids = list(dict.fromkeys(params.deployment_ids))
    async with critical_sections([_key(d) for d in ids]):
        changes = apply_desired_state_now_to_batch(
            batch, ids, params.state, TOPOLOGY_STATUS[params.state]
        )
        for change in changes.values():
            if change["superseded_run"]:
                await cancel_scheduled_run(change["superseded_run"], SUPERSEDED_BY_NOW)
    return {deployment_id: change["outcome"] for deployment_id, change in changes.items()}


async def change_desired_state_now(deployment_id: str, state: str, batch: str) -> str:
    """``change_desired_states_now`` for one deployment, refusing the live one.

    Args:
        deployment_id: the deployment.
        state: ``running``, ``standby`` or ``archived``.
        batch: names the change within the calling call.

    Returns:
        ``applied``, or ``deleted`` when the deployment no longer exists (nothing changed).

    Raises:
        InvalidParameterError: a bad id or state.
        RefusedError: the deployment is its project's live deployment (nothing written).
    """
    outcome = (await change_desired_states_now([deployment_id], state, batch))[deployment_id]
    if outcome == REFUSED:
        raise RefusedError(f"not allowed to modify the current live deployment '{deployment_id}'")
    return outcome
