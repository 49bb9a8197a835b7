"""CertificateService.RenewExpiringCertificates (flows/certificate_renewal.py): the sweep
against a real pebble CA (challtestsrv as its DNS), the real ``ctrl-worker acme-responder``,
MariaDB, the session's Prefect server and a real worker serving the ``process_challenge`` calls
the sweep starts; ARI against a stand-in directory (pebble 2.4 has no ``renewalInfo``).

The sweep looks at every challenge of the database: each test seeds its own
``renew-<random>.example.test`` domains, asserts on them only, and removes their rows after.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from acme import client as acme_client
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
from pydantic import SecretStr
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

import flows.certificate_renewal as renewal_flow
from flows.certificate import process_challenge, renew_expiring_certificates
from tasks.acme.account import ensure_account
from tasks.acme.errors import AcmeRefused
from tasks.acme.renewal import ari_certificate_id, parse_leaf
from tasks.db.certificates import (
    challenge_failure,
    mark_challenge_failed,
    mark_challenge_verified,
)
from tasks.db.engine import engine_for
from tasks.db.schema import acme_challenge_failures, acme_challenges, certificates
from tests.flows.helpers import fails_at_once
from tests.support.acme_servers import Pebble, start_acme_responder
from tests.support.certificate_seed import SeededDomain, insert_domain, remove_domains
from tests.support.fixtures import PrefectApi
from tests.support.settings import changed_settings
from tests.support.worker_process import WorkerProcess
from worker.certificate_metrics import CertificateCollector
from worker.kernel.clock import new_dns_label, new_id, now_ms
from worker.kernel.steps import durable_call
from worker.settings import Settings, use_settings

pytestmark = pytest.mark.mysql

HOUR_MS = 3_600_000
DAY = datetime.timedelta(days=1)


@pytest.fixture(autouse=True)
def _fast_acme_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The library's finalization poll sleeps 1 s between polls; pebble answers at once (this
    process only: the worker's calls keep the library's pace)."""
    real_sleep = acme_client.time.sleep
    monkeypatch.setattr(acme_client.time, "sleep", lambda seconds: real_sleep(min(seconds, 0.05)))


@pytest.fixture(scope="module")
def acme_worker(
    prefect_api: PrefectApi,
    control_db: str,
    pebble: Pebble,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WorkerProcess]:
    """The real worker (ACME on pebble, the session's vault) serving the renewal calls, and
    the responder pebble validates HTTP-01 against."""
    directory = tmp_path_factory.mktemp("renewal-worker")
    responder = start_acme_responder(directory / "responder", control_db, pebble.http01_port)
    worker = WorkerProcess(
        prefect_api.url,
        control_db,
        prefect_api.state_dir,
        directory / "worker.log",
        **pebble.worker_env(),
        UNKEY_WORKER_LIMIT="12",
    )
    try:
        yield worker.start()
    finally:
        worker.stop()
        responder.stop(timeout=10)


@pytest.fixture
def settings(control_db: str, pebble: Pebble) -> Iterator[Settings]:
    """This process's settings with ACME on pebble (where the in-process sweep runs)."""
    with changed_settings(**pebble.settings_update()) as installed:
        asyncio.run(ensure_account(installed))  # registered at pebble once, as the worker sees it
        yield installed


class Seeder:
    """Seeds custom domains with an HTTP-01 challenge (``add``); ``made`` lists them."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.made: list[SeededDomain] = []

    def add(self, status: str = "waiting", name: str | None = None) -> SeededDomain:
        """A new domain (``renew-<random>.example.test`` unless ``name``) and its challenge."""
        with engine_for(self.url).begin() as connection:
            seed = insert_domain(
                connection,
                name or f"renew-{new_dns_label(10)}.example.test",
                url=self.url,
                status=status,
            )
        self.made.append(seed)
        return seed


@pytest.fixture
def domains(control_db: str) -> Iterator[Seeder]:
    """The test's domains; all their rows removed afterwards."""
    seeder = Seeder(control_db)
    yield seeder
    remove_domains(control_db, seeder.made)


def _set_failed(seed: SeededDomain, failures: int, ago_ms: int) -> None:
    with engine_for(seed.url).begin() as connection:
        connection.execute(
            sa.update(acme_challenges)
            .where(acme_challenges.c.domain_id == seed.domain_id)
            .values(status="failed")
        )
        connection.execute(
            sa.insert(acme_challenge_failures).values(
                domain_id=seed.domain_id,
                message="seeded failure",
                failed_at=now_ms() - ago_ms,
                failures=failures,
            )
        )


def _store_certificate(seed: SeededDomain, chain_pem: str) -> str:
    certificate_id = new_id("cert")
    with engine_for(seed.url).begin() as connection:
        connection.execute(
            sa.insert(certificates).values(
                id=certificate_id,
                workspace_id=seed.workspace_id,
                hostname=seed.domain,
                certificate=chain_pem,
                encrypted_private_key="not-a-key",
                created_at=now_ms(),
            )
        )
        connection.execute(
            sa.update(acme_challenges)
            .where(acme_challenges.c.domain_id == seed.domain_id)
            .values(status="verified", expires_at=now_ms())
        )
    return certificate_id


def _self_signed(domain: str, not_before: datetime.datetime, days: int, serial: int) -> str:
    """A leaf with an authority key identifier (what ARI names a certificate by)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)])
    leaf = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_before + datetime.timedelta(days=days))
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return leaf.public_bytes(serialization.Encoding.PEM).decode()


def _certificate(seed: SeededDomain) -> sa.Row | None:
    with engine_for(seed.url).connect() as connection:
        return connection.execute(
            sa.select(certificates).where(certificates.c.hostname == seed.domain)
        ).first()


def _challenge(seed: SeededDomain) -> tuple[str, int | None]:
    with engine_for(seed.url).connect() as connection:
        row = connection.execute(
            sa.select(acme_challenges.c.status, acme_challenge_failures.c.failures)
            .outerjoin(
                acme_challenge_failures,
                acme_challenge_failures.c.domain_id == acme_challenges.c.domain_id,
            )
            .where(acme_challenges.c.domain_id == seed.domain_id)
        ).one()
    return row.status, row.failures


def _issue(seed: SeededDomain) -> None:
    asyncio.run(process_challenge(workspace_id=seed.workspace_id, domain=seed.domain))


def _sweep(**params: Any) -> dict[str, Any]:
    return asyncio.run(renew_expiring_certificates(**params))


def _sweep_at(monkeypatch: pytest.MonkeyPatch, at: datetime.datetime, **params: Any) -> Any:
    """A sweep judging dueness at ``at`` (only the sweep's recorded instant moves: leases,
    Prefect and the CA keep the real clock)."""
    monkeypatch.setattr(renewal_flow, "now_ms", lambda: int(at.timestamp() * 1000))
    return _sweep(**params)


async def _runs_of(seeds: list[SeededDomain]) -> list[Any]:
    """The ``process_challenge`` runs a sweep started for ``seeds`` (keyed ``renew-...``)."""
    names = [f"process-challenge-{seed.domain}" for seed in seeds]
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=names))
        )
    return [run for run in runs if (run.idempotency_key or "").startswith("renew-")]


def test_near_expiry_certificate_is_renewed_keeping_its_id(
    settings: Settings,
    acme_worker: WorkerProcess,
    domains: Seeder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A `verified` certificate with less than a third of its lifetime left is renewed by the
    sweep (through a `process_challenge` call): the same certificate id, a new chain, the
    challenge still `verified`; the sweep reports it triggered and not failed."""
    seed = domains.add()
    _issue(seed)
    before = _certificate(seed)
    assert before is not None
    leaf = parse_leaf(before.certificate)

    result = _sweep_at(monkeypatch, leaf.not_after - (leaf.not_after - leaf.not_before) / 4)

    after = _certificate(seed)
    assert after is not None and after.id == before.id
    assert after.certificate != before.certificate
    assert parse_leaf(after.certificate).not_after > leaf.not_after
    assert _challenge(seed) == ("verified", None)
    assert result["renewals_triggered"] >= 1 and seed.domain not in result["failed_domains"]


def test_certificate_not_yet_due_is_left_alone(
    settings: Settings, acme_worker: WorkerProcess, domains: Seeder
) -> None:
    """A certificate just issued (far from a third of its lifetime left) is not renewed: no
    call is started for it and its chain is unchanged."""
    seed = domains.add()
    _issue(seed)
    before = _certificate(seed)

    result = _sweep()

    after = _certificate(seed)
    assert before is not None and after is not None
    assert after.certificate == before.certificate
    assert asyncio.run(_runs_of([seed])) == []
    assert result["certificates_checked"] >= 1


def test_days_before_expiry_makes_due(
    settings: Settings, acme_worker: WorkerProcess, domains: Seeder
) -> None:
    """An operator's `days_before_expiry` larger than the time left renews a certificate the
    lifetime rule would keep (pebble's certificates last 5 years)."""
    seed = domains.add()
    _issue(seed)
    before = _certificate(seed)
    assert before is not None

    result = _sweep(days_before_expiry=5 * 366)

    after = _certificate(seed)
    assert after is not None and after.id == before.id
    assert after.certificate != before.certificate
    assert seed.domain not in result["failed_domains"]


def test_failed_challenge_is_retried_after_its_backoff_and_not_before(
    settings: Settings, acme_worker: WorkerProcess, domains: Seeder
) -> None:
    """A `failed` challenge is retried 1 h after its first failure, 2 h after its second:
    one that failed once 30 min ago and one that failed twice 90 min ago are left `failed`
    (no call), one that failed twice 3 h ago is retried and ends `verified` with a
    certificate (its failure row cleared)."""
    early_first, early_second, retried = (domains.add() for _ in range(3))
    _set_failed(early_first, failures=1, ago_ms=HOUR_MS // 2)
    _set_failed(early_second, failures=2, ago_ms=90 * 60_000)
    _set_failed(retried, failures=2, ago_ms=3 * HOUR_MS)

    result = _sweep()

    assert _challenge(early_first) == ("failed", 1)
    assert _challenge(early_second) == ("failed", 2)
    assert asyncio.run(_runs_of([early_first, early_second])) == []
    assert _challenge(retried) == ("verified", None)
    assert _certificate(retried) is not None
    assert retried.domain not in result["failed_domains"]


def test_a_failing_renewal_is_listed_and_its_failures_counted(
    settings: Settings, acme_worker: WorkerProcess, domains: Seeder
) -> None:
    """A waiting wildcard domain the worker cannot issue (Route53 is off there) fails its
    call: the sweep lists it in `failed_domains`, its challenge is `failed` with one failure
    counted; each later failure adds one (the backoff doubles), a success clears the count."""
    seed = domains.add(name=f"*.renew-{new_dns_label(10)}.example.test")

    result = _sweep()

    assert seed.domain in result["failed_domains"]
    assert _challenge(seed) == ("failed", 1)
    reason = challenge_failure(seed.domain_id)
    assert reason is not None and "DNS-01" in reason
    assert mark_challenge_failed(seed.domain_id, "again")
    assert _challenge(seed) == ("failed", 2)
    mark_challenge_verified(seed.domain_id, now_ms())
    assert _challenge(seed) == ("verified", None)


def test_at_most_the_configured_renewals_run_at_once(
    settings: Settings, acme_worker: WorkerProcess, domains: Seeder
) -> None:
    """With `UNKEY_CERT_RENEWAL_CONCURRENCY=2`, five waiting domains are all issued, and the
    `process_challenge` runs (their start and end times at the Prefect API) never overlap by
    more than two."""
    use_settings(settings.model_copy(update={"cert_renewal_concurrency": 2}))
    seeds = [domains.add() for _ in range(5)]

    result = _sweep()

    assert all(_challenge(seed) == ("verified", None) for seed in seeds)
    assert not set(result["failed_domains"]) & {seed.domain for seed in seeds}
    runs = asyncio.run(_runs_of(seeds))
    assert len(runs) == 5
    edges = sorted(
        [(run.start_time, 1) for run in runs] + [(run.end_time, -1) for run in runs],
        key=lambda edge: (edge[0], edge[1]),
    )
    in_flight, most = 0, 0
    for _, change in edges:
        in_flight += change
        most = max(most, in_flight)
    assert most == 2


def test_heartbeat_after_a_sweep_and_none_after_a_failed_one(
    settings: Settings, acme_worker: WorkerProcess, domains: Seeder, httpserver: HTTPServer
) -> None:
    """A sweep that completes pings the heartbeat URL exactly once; a sweep that fails (the CA
    refuses the directory it checks renewal windows at) fails at once and pings nothing."""
    httpserver.expect_request("/heartbeat").respond_with_data("ok")
    with_heartbeat = settings.model_copy(
        update={"cert_renewal_heartbeat_url": SecretStr(httpserver.url_for("/heartbeat"))}
    )
    use_settings(with_heartbeat)

    _sweep()
    assert [r.path for r, _ in httpserver.log] == ["/heartbeat"]

    seed = domains.add()
    _store_certificate(seed, _self_signed(seed.domain, datetime.datetime.now(datetime.UTC), 90, 7))
    httpserver.expect_request("/dir").respond_with_json(
        {"type": "urn:ietf:params:acme:error:unauthorized", "detail": "go away"},
        status=403,
        headers={"Content-Type": "application/problem+json"},
    )
    use_settings(
        with_heartbeat.model_copy(update={"acme_directory_url": httpserver.url_for("/dir")})
    )
    fails_at_once(AcmeRefused, renew_expiring_certificates)
    assert [r.path for r, _ in httpserver.log].count("/heartbeat") == 1


def _ari_ca(
    httpserver: HTTPServer, windows: dict[str, tuple[datetime.datetime, datetime.datetime]]
) -> None:
    """A stand-in ACME directory with RFC 9773 ``renewalInfo`` (pebble 2.4 has none): the
    given windows per certificate id; newOrder answers a refusal after recording the order."""
    httpserver.expect_request("/dir").respond_with_json(
        {
            name: httpserver.url_for(f"/{name}")
            for name in (
                "newNonce",
                "newAccount",
                "newOrder",
                "revokeCert",
                "keyChange",
                "renewalInfo",
            )
        }
    )
    httpserver.expect_request("/newNonce").respond_with_data(
        "", headers={"Replay-Nonce": "bm9uY2U", "Cache-Control": "no-store"}
    )

    def renewal_info(request: Request) -> Response:
        start, end = windows[request.path.rsplit("/", 1)[1]]
        body = {"suggestedWindow": {"start": start.isoformat(), "end": end.isoformat()}}
        return Response(
            json.dumps(body), headers={"Content-Type": "application/json", "Retry-After": "21600"}
        )

    for ari_id in windows:
        httpserver.expect_request(f"/renewalInfo/{ari_id}").respond_with_handler(renewal_info)
    httpserver.expect_request("/newOrder", method="POST").respond_with_json(
        {"type": "urn:ietf:params:acme:error:rejectedIdentifier", "detail": "stand-in: no orders"},
        status=400,
        headers={"Content-Type": "application/problem+json", "Replay-Nonce": "bm9uY2Uy"},
    )


def test_ari_window_decides_and_the_new_order_names_the_replaced_certificate(
    settings: Settings, domains: Seeder, httpserver: HTTPServer
) -> None:
    """At a CA offering ARI: a certificate inside its suggested window is due, one before its
    window is not (although the lifetime rule would call both due); the renewal's newOrder
    carries `replaces` = the replaced certificate's ARI id (decoded from the JWS the CA got)."""
    inside, outside = domains.add(), domains.add()
    old = datetime.datetime.now(datetime.UTC) - 80 * DAY  # 10 days left of 90: lifetime-due
    chains = {
        seed.domain: _self_signed(seed.domain, old, 90, serial)
        for seed, serial in ((inside, 0x1234567890), (outside, 0xBEEF))
    }
    for seed in (inside, outside):
        _store_certificate(seed, chains[seed.domain])
    ids = {
        d: ari_certificate_id(x509.load_pem_x509_certificate(c.encode())) for d, c in chains.items()
    }
    now = datetime.datetime.now(datetime.UTC)
    _ari_ca(
        httpserver,
        {
            str(ids[inside.domain]): (now - DAY, now + DAY),
            str(ids[outside.domain]): (now + 5 * DAY, now + 6 * DAY),
        },
    )
    use_settings(settings.model_copy(update={"acme_directory_url": httpserver.url_for("/dir")}))

    _, due = asyncio.run(renewal_flow.select_due(None, now_ms()))
    reasons = {entry["domain"]: entry["reason"] for entry in due}
    assert reasons.get(inside.domain) == "ARI window"
    assert outside.domain not in reasons

    fails_at_once(
        AcmeRefused, process_challenge, workspace_id=inside.workspace_id, domain=inside.domain
    )
    orders = [request for request, _ in httpserver.log if request.path == "/newOrder"]
    assert len(orders) == 1
    payload = json.loads(_b64decode(json.loads(orders[0].get_data())["payload"]))
    assert payload["replaces"] == ids[inside.domain]
    assert payload["identifiers"] == [{"type": "dns", "value": inside.domain}]


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_metrics_collector_reports_a_seeded_certificate(
    settings: Settings, domains: Seeder
) -> None:
    """The collector's series for a stored certificate: NotAfter, the renewal time (a third
    of the lifetime left), ready `True` while `verified`, `False` once `failed`; the chain is
    parsed once per certificate version, not per scrape."""
    seed = domains.add()
    not_before = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    _store_certificate(seed, _self_signed(seed.domain, not_before, 90, 99))
    fetched: list[list[str]] = []

    def chains(ids: Any) -> dict[str, str]:
        from tasks.db.renewals import certificate_chains

        fetched.append(list(ids))
        return certificate_chains(ids)

    collector = CertificateCollector(chains=chains, clock=lambda: not_before.timestamp() + 3600)

    def samples() -> dict[tuple[str, str], float]:
        return {
            (sample.name, sample.labels.get("condition", "")): sample.value
            for family in collector.collect()
            for sample in family.samples
            if sample.labels["hostname"] == seed.domain
        }

    first = samples()
    not_after = not_before + 90 * DAY
    assert first == {
        ("certificate_expiration_timestamp_seconds", ""): not_after.timestamp(),
        ("certificate_renewal_timestamp_seconds", ""): (not_before + 60 * DAY).timestamp(),
        ("certificate_ready_status", "True"): 1.0,
        ("certificate_ready_status", "False"): 0.0,
        ("certificate_ready_status", "Unknown"): 0.0,
    }
    with engine_for(seed.url).begin() as connection:
        connection.execute(
            sa.update(acme_challenges)
            .where(acme_challenges.c.domain_id == seed.domain_id)
            .values(status="failed")
        )
    second = samples()
    assert second[("certificate_ready_status", "False")] == 1.0
    assert second[("certificate_ready_status", "True")] == 0.0
    assert sum(ids.count(_certificate_id(seed)) for ids in fetched) == 1


def _certificate_id(seed: SeededDomain) -> str:
    row = _certificate(seed)
    assert row is not None
    return str(row.id)


def test_a_resumed_sweep_starts_no_call_twice(
    settings: Settings, acme_worker: WorkerProcess, domains: Seeder
) -> None:
    """The same sweep run again under its call key (a resume, or the day's key used twice):
    its send steps replay their run ids, so each due domain has exactly one renewal call,
    and the outcomes replay (the same result)."""
    seeds = [domains.add() for _ in range(2)]
    key = f"cert-renewal-test-{new_dns_label(8)}"

    with durable_call(key):
        first = _sweep()
    with durable_call(key):
        second = _sweep()

    assert second == first
    runs = asyncio.run(_runs_of(seeds))
    assert sorted(run.name for run in runs) == sorted(
        f"process-challenge-{seed.domain}" for seed in seeds
    )
    assert all(_challenge(seed) == ("verified", None) for seed in seeds)
