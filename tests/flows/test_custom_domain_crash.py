"""CustomDomainService under SIGKILL, through real worker subprocesses: a verification killed in
the middle of a check resumes on another worker and ends ``verified`` exactly once (one
challenge, one route)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from uuid import UUID

import pytest
import sqlalchemy as sa

from tasks.db.engine import engine_for
from tasks.db.schema import custom_domains, frontline_routes
from tests.flows.custom_domain_support import (
    CNAME_DOMAIN,
    Project,
    domain_when,
    flow_run_state,
    fresh_domain,
    insert_domain,
    publish,
    read_challenge,
    read_route,
    unpublish,
)
from tests.support.acme_servers import Challtestsrv
from tests.support.fixtures import PrefectApi
from tests.support.waits import holding_row_lock, row_lock_waits, run_pid, wait_for
from tests.support.worker_process import WorkerProcess
from worker import client as worker_client
from worker.kernel.sleep import SLEEPING

pytestmark = [pytest.mark.slow, pytest.mark.mysql]


def _env(challtestsrv: Challtestsrv) -> dict[str, str]:
    return {
        "UNKEY_DNS_NAMESERVERS": challtestsrv.dns_address,
        "UNKEY_CNAME_DOMAIN": CNAME_DOMAIN,
        "UNKEY_CUSTOM_DOMAIN_CHECK_SECONDS": "2",
        "UNKEY_DURABLE_SLEEP_INLINE_SECONDS": "0.5",
    }


def test_a_verification_killed_mid_check_resumes_and_verifies_once(
    project: Project,
    challtestsrv: Challtestsrv,
    prefect_api: PrefectApi,
    worker_factory: Callable[..., WorkerProcess],
) -> None:
    """The verification has claimed the domain and failed a check (sleeping); the records
    are published and its next check blocks on the domain's row (a lock the test holds);
    worker and run are SIGKILLed. A new worker resumes the same run: its claim replays (same
    run owns the domain), the check passes, and the domain ends `verified` with one
    challenge and one live route."""
    url = project.seed.url
    domain = fresh_domain()
    values = insert_domain(url, project, domain)
    first = worker_factory(**_env(challtestsrv))
    run_id = str(asyncio.run(worker_client.verify_domain(domain)))
    domain_when(url, domain, lambda r: r.check_attempts >= 1, 60, "a first failed check")
    wait_for(lambda: flow_run_state(run_id) == ("SCHEDULED", SLEEPING), 30, "the run to sleep")

    locked = sa.select(custom_domains).where(custom_domains.c.domain == domain)
    with holding_row_lock(url, locked):
        publish(challtestsrv, values)
        wait_for(
            lambda: row_lock_waits(url, "custom_domains") > 0,
            60,
            "the next check to block on the row",
        )
        pid = run_pid(prefect_api.state_dir, UUID(run_id))
        first.kill()
        os.kill(pid, signal.SIGKILL)

    try:
        worker_factory(**_env(challtestsrv))
        result = asyncio.run(worker_client.wait_for_result(run_id, timeout=120))
    finally:
        unpublish(challtestsrv, domain)
    assert result["verification_status"] == "verified"
    row = domain_when(url, domain, lambda r: True, 5, "the domain")
    assert row.invocation_id == run_id
    assert read_challenge(url, row.id) is not None
    assert read_route(url, domain) is not None
    with engine_for(url).connect() as check:
        routes = check.execute(
            sa.select(sa.func.count())
            .select_from(frontline_routes)
            .where(frontline_routes.c.fully_qualified_domain_name == domain)
        ).scalar_one()
    assert routes == 1
