"""CertificateService's rate-limit wait through the served worker: a durable sleep that holds
no process, on the same flow run, which wakes and goes on.

The CA is a stand-in (pytest-httpserver) that answers the first newOrder 429 with
``Retry-After: 1`` and every later one with a terminal ``rejectedIdentifier`` problem, so the
run's end after its wake-up tells it tried again. The flow waits Retry-After + 1 min (clamped
to at least 1 min): 61 s of real waiting, which the test lets pass. The worker is a real
subprocess (monkeypatching cannot reach it).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from uuid import UUID

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tasks.acme.account import ensure_account
from tasks.db.certificates import challenge_failure
from tests.support.acme_servers import Pebble
from tests.support.certificate_seed import (
    SeededDomain,
    certificate_rows,
    challenge_row,
    seeded_domain,
)
from tests.support.fixtures import PrefectApi
from tests.support.waits import flow_run, state_names, wait_for
from tests.support.worker_process import WorkerProcess
from worker import client as worker_client
from worker.kernel.clock import new_dns_label
from worker.kernel.sleep import SLEEPING
from worker.settings import worker_settings

pytestmark = [pytest.mark.slow, pytest.mark.mysql]

REFUSAL = "stand-in CA refuses this name by policy"


class StandInCa:
    """A stand-in ACME directory: newOrder is rate limited once, then refused for good.

    Attributes:
        orders: when (unix seconds) each newOrder arrived, in order.
    """

    def __init__(self, httpserver: HTTPServer) -> None:
        self.orders: list[float] = []
        self._lock = threading.Lock()
        self.directory_url = httpserver.url_for("/dir")
        httpserver.expect_request("/dir").respond_with_json(
            {
                name: httpserver.url_for(f"/{name}")
                for name in ("newNonce", "newAccount", "newOrder", "revokeCert", "keyChange")
            }
        )
        httpserver.expect_request("/newNonce").respond_with_data(
            "", headers={"Replay-Nonce": "bm9uY2U", "Cache-Control": "no-store"}
        )
        httpserver.expect_request("/newOrder", method="POST").respond_with_handler(self._order)

    def _order(self, request: Request) -> Response:
        with self._lock:
            self.orders.append(time.time())
            first = len(self.orders) == 1
        if first:
            problem = {"type": "urn:ietf:params:acme:error:rateLimited", "detail": "slow down"}
            return Response(
                json.dumps(problem),
                status=429,
                headers={"Retry-After": "1", "Replay-Nonce": "bm9uY2U"},
                content_type="application/problem+json",
            )
        problem = {"type": "urn:ietf:params:acme:error:rejectedIdentifier", "detail": REFUSAL}
        return Response(
            json.dumps(problem),
            status=403,
            headers={"Replay-Nonce": "bm9uY2U"},
            content_type="application/problem+json",
        )


@pytest.fixture
def domain(control_db: str) -> Iterator[SeededDomain]:
    """A fresh ``app-<random>.example.test`` with a ``waiting`` HTTP-01 challenge."""
    with seeded_domain(control_db, f"app-{new_dns_label(10)}.example.test") as seed:
        yield seed


def _sleeping_until(run_id: UUID) -> datetime | None:
    """The wake-up time of the run while it is Scheduled "Sleeping", else None."""
    state = flow_run(run_id).state
    if state is None or state.name != SLEEPING:
        return None
    return state.state_details.scheduled_time


def test_a_rate_limit_sleeps_without_a_process_and_the_same_run_goes_on_after_it(
    control_db: str,
    pebble: Pebble,
    prefect_api: PrefectApi,
    worker_factory: Callable[..., WorkerProcess],
    httpserver: HTTPServer,
    domain: SeededDomain,
) -> None:
    """newOrder answers 429 (Retry-After 1 s) through a deployment run: the run waits
    Retry-After + 1 min as Scheduled "Sleeping" with no flow-run process (no run record);
    after its wake-up (not before) the same run orders again, and ends as the CA's second
    answer (a terminal refusal) dictates: failed with the CA's detail, the challenge
    `failed` with that reason, no certificate."""
    account_settings = worker_settings().model_copy(
        update={
            "acme_enabled": True,
            "acme_directory_url": pebble.directory_url,
            "acme_ca_bundle": pebble.ca_bundle,
            "acme_email_domain": "example.test",
        }
    )
    asyncio.run(ensure_account(account_settings))  # registered at pebble, kept in the DB
    ca = StandInCa(httpserver)
    worker_factory(
        UNKEY_ACME_ENABLED="true",
        UNKEY_ACME_DIRECTORY_URL=ca.directory_url,
        UNKEY_ACME_EMAIL_DOMAIN="example.test",
    )

    run_id = UUID(
        str(asyncio.run(worker_client.process_challenge(domain.workspace_id, domain.domain)))
    )
    wake_at = wait_for(lambda: _sleeping_until(run_id), 90, "the run to sleep")
    assert wake_at is not None
    record = prefect_api.state_dir / "runs" / f"{run_id}.json"
    wait_for(lambda: not record.exists(), 30, "the run's process to end")
    assert _sleeping_until(run_id) == wake_at, "still asleep, with no process"
    assert len(ca.orders) == 1
    assert wake_at.timestamp() >= ca.orders[0] + 60  # Retry-After + 1 min
    assert challenge_row(domain).status == "pending"

    with pytest.raises(worker_client.FlowRunFailed, match=REFUSAL):
        asyncio.run(worker_client.wait_for_result(run_id, timeout=150))

    assert len(ca.orders) == 2
    assert ca.orders[1] >= wake_at.timestamp(), "ordered again before its wake-up time"
    names = state_names(run_id)
    assert SLEEPING in names and names.index(SLEEPING) < len(names) - 1
    assert "Running" in names[names.index(SLEEPING) :]
    assert challenge_row(domain).status == "failed"
    reason = challenge_failure(domain.domain_id)
    assert reason is not None and REFUSAL in reason
    assert certificate_rows(domain) == []
