"""Listening to the Prefect server's event stream, reconnecting for ever.

The kernel and the worker learn of state changes by push instead of polling: a run that
became due, a run that ended (the client's ``wait=True``), a key that was released. The
server's live stream drops events past a 256-event backlog per subscriber, so every user of
this module keeps a fallback poll (../shared/reference/fast-dispatch.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

__all__ = ["flow_run_id_of", "watch_events"]

log = logging.getLogger("ctrl.worker.events")

RECONNECT_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0)


def flow_run_id_of(event: Any) -> UUID | None:
    """The flow run an event is about, if its resource is a flow run."""
    resource_id = str(event.resource.id)
    if not resource_id.startswith("prefect.flow-run."):
        return None
    try:
        return UUID(resource_id.removeprefix("prefect.flow-run."))
    except ValueError:
        return None


async def watch_events(
    filter: Any,
    on_event: Callable[[Any], Awaitable[None] | None],
    on_connected: Callable[[], None] | None = None,
) -> None:
    """Call ``on_event`` for every event matching ``filter``; reconnect with backoff for ever.

    Args:
        filter: a ``prefect.events.filters.EventFilter``.
        on_event: called with each event; may be a coroutine function.
        on_connected: called each time the subscription is (re)established.
    """
    from prefect.events.clients import get_events_subscriber

    failures = 0
    while True:
        try:
            async with get_events_subscriber(filter=filter, reconnection_attempts=0) as events:
                failures = 0
                if on_connected is not None:
                    on_connected()
                async for event in events:
                    outcome = on_event(event)
                    if asyncio.iscoroutine(outcome):
                        await outcome
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            delay = RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)]
            failures += 1
            log.debug("event stream lost (%s); reconnecting in %.1f s", exc, delay)
            await asyncio.sleep(delay)
