"""Fixtures of the service-flow tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.flows.clickhouse_user_support import (  # noqa: F401 (fixtures)
    admin_settings,
    standin,
    workspace,
)
from tests.flows.custom_domain_support import dns_settings, project  # noqa: F401 (fixtures)
from tests.support.worker_process import WorkerProcess


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


@pytest.fixture(scope="module")
def served(prefect_api, control_db, tmp_path_factory) -> Iterator[WorkerProcess]:
    """The real worker for this module: it registers the catalogue's deployments (so calls a
    flow sends find theirs) and serves them."""
    log = tmp_path_factory.mktemp("flows-worker") / "worker.log"
    worker = WorkerProcess(prefect_api.url, control_db, prefect_api.state_dir, log).start()
    try:
        yield worker
    finally:
        worker.stop()
