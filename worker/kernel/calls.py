"""Starting a service call by flow name, and changing a run's state safely.

``submit_call`` is the one way a call is started, by the Python client, by ``ctrl-worker
trigger`` and by steps that send another call (``tasks.prefect_calls.send_call``): a flow run
of the ``<flow>/ctrl`` deployment, with Restate's ingress idempotency (the same key returns the
same run, and its first parameters win). A key whose run ended ``Failed``, ``Crashed`` or
``Cancelled`` runs that same flow run again: its finished steps replay.

``change_state_if_unchanged`` is the compare-and-set every state change of an existing run
goes through (re-runs here, resumptions in ``worker.kernel.resume``): under the ``ctrl:runs``
key it reads the run again and changes it only if its state is still the one the caller saw.
Prefect's API has no conditional state change, and two callers acting on the same stale read
would otherwise start two live copies of one run.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.exceptions import ObjectNotFound
from prefect.states import AwaitingRetry, Scheduled, State

from deployments import DEPLOYMENT_NAME
from worker.kernel.errors import deployment_not_found
from worker.kernel.hooks import GIVE_UP_TAG
from worker.kernel.locks import key_lock

__all__ = [
    "RERUNNABLE",
    "RESUME_MESSAGE",
    "RUNS_KEY",
    "change_state_if_unchanged",
    "resumptions_of",
    "submit_call",
]

RUNS_KEY = "ctrl:runs"
RESUME_MESSAGE = "resumed by the worker after a crash; finished steps replay"
RERUNNABLE = {StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}

_deployment_ids: dict[str, UUID] = {}


async def change_state_if_unchanged(
    client: PrefectClient,
    flow_run: FlowRun,
    message: str,
    *,
    state: State[Any] | None = None,
    drop_tags: frozenset[str] = frozenset(),
) -> bool:
    """Move ``flow_run`` to ``state`` (default ``AwaitingRetry``) if its state is unchanged.

    Args:
        client: a Prefect client.
        flow_run: the run as the caller read it (its ``state.id`` is what is compared).
        message: the new state's message (when ``state`` is not given).
        state: the state to set.
        drop_tags: tags removed from the run together with the change.

    Returns:
        True if this call changed the state; False if the run had moved on meanwhile.
    """
    if flow_run.state is None:
        return False
    async with key_lock(RUNS_KEY):
        try:
            current = await client.read_flow_run(flow_run.id)
        except ObjectNotFound:
            return False
        if current.state is None or current.state.id != flow_run.state.id:
            return False
        if drop_tags & set(current.tags or []):
            await client.update_flow_run(
                flow_run.id, tags=[t for t in current.tags if t not in drop_tags]
            )
        await client.set_flow_run_state(
            flow_run.id, state or AwaitingRetry(message=message), force=True
        )
    return True


async def resumptions_of(client: PrefectClient, flow_run_id: UUID) -> int:
    """How many times the reconciler resumed this run so far."""
    states = await client.read_flow_run_states(flow_run_id)
    return sum(1 for s in states if s.name == "AwaitingRetry" and s.message == RESUME_MESSAGE)


async def _deployment_id(client: PrefectClient, flow_name: str) -> UUID:
    full_name = f"{flow_name}/{DEPLOYMENT_NAME}"
    cache_key = f"{client.api_url}|{full_name}"
    cached = _deployment_ids.get(cache_key)
    if cached is not None:
        return cached
    try:
        deployment = await client.read_deployment_by_name(full_name)
    except ObjectNotFound:
        raise deployment_not_found(full_name) from None
    _deployment_ids[cache_key] = deployment.id
    return deployment.id


async def submit_call(
    client: PrefectClient,
    flow_name: str,
    parameters: dict[str, Any],
    *,
    idempotency_key: str | None = None,
    scheduled_time: datetime | None = None,
) -> FlowRun:
    """Create (or find, by idempotency key) a flow run of ``flow_name``'s deployment.

    Raises:
        NotFoundError: no ``<flow_name>/ctrl`` deployment on this Prefect server.
    """

    async def create() -> FlowRun:
        return await client.create_flow_run_from_deployment(
            await _deployment_id(client, flow_name),
            parameters=parameters,
            state=Scheduled(scheduled_time=scheduled_time) if scheduled_time else None,
            idempotency_key=idempotency_key,
        )

    try:
        flow_run = await create()
    except ObjectNotFound:
        # The deployment was re-created (new id) since we cached it: look it up again.
        _deployment_ids.clear()
        flow_run = await create()
    if idempotency_key and flow_run.state is not None and flow_run.state.type in RERUNNABLE:
        # The key's run ended without completing: run it again; finished steps replay.
        await change_state_if_unchanged(
            client,
            flow_run,
            f"re-run: called again with idempotency key {idempotency_key!r}",
            drop_tags=frozenset({GIVE_UP_TAG}),
        )
        flow_run = await client.read_flow_run(flow_run.id)
    return flow_run
