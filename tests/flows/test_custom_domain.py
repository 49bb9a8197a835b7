"""CustomDomainService (flows/custom_domain.py) against real DNS (pebble-challtestsrv), real
issuance (pebble + ``ctrl-worker acme-responder``), MariaDB and the session's Prefect server.

Calls that start other calls (add → verify → process_challenge) run through a real worker
subprocess configured for this module (ACME on pebble, DNS on challtestsrv, a check every
2 s, durable waits from 0.5 s on); calls that only check DNS run in-process too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any
from uuid import UUID

import pytest
import sqlalchemy as sa

from flows.custom_domain import (
    add_custom_domain,
    delete_custom_domain,
    retry_verification,
    verify_domain,
)
from tasks.db.engine import engine_for
from tasks.db.schema import (
    custom_domains,
)
from tests.flows.custom_domain_support import (
    CNAME_DOMAIN,
    Project,
    count_domains,
    domain_when,
    flow_run_state,
    fresh_domain,
    insert_domain,
    publish,
    read_certificate,
    read_challenge,
    read_domain,
    read_route,
    run_record,
    unpublish,
)
from tests.flows.helpers import fails_at_once
from tests.support.acme_servers import Challtestsrv, Pebble, start_acme_responder
from tests.support.fixtures import PrefectApi
from tests.support.waits import wait_for
from tests.support.worker_process import WorkerProcess
from worker import client as worker_client
from worker.kernel.clock import now_ms
from worker.kernel.errors import (
    ConflictError,
    InvalidParameterError,
    NotFoundError,
    RefusedError,
)
from worker.kernel.sleep import SLEEPING
from worker.settings import Settings

pytestmark = pytest.mark.mysql

CHECK_SECONDS = 2
LONG_NAME = ("a" * 63 + ".") * 3 + "a" * 57 + ".test"
assert len(LONG_NAME) == 254


@pytest.fixture(scope="module")
def domain_worker(
    prefect_api: PrefectApi,
    control_db: str,
    pebble: Pebble,
    challtestsrv: Challtestsrv,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WorkerProcess]:
    """The real worker, issuing on pebble and checking DNS on challtestsrv, with its
    ``acme-responder`` on pebble's HTTP-01 port."""
    directory = tmp_path_factory.mktemp("domains")
    responder = start_acme_responder(directory / "responder", control_db, pebble.http01_port)
    worker = WorkerProcess(
        prefect_api.url,
        control_db,
        prefect_api.state_dir,
        directory / "worker.log",
        **pebble.worker_env(),
        UNKEY_DNS_NAMESERVERS=challtestsrv.dns_address,
        UNKEY_CNAME_DOMAIN=CNAME_DOMAIN,
        UNKEY_CUSTOM_DOMAIN_CHECK_SECONDS=str(CHECK_SECONDS),
        UNKEY_DURABLE_SLEEP_INLINE_SECONDS="0.5",
    ).start()
    try:
        yield worker
    finally:
        worker.stop()
        responder.stop(timeout=10)


def test_the_verified_path_creates_the_challenge_the_issuance_and_the_live_route(
    domain_worker: WorkerProcess, project: Project, challtestsrv: Challtestsrv, pebble: Pebble
) -> None:
    """add_custom_domain answers at once with the token and a `<16>.<cname domain>` target;
    once the records exist, its verification ends `verified`, an HTTP-01 challenge is
    created and issued (a certificate for exactly the domain, chained to pebble), and a
    live-sticky route points the domain at the project's live deployment."""
    seed = project.seed
    domain = fresh_domain()
    added = asyncio.run(
        worker_client.add_custom_domain(
            seed.workspace_id, seed.project_id, seed.environment_id, domain, wait=True
        )
    )
    try:
        assert added["domain"] == domain and added["verification_status"] == "pending"
        label, _, apex = added["target_cname"].partition(".")
        assert apex == CNAME_DOMAIN and len(label) == 16
        assert len(added["verification_token"]) == 24
        publish(challtestsrv, added)

        row = domain_when(
            seed.url,
            domain,
            lambda r: r.verification_status == "verified",
            60,
            "the domain to be verified",
        )
        assert row.ownership_verified and row.cname_verified and row.verification_error is None
        challenge = wait_for(
            lambda: (
                (c := read_challenge(seed.url, row.id)) is not None and c.status == "verified" and c
            ),
            90,
            "the certificate to be issued",
        )
        assert challenge.challenge_type == "HTTP-01"
        certificate = read_certificate(seed.url, domain)
        assert certificate is not None and certificate.workspace_id == seed.workspace_id
        route = read_route(seed.url, domain)
        assert route is not None
        assert (route.deployment_id, route.sticky) == (project.live, "live")
        assert route.environment_id == seed.environment_id
    finally:
        unpublish(challtestsrv, domain)


def test_a_wrong_txt_keeps_rechecking_durably_then_verifies_once_fixed(
    domain_worker: WorkerProcess,
    project: Project,
    challtestsrv: Challtestsrv,
    prefect_api: PrefectApi,
) -> None:
    """A wrong TXT value: the verification counts failed checks and keeps the finding
    (`verification_error` names the TXT expected and the value found), and between checks
    it holds no process (the run is Scheduled "Sleeping", no run record); fixed, it ends
    `verified`."""
    seed = project.seed
    domain = fresh_domain()
    added = asyncio.run(
        worker_client.add_custom_domain(
            seed.workspace_id, seed.project_id, seed.environment_id, domain, wait=True
        )
    )
    try:
        publish(challtestsrv, added, token="wrong-token")
        row = domain_when(
            seed.url, domain, lambda r: r.check_attempts >= 2, 60, "two failed checks"
        )
        assert row.verification_status == "verifying"
        assert not row.ownership_verified and row.cname_verified
        assert row.verification_error is not None
        assert "missing TXT" in row.verification_error
        assert "unkey-domain-verify=wrong-token" in row.verification_error
        run_id = row.invocation_id
        wait_for(lambda: flow_run_state(run_id) == ("SCHEDULED", SLEEPING), 30, "the run to sleep")
        assert not run_record(prefect_api, run_id).exists(), "a sleeping check holds a process"

        challtestsrv.clear_txt(f"_unkey.{domain}")
        publish(challtestsrv, added)
        domain_when(
            seed.url,
            domain,
            lambda r: r.verification_status == "verified",
            60,
            "the domain to be verified once the TXT is right",
        )
        wait_for(lambda: flow_run_state(run_id)[0] == "COMPLETED", 30, "the run to complete")
    finally:
        unpublish(challtestsrv, domain)


def test_the_deadline_fails_the_verification_naming_what_is_missing(
    dns_settings: Settings, project: Project, challtestsrv: Challtestsrv
) -> None:
    """No records at all: checks repeat until the deadline (measured from this
    verification's start), then the call fails terminally and the domain is `failed`, its
    error naming both the TXT and the CNAME and what was found; no verification owns it."""
    domain = fresh_domain()
    insert_domain(project.seed.url, project, domain)
    error = fails_at_once(RefusedError, verify_domain, domain=domain)
    assert "timed out" in str(error)

    row = read_domain(project.seed.url, domain)
    assert row is not None and row.verification_status == "failed"
    assert row.check_attempts >= 3
    assert row.invocation_id is None
    assert row.verification_error is not None
    assert "missing TXT and CNAME" in row.verification_error
    assert "found no TXT record" in row.verification_error
    assert "found no CNAME record" in row.verification_error
    assert read_challenge(project.seed.url, row.id) is None


def test_an_old_domain_gets_a_full_verification_window(
    dns_settings: Settings, project: Project, challtestsrv: Challtestsrv
) -> None:
    """(fix) The deadline runs from the verification's start, not the row's creation: a
    domain created two days ago still verifies on a fresh call."""
    domain = fresh_domain()
    values = insert_domain(project.seed.url, project, domain)
    with engine_for(project.seed.url).begin() as connection:
        connection.execute(
            sa.update(custom_domains)
            .where(custom_domains.c.domain == domain)
            .values(created_at=now_ms() - 2 * 86400 * 1000)
        )
    publish(challtestsrv, values)
    try:
        result = asyncio.run(verify_domain(domain=domain))
    finally:
        unpublish(challtestsrv, domain)
    assert result["verification_status"] == "verified"
    row = read_domain(project.seed.url, domain)
    assert row is not None and row.verification_status == "verified"
    challenge = read_challenge(project.seed.url, row.id)
    assert challenge is not None and challenge.status == "waiting"  # ACME off: the sweep's
    assert read_route(project.seed.url, domain) is not None


def test_retry_resets_a_failed_domain_and_verifies_it(
    dns_settings: Settings,
    project: Project,
    challtestsrv: Challtestsrv,
    domain_worker: WorkerProcess,
) -> None:
    """A `failed` domain: retry_verification resets it (pending, 0 attempts, no error) and
    starts a new verification, which ends `verified` once the records exist."""
    domain = fresh_domain()
    values = insert_domain(project.seed.url, project, domain)
    fails_at_once(RefusedError, verify_domain, domain=domain)
    publish(challtestsrv, values)
    try:
        retried = asyncio.run(worker_client.retry_verification(domain, wait=True))
        assert retried["verification_status"] == "pending"
        domain_when(
            project.seed.url,
            domain,
            lambda r: r.verification_status == "verified",
            60,
            "the retried verification to succeed",
        )
    finally:
        unpublish(challtestsrv, domain)
    row = read_domain(project.seed.url, domain)
    assert row is not None and row.verification_error is None and row.check_attempts == 1
    fails_at_once(RefusedError, retry_verification, domain=domain)  # verified: nothing to retry


def test_retry_cancels_a_sleeping_verification_and_the_old_one_writes_nothing(
    domain_worker: WorkerProcess, project: Project, challtestsrv: Challtestsrv
) -> None:
    """A verification sleeping between checks is cancelled by a retry; the new one owns the
    domain (`invocation_id`) and the cancelled one never writes again."""
    seed = project.seed
    domain = fresh_domain()
    asyncio.run(
        worker_client.add_custom_domain(
            seed.workspace_id, seed.project_id, seed.environment_id, domain, wait=True
        )
    )
    first = domain_when(
        seed.url, domain, lambda r: r.check_attempts >= 1, 60, "a first failed check"
    )
    old_run = first.invocation_id
    wait_for(lambda: flow_run_state(old_run) == ("SCHEDULED", SLEEPING), 30, "the run to sleep")
    asyncio.run(worker_client.retry_verification(domain, wait=True))
    if flow_run_state(old_run)[0] != "CANCELLED":
        # On a loaded machine the old run may have woken for its next check (no longer
        # Scheduled, so not cancellable) just as the retry came: it then waits for the key
        # and, no longer the owner, ends without writing.
        ended = asyncio.run(worker_client.wait_for_result(UUID(old_run), timeout=60))
        assert ended["verification_status"] == "superseded"
    new = domain_when(
        seed.url,
        domain,
        lambda r: r.invocation_id not in (None, old_run),
        30,
        "the new verification to claim the domain",
    )
    assert new.invocation_id != old_run


def test_delete_removes_route_challenge_and_domain_together(
    dns_settings: Settings,
    project: Project,
    challtestsrv: Challtestsrv,
    domain_worker: WorkerProcess,
) -> None:
    """A verified domain with its challenge and route: delete_custom_domain removes all
    three; a second delete is NotFoundError."""
    domain = fresh_domain()
    values = insert_domain(project.seed.url, project, domain)
    publish(challtestsrv, values)
    try:
        asyncio.run(verify_domain(domain=domain))
    finally:
        unpublish(challtestsrv, domain)
    row = read_domain(project.seed.url, domain)
    assert row is not None and read_challenge(project.seed.url, row.id) is not None
    assert read_route(project.seed.url, domain) is not None

    result = asyncio.run(worker_client.delete_custom_domain(domain, wait=True))
    assert result == {"domain": domain, "deleted": True}
    assert read_domain(project.seed.url, domain) is None
    assert read_challenge(project.seed.url, row.id) is None
    assert read_route(project.seed.url, domain) is None
    fails_at_once(NotFoundError, delete_custom_domain, domain=domain)


def test_adding_a_taken_name_or_a_foreign_project_is_refused_with_nothing_written(
    dns_settings: Settings, project: Project, domain_worker: WorkerProcess
) -> None:
    """A name that exists, a project of another workspace, an environment of another
    project: ConflictError at once, no row added."""
    seed = project.seed
    domain = fresh_domain()
    insert_domain(seed.url, project, domain)
    before = count_domains(seed.url)
    fails_at_once(
        ConflictError,
        add_custom_domain,
        workspace_id=seed.workspace_id,
        project_id=seed.project_id,
        environment_id=seed.environment_id,
        domain=domain,
    )
    fails_at_once(
        ConflictError,
        add_custom_domain,
        workspace_id="ws_other",
        project_id=seed.project_id,
        environment_id=seed.environment_id,
        domain=fresh_domain(),
    )
    assert count_domains(seed.url) == before


BAD_DOMAINS = [
    "",
    "localhost",
    "a..example.test",
    "*.example.test",
    "app.*.example.test",
    LONG_NAME,
    "app example.test",
    "app.example.test.",
    "-app.example.test",
    "ápp.example.test",
    "192.168.0.1",
]


@pytest.mark.parametrize("domain", BAD_DOMAINS)
@pytest.mark.parametrize(
    "flow", [verify_domain, retry_verification, delete_custom_domain], ids=lambda f: f.name
)
def test_bad_domains_fail_at_once_with_nothing_written(
    dns_settings: Settings, control_db: str, flow: Any, domain: str
) -> None:
    """Empty, single-label, malformed, wildcard, 254-character, non-ASCII names and IP
    addresses: InvalidParameterError naming `domain`, no step retried, nothing written."""
    before = count_domains(control_db)
    error = fails_at_once(InvalidParameterError, flow, domain=domain)
    assert error.parameter == "domain"
    assert count_domains(control_db) == before


@pytest.mark.parametrize(
    ("overrides", "parameter"),
    [
        ({"workspace_id": ""}, "workspace_id"),
        ({"project_id": ""}, "project_id"),
        ({"environment_id": " "}, "environment_id"),
        ({"domain": "*.example.test"}, "domain"),
        ({"domain": LONG_NAME}, "domain"),
        ({"domain": ""}, "domain"),
    ],
)
def test_add_with_bad_parameters_fails_at_once_with_nothing_written(
    dns_settings: Settings, control_db: str, overrides: dict[str, str], parameter: str
) -> None:
    """Empty ids and bad names: InvalidParameterError naming the parameter, nothing written."""
    params = {
        "workspace_id": "ws_1",
        "project_id": "proj_1",
        "environment_id": "env_1",
        "domain": "shop.example.test",
        **overrides,
    }
    before = count_domains(control_db)
    error = fails_at_once(InvalidParameterError, add_custom_domain, **params)
    assert error.parameter == parameter
    assert count_domains(control_db) == before
