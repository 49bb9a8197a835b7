"""CertificateService (flows/certificate.py): HTTP-01 issuance and renewal through the flow
against a real pebble CA (challtestsrv as its DNS), the real ``ctrl-worker acme-responder``,
MariaDB and the session's Prefect server; an authorization pebble declares invalid; refusals.

Each test seeds its own ``app-<random>.example.test`` custom domain with a ``waiting``
challenge and removes its rows after.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pytest_httpserver import HTTPServer

import flows.certificate as certificate_flow
from blocks.vault import vault_from_settings
from flows.certificate import process_challenge, rate_limit_wait
from tasks.acme.account import ensure_account
from tasks.acme.errors import AuthorizationInvalid
from tasks.db.certificates import challenge_failure
from tasks.db.engine import engine_for
from tasks.db.schema import acme_challenge_failures, certificates, custom_domains
from tests.flows.helpers import fails_at_once
from tests.support.acme_servers import Pebble, start_acme_responder
from tests.support.certificate_seed import (
    SeededDomain,
    certificate_rows,
    challenge_row,
    seeded_domain,
)
from tests.support.fixtures import PrefectApi
from tests.support.processes import ReadyProcess
from tests.support.settings import changed_settings
from worker.kernel.clock import new_dns_label
from worker.kernel.errors import ConflictError, InvalidParameterError, RefusedError
from worker.settings import Settings, use_settings

pytestmark = [pytest.mark.mysql, pytest.mark.usefixtures("fast_acme_polls")]

LONG_NAME = ("a" * 63 + ".") * 3 + "a" * 57 + ".test"
assert len(LONG_NAME) == 254


@pytest.fixture
def acme_settings(control_db: str, pebble: Pebble) -> Iterator[Settings]:
    """The session's settings with ACME on pebble (the local vault), installed for the test."""
    with changed_settings(**pebble.settings_update()) as settings:
        yield settings


@pytest.fixture
def responder(control_db: str, pebble: Pebble, tmp_path: Path) -> Iterator[ReadyProcess]:
    """``ctrl-worker acme-responder`` on the session's database, where pebble validates."""
    process = start_acme_responder(tmp_path / "responder", control_db, pebble.http01_port)
    try:
        yield process
    finally:
        process.stop(timeout=10)


@pytest.fixture
def seeded(control_db: str) -> Iterator[SeededDomain]:
    """A fresh custom domain and its ``waiting`` challenge; removed afterwards."""
    with seeded_domain(control_db, f"app-{new_dns_label(10)}.example.test") as seed:
        yield seed


def _certificate(seed: SeededDomain) -> sa.Row | None:
    rows = certificate_rows(seed)
    return rows[0] if rows else None


def _issue(seed: SeededDomain) -> dict[str, str]:
    return asyncio.run(process_challenge(workspace_id=seed.workspace_id, domain=seed.domain))


def _key_lines(pem: str) -> list[str]:
    return [line for line in pem.splitlines() if line and not line.startswith("-----")]


def _found_in_files(root: Path, needles: list[str]) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if any(needle.encode() in data for needle in needles):
                found.append(path)
    return found


def test_http01_issuance_through_the_flow(
    acme_settings: Settings,
    pebble: Pebble,
    responder: ReadyProcess,
    seeded: SeededDomain,
    prefect_api: PrefectApi,
) -> None:
    """HTTP-01 issuance end to end: the certificate row holds the full chain to pebble's root
    for exactly the domain; its private key decrypts with the workspace keyring and matches
    the leaf; the challenge is `verified` until NotAfter; the plaintext key is nowhere in the
    DB rows or the result storage files."""
    result = _issue(seeded)

    row = _certificate(seeded)
    assert row is not None
    assert result == {"certificate_id": row.id, "status": "success"}
    assert row.workspace_id == seeded.workspace_id
    leaf, intermediate = x509.load_pem_x509_certificates(row.certificate.encode())[:2]
    root = x509.load_pem_x509_certificate(pebble.root_pem().encode())
    leaf.verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(root)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [seeded.domain]

    assert "PRIVATE KEY" not in row.encrypted_private_key
    vault = vault_from_settings(acme_settings)
    key_pem = vault.decrypt(seeded.workspace_id, row.encrypted_private_key)
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    assert leaf.public_key() == key.public_key()

    challenge = challenge_row(seeded)
    assert challenge.status == "verified" and challenge.token
    assert challenge.expires_at == int(leaf.not_valid_after_utc.timestamp() * 1000)

    lines = _key_lines(key_pem)
    assert not any(line in str(tuple(row)) + str(tuple(challenge)) for line in lines)
    assert _found_in_files(prefect_api.state_dir / "results", lines) == []


def test_renewal_keeps_the_certificate_id_and_replaces_the_pem(
    acme_settings: Settings, responder: ReadyProcess, seeded: SeededDomain
) -> None:
    """A second call for a `verified` domain (a renewal) issues again: the same certificate
    id, a new chain and a new key, the challenge still `verified`."""
    first = _issue(seeded)
    before = _certificate(seeded)
    second = _issue(seeded)
    after = _certificate(seeded)

    assert before is not None and after is not None
    assert second == first and after.id == before.id
    assert after.certificate != before.certificate
    assert after.encrypted_private_key != before.encrypted_private_key
    assert challenge_row(seeded).status == "verified"


def test_invalid_authorization_fails_at_once_with_the_ca_detail(
    acme_settings: Settings, seeded: SeededDomain
) -> None:
    """Nothing answers pebble's HTTP-01 request: the call fails at once (no step retried)
    with pebble's problem detail, the challenge is `failed` with that reason, and no
    certificate is written."""
    error = fails_at_once(
        AuthorizationInvalid,
        process_challenge,
        workspace_id=seeded.workspace_id,
        domain=seeded.domain,
    )

    assert error.identifier == seeded.domain and error.detail
    assert challenge_row(seeded).status == "failed"
    reason = challenge_failure(seeded.domain_id)
    assert reason is not None and error.detail in reason
    assert _certificate(seeded) is None


def _counts(url: str) -> tuple[int, ...]:
    with engine_for(url).connect() as connection:
        return tuple(
            connection.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            for table in (certificates, acme_challenge_failures, custom_domains)
        )


@pytest.mark.parametrize(
    ("workspace_id", "domain", "parameter"),
    [
        ("", "app.example.test", "workspace_id"),
        ("ws_1", "", "domain"),
        ("ws_1", "a..b", "domain"),
        ("ws_1", LONG_NAME, "domain"),
        ("ws_1", "app.*.example.test", "domain"),
        ("ws_1", "*.*.example.test", "domain"),
        ("ws_1", "app example.test", "domain"),
        (" ", "app.example.test", "workspace_id"),
        ("ws_1", "bücher.example.test", "domain"),  # non-ASCII: only the xn-- form
        ("ws_1", "127.0.0.1", "domain"),
        ("ws_1", "::1", "domain"),
        ("ws_1", "*.127.0.0.1", "domain"),
        ("ws_1", "app.example.test.", "domain"),
        ("ws_1", "*.app.example.test.", "domain"),
        ("ws_1", "*", "domain"),
        ("ws_1", "*.test", "domain"),  # a wildcard over a whole TLD
        ("ws_1", "*app.example.test", "domain"),
        ("ws_1", "-app.example.test", "domain"),
        ("ws_1", "a" * 64 + ".example.test", "domain"),
        ("ws_1", "app.example.test:443", "domain"),
        ("ws_1", "localhost", "domain"),
    ],
)
def test_bad_parameters_fail_at_once_with_nothing_written(
    acme_settings: Settings, seeded: SeededDomain, workspace_id: str, domain: str, parameter: str
) -> None:
    """Empty or blank ids, malformed names, a 254-character name or a 64-character label,
    non-ASCII names, IP addresses, a trailing dot, a port, a one-label name and a wildcard
    that is not exactly the first label (or covers a TLD): `InvalidParameterError` naming
    the parameter, no step retried, nothing written."""
    before = _counts(seeded.url)
    error = fails_at_once(
        InvalidParameterError, process_challenge, workspace_id=workspace_id, domain=domain
    )
    assert error.parameter == parameter
    assert _counts(seeded.url) == before
    assert challenge_row(seeded).status == "waiting"


def test_another_workspaces_domain_is_refused_and_left_alone(
    acme_settings: Settings, seeded: SeededDomain
) -> None:
    """A domain of another workspace: refused at once (terminal), its challenge untouched."""
    fails_at_once(ConflictError, process_challenge, workspace_id="ws_other", domain=seeded.domain)
    assert challenge_row(seeded).status == "waiting"
    assert challenge_failure(seeded.domain_id) is None


def test_rate_limit_waits_are_clamped() -> None:
    """Retry-After + 1 min, clamped to 1 min - 2 h."""
    assert rate_limit_wait(0) == 60
    assert rate_limit_wait(30) == 90
    assert rate_limit_wait(10_000) == 7200


def _rate_limiting_ca(httpserver: HTTPServer) -> None:
    """A stand-in ACME directory whose newOrder always answers 429 with Retry-After: 1."""
    httpserver.expect_request("/dir").respond_with_json(
        {
            name: httpserver.url_for(f"/{name}")
            for name in ("newNonce", "newAccount", "newOrder", "revokeCert", "keyChange")
        }
    )
    httpserver.expect_request("/newNonce").respond_with_data(
        "", headers={"Replay-Nonce": "bm9uY2U", "Cache-Control": "no-store"}
    )
    httpserver.expect_request("/newOrder", method="POST").respond_with_json(
        {"type": "urn:ietf:params:acme:error:rateLimited", "detail": "too many new orders"},
        status=429,
        headers={"Retry-After": "1", "Content-Type": "application/problem+json"},
    )


def test_rate_limits_are_waited_out_then_the_call_fails_with_the_ca_message(
    acme_settings: Settings,
    seeded: SeededDomain,
    httpserver: HTTPServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """newOrder answers 429 every time: the call waits durably (Retry-After, here without the
    1-minute margin) after each of the first three attempts, each attempt a step of its own,
    then fails (no step retried) with the CA's message, leaving the challenge `failed`."""
    asyncio.run(ensure_account(acme_settings))  # the account exists (registered at pebble)
    _rate_limiting_ca(httpserver)
    use_settings(
        acme_settings.model_copy(update={"acme_directory_url": httpserver.url_for("/dir")})
    )
    monkeypatch.setattr(certificate_flow, "RATE_LIMIT_MARGIN", 0.0)
    monkeypatch.setattr(certificate_flow, "MIN_RATE_LIMIT_WAIT", 0.0)
    sleeps: list[tuple[float, str]] = []
    real_sleep = certificate_flow.durable_sleep

    async def recorded_sleep(seconds: float, *, name: str = "sleep") -> None:
        sleeps.append((seconds, name))
        await real_sleep(seconds, name=name)

    monkeypatch.setattr(certificate_flow, "durable_sleep", recorded_sleep)

    error = fails_at_once(
        RefusedError, process_challenge, workspace_id=seeded.workspace_id, domain=seeded.domain
    )

    assert "too many new orders" in str(error)
    assert sleeps == [(1.0, "rate-limit-1"), (1.0, "rate-limit-2"), (1.0, "rate-limit-3")]
    orders = [request for request, _ in httpserver.log if request.path == "/newOrder"]
    assert len(orders) == 4
    assert challenge_row(seeded).status == "failed"
    reason = challenge_failure(seeded.domain_id)
    assert reason is not None and "too many new orders" in reason
