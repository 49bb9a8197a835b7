"""Durable sleep: Restate's ``ctx.Sleep``, a timer that frees the process and the key.

``await durable_sleep(seconds, name="rate-limit-1")`` inside a service call:

- a short wait (up to ``UNKEY_DURABLE_SLEEP_INLINE_SECONDS``, default 30) sleeps in place;
- a long one records its wake-up time as a step (so a replay keeps the first wake-up time),
  releases every key the call holds, moves the **same flow run** back to ``Scheduled`` (state
  name ``Sleeping``) at the wake-up time, and ends the process. No process and no key is held
  while it waits; a worker restart changes nothing (the state is on the server). When the run
  starts again its finished steps replay, ``durable_sleep`` finds the wake-up time passed and
  returns, and the call goes on after re-taking its key in ``critical_section``.

The world may have changed while the key was free: a read that guards a write must be done
again after the sleep (do not make it a cached step before the sleep; see
``step(fresh=True)``).

``name`` identifies the sleep within its call (one record per name): a loop that sleeps
repeatedly gives each sleep its own name (``recheck-1``, ``recheck-2``, ...).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.responses import OrchestrationResult
from prefect.context import FlowRunContext
from prefect.exceptions import Pause
from prefect.states import Scheduled

from worker.kernel.clock import now
from worker.kernel.locks import release_held_keys
from worker.kernel.steps import step
from worker.settings import worker_settings

__all__ = ["SLEEPING", "durable_sleep"]

log = logging.getLogger("ctrl.worker.sleep")

SLEEPING = "Sleeping"  # the state name of a run waiting for its wake-up time


@step(name="sleep", key=("name",), retries=0)
def wake_time(name: str, seconds: float) -> float:
    """When the sleep ``name`` of this call ends (unix seconds), recorded on first use."""
    return now().timestamp() + seconds


async def durable_sleep(seconds: float, *, name: str = "sleep") -> None:
    """Wait ``seconds`` durably (see the module docstring).

    Args:
        seconds: how long to wait from the first time this sleep is reached.
        name: the sleep's name, unique within the call.
    """
    wake_at = wake_time(name, float(seconds))
    remaining = wake_at - now().timestamp()
    if remaining <= 0:
        return
    ctx = FlowRunContext.get()
    flow_run = ctx.flow_run if ctx is not None else None
    inline = worker_settings().durable_sleep_inline_seconds
    if remaining <= inline or flow_run is None or flow_run.deployment_id is None:
        # Short, or not a deployment's run (nothing would start it again): wait in place.
        await asyncio.sleep(remaining)
        return
    await release_held_keys()
    until = datetime.fromtimestamp(wake_at, tz=UTC)
    async with get_client() as client:
        result: OrchestrationResult[Any] = await client.set_flow_run_state(
            flow_run.id,
            Scheduled(
                scheduled_time=until,
                name=SLEEPING,
                message=f"durable sleep {name!r} until {until.isoformat(timespec='seconds')}",
            ),
            force=True,
        )
    log.info("flow run %s sleeps until %s (%s)", flow_run.id, until, name)
    # The engine leaves a run alone after Pause: the process ends and the state stays.
    raise Pause(state=result.state)
