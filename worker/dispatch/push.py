"""Event push: learn from the Prefect server's event stream when a run becomes due.

A worker that only polls starts a run up to one poll interval late. The server publishes a
``prefect.flow-run.<State>`` event for every state change, labelled with the state type and
related to the run's work pool; subscribing to the ``SCHEDULED`` ones of our pool (this also
covers ``AwaitingRetry``, a resumed run, and a woken durable sleep) and the ``CANCELLING``
ones tells the worker at once.

Facts this leans on (../shared/reference/fast-dispatch.md): the 3.8.8 live stream honours
``EventAnyResourceFilter`` (it ignores ``EventRelatedFilter``), and it drops events past a
256-event backlog per subscriber — so the worker's fallback poll stays mandatory; a lost
connection is re-opened with backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any
from uuid import UUID

from worker.kernel.events import flow_run_id_of, watch_events

__all__ = ["scheduled_time_of", "watch_pool_runs"]

log = logging.getLogger("ctrl.worker.dispatch")


def scheduled_time_of(event: Any) -> datetime | None:
    """The ``scheduled_time`` of the state an event reports, when it has one."""
    payload = event.payload or {}
    state = payload.get("validated_state") or payload.get("intended") or {}
    details = state.get("state_details") if isinstance(state, dict) else None
    raw = details.get("scheduled_time") if isinstance(details, dict) else None
    if not raw:
        return None
    try:
        return datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    except ValueError:
        return None


async def watch_pool_runs(
    pool_id: UUID | None,
    on_due: Callable[[UUID, datetime | None], None],
    on_cancelling: Callable[[UUID], Awaitable[None]],
) -> None:
    """Watch the pool's runs: ``on_due`` for Scheduled ones, ``on_cancelling`` for Cancelling.

    Without a pool id (the pool was not synced yet) nothing is watched: the poll covers it.
    """
    if pool_id is None:
        log.warning("work pool unknown: no event push, polling only")
        return
    from prefect.events.filters import (
        EventAnyResourceFilter,
        EventFilter,
        EventNameFilter,
        EventResourceFilter,
    )
    from prefect.events.schemas.events import ResourceSpecification

    filter = EventFilter(
        event=EventNameFilter(prefix=["prefect.flow-run."]),
        resource=EventResourceFilter(
            labels=ResourceSpecification({"prefect.state-type": ["SCHEDULED", "CANCELLING"]})
        ),
        any_resource=EventAnyResourceFilter(id=[f"prefect.work-pool.{pool_id}"]),
    )

    async def dispatch(event: Any) -> None:
        flow_run_id = flow_run_id_of(event)
        if flow_run_id is None:
            return
        if event.resource.get("prefect.state-type") == "CANCELLING":
            await on_cancelling(flow_run_id)
        else:
            on_due(flow_run_id, scheduled_time_of(event))

    await watch_events(filter, dispatch)
