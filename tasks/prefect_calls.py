"""Steps that talk to the Prefect API about other flow runs: delayed sends and cancellation."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.responses import OrchestrationResult
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled

from worker.kernel.calls import submit_call
from worker.kernel.clock import now
from worker.kernel.steps import step

__all__ = ["cancel_scheduled_run", "send_call"]

_NOT_STARTED = {StateType.SCHEDULED, StateType.PENDING}


@step(key=("idempotency_key",))
async def send_call(
    flow_name: str, parameters: dict[str, object], idempotency_key: str, delay_millis: int = 0
) -> str:
    """Start a call of ``flow_name`` (after ``delay_millis``); return its flow run id.

    Idempotent twice over: the step replays its recorded run id, and the idempotency key
    makes the Prefect API return the same run if the step itself is re-executed.
    """
    scheduled = now() + timedelta(milliseconds=delay_millis) if delay_millis > 0 else None
    async with get_client() as client:
        flow_run = await submit_call(
            client,
            flow_name,
            dict(parameters),
            idempotency_key=idempotency_key,
            scheduled_time=scheduled,
        )
    return str(flow_run.id)


@step(key=("flow_run_id",))
async def cancel_scheduled_run(flow_run_id: str, reason: str) -> bool:
    """Cancel a flow run that has not started yet; True if it was cancelled.

    A run that already started is left alone: the call it makes checks its nonce and does
    nothing when it was superseded.
    """
    async with get_client() as client:
        try:
            flow_run = await client.read_flow_run(UUID(flow_run_id))
        except ObjectNotFound:
            return False
        # Pending too: a runner claims runs up to 10 s before they are due, and a claimed
        # run that is cancelled never starts its process. Running ones are left alone.
        if flow_run.state is None or flow_run.state.type not in _NOT_STARTED:
            return False
        result: OrchestrationResult[Any] = await client.set_flow_run_state(
            flow_run.id, Cancelled(message=reason)
        )
        return result.state is not None and result.state.type == StateType.CANCELLED
