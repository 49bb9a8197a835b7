"""The ACME account, issuance primitives and error classifier (tasks.acme), against a real
pebble CA, pebble-challtestsrv as its DNS, the real ``ctrl-worker acme-responder`` and MariaDB.

Each MariaDB test gets its own fresh database (``acme_users`` holds one global account, so a
test that proves "created once" must start from none); a stand-in HTTP server only plays the
429 rate limit pebble cannot produce.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import josepy as jose
import pytest
import requests
import sqlalchemy as sa
from acme import client as acme_client
from acme import errors as acme_errors
from acme import messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pytest_httpserver import HTTPServer

from blocks.vault import vault_from_settings
from tasks.acme import account as account_module
from tasks.acme.account import ACCOUNT_KEYRING, AcmeAccount, ensure_account
from tasks.acme.client import (
    answer,
    build_client,
    dns01_challenge,
    finalize,
    http01_challenge,
    new_order,
    new_private_key_and_csr,
    wait_valid,
)
from tasks.acme.errors import (
    AcmeRefused,
    AuthorizationInvalid,
    RateLimited,
    classify,
    parse_retry_after,
)
from tasks.db.acme import set_challenge_pending
from tasks.db.engine import engine_for
from tasks.db.schema import acme_challenges, acme_users, init_schema
from tests.support.acme_servers import Challtestsrv, Pebble, start_acme_responder
from tests.support.fixtures import PrefectApi
from tests.support.processes import ReadyProcess
from worker.kernel.clock import new_id, now_ms
from worker.kernel.errors import RetryableError, TerminalError
from worker.settings import Settings, use_settings

DOMAIN = "app.example.test"


@pytest.fixture
def acme_settings(
    empty_mysql_url: str, prefect_api: PrefectApi, pebble: Pebble
) -> Iterator[Settings]:
    """Settings on a fresh control-plane database and the session's pebble, installed."""
    init_schema(empty_mysql_url)
    settings = Settings(
        _env_file=None,
        database_primary=empty_mysql_url,
        state_dir=prefect_api.state_dir,
        acme_enabled=True,
        acme_directory_url=pebble.directory_url,
        acme_ca_bundle=pebble.ca_bundle,
        acme_email_domain="example.test",
    )
    use_settings(settings)
    yield settings


@pytest.fixture
def responder(acme_settings: Settings, pebble: Pebble, tmp_path: Path) -> Iterator[ReadyProcess]:
    """``ctrl-worker acme-responder`` on the fresh database, where pebble validates HTTP-01."""
    process = start_acme_responder(
        tmp_path / "responder", acme_settings.database_url(), pebble.http01_port
    )
    try:
        yield process
    finally:
        process.stop(timeout=10)


@pytest.fixture(autouse=True)
def _fast_acme_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The library's finalization poll sleeps 1 s between polls; pebble answers at once."""
    real_sleep = acme_client.time.sleep
    monkeypatch.setattr(acme_client.time, "sleep", lambda seconds: real_sleep(min(seconds, 0.05)))


def _waiting_challenge(url: str, domain: str) -> str:
    """Insert a ``waiting`` HTTP-01 challenge row for ``domain``; return its domain id."""
    domain_id = new_id("cd")
    with engine_for(url).begin() as connection:
        connection.execute(
            sa.insert(acme_challenges).values(
                domain_id=domain_id,
                workspace_id="ws_acme_test",
                token="",
                challenge_type="HTTP-01",
                authorization="",
                status="waiting",
                expires_at=0,
                created_at=now_ms(),
            )
        )
    return domain_id


def _acme_rows(url: str) -> list[sa.Row]:
    with engine_for(url).connect() as connection:
        return list(connection.execute(sa.select(acme_users)))


def _served(pebble: Pebble, token: str) -> httpx.Response:
    return httpx.get(
        f"http://127.0.0.1:{pebble.http01_port}/.well-known/acme-challenge/{token}", timeout=5
    )


def test_http01_issuance_end_to_end_chains_to_the_ca_root(
    acme_settings: Settings, pebble: Pebble, responder: ReadyProcess
) -> None:
    """Guarantee: the primitives issue a real certificate over HTTP-01: the token stored in
    acme_challenges is what the responder serves and the CA validates, and the full chain
    returned is leaf-then-intermediate for exactly the domain, chaining to the CA's root."""
    account = asyncio.run(ensure_account(acme_settings))
    client = account.client(acme_settings)
    domain_id = _waiting_challenge(acme_settings.database_url(), DOMAIN)
    key_pem, csr_pem = new_private_key_and_csr(DOMAIN)

    order = new_order(client, DOMAIN, csr_pem)
    token, key_authorization, challenge = http01_challenge(order, account.key)
    assert set_challenge_pending(domain_id, token, key_authorization)
    served = _served(pebble, token)
    assert (served.status_code, served.text) == (200, key_authorization)
    assert served.headers["content-type"].startswith("text/plain")

    answer(client, challenge)
    order = wait_valid(client, order, timeout=30, poll_seconds=0.05)
    chain = x509.load_pem_x509_certificates(finalize(client, order, timeout=30).encode())

    leaf, intermediate = chain[0], chain[1]
    root = x509.load_pem_x509_certificate(pebble.root_pem().encode())
    leaf.verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(root)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [DOMAIN]
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    assert leaf.public_key() == key.public_key()


def test_ten_concurrent_first_uses_create_one_account_and_one_registration(
    acme_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guarantee: the global account is created once even when 10 first uses race, each on
    its own event loop and thread (10 contenders for the Prefect-held key lock, as 10
    processes would be): one acme_users row, one registration at the CA, one account."""
    registrations: list[str] = []
    real_new_account = acme_client.ClientV2.new_account

    def counting_new_account(
        self: acme_client.ClientV2, new_account: messages.NewRegistration
    ) -> messages.RegistrationResource:
        registrations.append(new_account.contact[0] if new_account.contact else "")
        return real_new_account(self, new_account)

    monkeypatch.setattr(acme_client.ClientV2, "new_account", counting_new_account)
    results: list[AcmeAccount] = []
    errors: list[BaseException] = []
    start = threading.Barrier(10)

    def first_use() -> None:
        start.wait()
        try:
            results.append(asyncio.run(ensure_account(acme_settings)))
        except BaseException as exc:
            errors.append(exc)

    # Each thread runs in a copy of this context: Prefect's test settings live in contextvars.
    threads = [
        threading.Thread(target=contextvars.copy_context().run, args=(first_use,))
        for _ in range(10)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert errors == []
    rows = _acme_rows(acme_settings.database_url())
    assert len(rows) == 1 and len(registrations) == 1
    assert {(a.id, a.registration_uri) for a in results} == {(rows[0].id, rows[0].registration_uri)}
    assert rows[0].id.startswith("acme_") and rows[0].workspace_id == "acme"


def test_account_key_is_stored_encrypted_with_the_acme_keyring(acme_settings: Settings) -> None:
    """Guarantee: the account key is persisted only as vault ciphertext of keyring `acme`:
    no PEM in the row, it decrypts to the key the account signs with, and a second use
    loads that same key and URL without registering again."""
    account = asyncio.run(ensure_account(acme_settings))
    (row,) = _acme_rows(acme_settings.database_url())
    assert "PRIVATE KEY" not in row.encrypted_key and "BEGIN" not in row.encrypted_key
    pem = vault_from_settings(acme_settings).decrypt(ACCOUNT_KEYRING, row.encrypted_key)
    assert pem.startswith("-----BEGIN EC PRIVATE KEY-----")
    stored = serialization.load_pem_private_key(pem.encode(), password=None)
    assert _public_der(stored) == _public_der(account.key.key._wrapped)
    assert "PRIVATE" not in repr(account)

    again = asyncio.run(ensure_account(acme_settings))
    assert (again.id, again.registration_uri) == (account.id, account.registration_uri)
    assert len(_acme_rows(acme_settings.database_url())) == 1


def test_row_left_unregistered_by_a_crash_is_registered_on_next_use(
    acme_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guarantee: a crash between inserting the account row and registering it never makes a
    second account: the next use registers the stored key and records its URL."""

    def crash(*_args: object) -> str:
        raise RuntimeError("killed before registration")

    with monkeypatch.context() as patched, pytest.raises(RuntimeError):
        patched.setattr(account_module, "_register", crash)
        asyncio.run(ensure_account(acme_settings))
    (row,) = _acme_rows(acme_settings.database_url())
    assert row.registration_uri is None

    account = asyncio.run(ensure_account(acme_settings))
    (row,) = _acme_rows(acme_settings.database_url())
    assert account.id == row.id and row.registration_uri == account.registration_uri


def test_dns01_wildcard_issuance_with_the_txt_record_published(
    acme_settings: Settings, pebble: Pebble, challtestsrv: Challtestsrv
) -> None:
    """Guarantee: dns01_challenge names the TXT record and value the CA checks: published in
    the CA's DNS, the wildcard's authorization becomes valid and the certificate's SAN is
    the wildcard."""
    domain = "*.wild.example.test"
    account = asyncio.run(ensure_account(acme_settings))
    client = account.client(acme_settings)
    order = new_order(client, domain, new_private_key_and_csr(domain)[1])
    token, record_name, txt_value, challenge = dns01_challenge(order, account.key)
    assert record_name == "_acme-challenge.wild.example.test" and token
    challtestsrv.add_txt(record_name, txt_value)
    try:
        answer(client, challenge)
        order = wait_valid(client, order, timeout=30, poll_seconds=0.05)
        leaf = x509.load_pem_x509_certificates(finalize(client, order, timeout=30).encode())[0]
    finally:
        challtestsrv.clear_txt(record_name)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [domain]


@pytest.mark.parametrize("domain", ["127.0.0.1", "*.invalid_"])
def test_classify_a_domain_the_ca_rejects_is_terminal(acme_settings: Settings, domain: str) -> None:
    """Guarantee: an order the CA refuses for its identifier (an IP as a DNS name, an
    illegal character) is a terminal error naming the CA's problem, not retried."""
    account = asyncio.run(ensure_account(acme_settings))
    client = account.client(acme_settings)
    with pytest.raises(Exception) as raised:
        new_order(client, domain, new_private_key_and_csr("x.example.test")[1])
    error = classify(raised.value)
    assert isinstance(error, AcmeRefused) and isinstance(error, TerminalError)
    assert error.problem_type == "malformed" and "malformed" in str(error)


def test_authorization_the_ca_declares_invalid_carries_its_detail(
    acme_settings: Settings, pebble: Pebble, responder: ReadyProcess
) -> None:
    """Guarantee: when the CA cannot validate (nothing stored, so the responder answers 404),
    wait_valid raises the terminal AuthorizationInvalid carrying the CA's problem detail."""
    account = asyncio.run(ensure_account(acme_settings))
    client = account.client(acme_settings)
    order = new_order(client, "unserved.example.test", new_private_key_and_csr(DOMAIN)[1])
    token, _, challenge = http01_challenge(order, account.key)
    assert _served(pebble, token).status_code == 404
    answer(client, challenge)
    with pytest.raises(AuthorizationInvalid) as raised:
        wait_valid(client, order, timeout=30, poll_seconds=0.05)
    assert raised.value.identifier == "unserved.example.test"
    assert "unauthorized" in raised.value.detail and "404" in raised.value.detail
    assert classify(raised.value) is raised.value
    # The library's own poll raises ValidationError for the same state: same classification.
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=10)
    with pytest.raises(acme_errors.ValidationError) as library:
        client.poll_authorizations(order, deadline)
    from_library = classify(library.value)
    assert isinstance(from_library, AuthorizationInvalid)
    assert from_library.detail == raised.value.detail


def test_classify_timeouts_and_unreachable_ca_are_retryable() -> None:
    """Guarantee: waiting too long and not reaching the CA are retryable, and the message
    names the kind of failure without the request (no URL, no body)."""
    cases = [
        acme_errors.TimeoutError(),
        requests.exceptions.ConnectTimeout("https://ca.example/acme/new-order?x=secret"),
        requests.exceptions.ConnectionError("https://ca.example/acme/new-order?x=secret"),
    ]
    for exc in cases:
        error = classify(exc)
        assert type(error) is RetryableError, exc
        assert "secret" not in str(error)


def _settings_for(httpserver: HTTPServer) -> Settings:
    return Settings(_env_file=None, acme_directory_url=httpserver.url_for("/dir"))


def test_classify_rate_limit_with_retry_after_seconds(httpserver: HTTPServer) -> None:
    """Guarantee: a 429 `rateLimited` problem becomes RateLimited (retryable) with the
    Retry-After seconds of the answer, which the library alone would drop."""
    httpserver.expect_request("/dir").respond_with_json(
        {"type": "urn:ietf:params:acme:error:rateLimited", "detail": "too many orders"},
        status=429,
        headers={"Retry-After": "120", "Content-Type": "application/problem+json"},
    )
    with pytest.raises(Exception) as raised:
        build_client(_settings_for(httpserver), _throwaway_key())
    error = classify(raised.value)
    assert isinstance(error, RateLimited) and isinstance(error, RetryableError)
    assert error.retry_after == 120 and "too many orders" in str(error)


def test_classify_rate_limit_with_retry_after_date_and_plain_5xx(httpserver: HTTPServer) -> None:
    """Guarantee: Retry-After as an HTTP date is honoured, and a 5xx answer without a
    problem document is retryable."""
    assert parse_retry_after("Wed, 02 Dec 2026 06:02:00 GMT", now=_at("2026-12-02T06:00:00")) == 120
    assert parse_retry_after("soon") is None
    httpserver.expect_request("/dir").respond_with_data("upstream down", status=503)
    with pytest.raises(Exception) as raised:
        build_client(_settings_for(httpserver), _throwaway_key())
    error = classify(raised.value)
    assert type(error) is RetryableError and "503" in str(error)


def _at(iso: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(iso).replace(tzinfo=datetime.UTC)


def _throwaway_key() -> jose.JWKEC:
    return jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))


def _public_der(key: object) -> bytes:
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
