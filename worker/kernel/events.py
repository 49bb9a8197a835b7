"""Listening to the Prefect server's event stream, reconnecting for ever.

The kernel and the worker learn of state changes by push instead of polling: a run that
became due, a run that ended (the client's ``wait=True``), a key that was released. The
server's live stream drops events past a 256-event backlog per subscriber, so every user of
this module keeps a fallback poll (../shared/reference/fast-dispatch.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar
from uuid import UUID

T = TypeVar("T")

__all__ = ["flow_run_id_of", "until_signalled", "watch_events"]

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


async def until_signalled(
    check: Callable[[], Awaitable[T | None]],
    listener: Coroutine[Any, Any, None],
    signal: asyncio.Event,
    *,
    poll_seconds: Callable[[bool], float],
    timeout: float | None,
    what: str,
) -> T:
    """Return ``check()`` as soon as it is not None, checking again on each ``signal``.

    Args:
        check: reads the current state; returns the outcome, or None while not there yet.
        listener: sets ``signal`` on each event worth checking again on (run as a task for
            the duration, cancelled at the end).
        signal: set by ``listener``.
        poll_seconds: the fallback poll interval, given whether the listener has stopped.
        timeout: give up after this many seconds (None: never).
        what: named in the timeout's message.

    Raises:
        TimeoutError: ``timeout`` passed first.
    """
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    watcher = loop.create_task(listener)
    try:
        while True:
            outcome = await check()
            if outcome is not None:
                return outcome
            poll = poll_seconds(watcher.done())
            wait = poll if deadline is None else min(poll, deadline - loop.time())
            if wait <= 0:
                raise TimeoutError(f"{what} is not finished after {timeout} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(signal.wait(), wait)
            signal.clear()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher
