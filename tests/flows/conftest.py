"""Fixtures of the service-flow tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module", autouse=True)
def _flush_prefect_events_and_logs() -> Iterator[None]:
    """Send this module's queued Prefect events and API logs while the server is still up.

    In-process flows queue events and logs for background senders; whatever is still queued
    when the session's server stops is retried at interpreter exit against a dead server,
    which can hold up the end of the test run for minutes.
    """
    yield
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        service.drain_all(timeout=60)
