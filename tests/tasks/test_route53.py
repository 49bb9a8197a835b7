"""DNS-01 TXT records through Route53, against a real moto server (Route53's HTTP API).

The session's moto server (``s3_endpoint``: moto serves every AWS API on one port) checks no
credentials, so the credential tests start a second moto server in its auth mode
(``INITIAL_NO_AUTH_ACTION_COUNT``: the first calls create an IAM user and key without
authentication, every later call is verified), where a wrong secret really is
``SignatureDoesNotMatch`` and an unknown key ``InvalidClientTokenId``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from tasks import route53
from tests.support.moto_auth import AuthMoto, moto_with_auth
from tests.support.route53_bridge import drop_hosted_zone
from worker.kernel.errors import NotFoundError, RefusedError, RetryableError, TerminalError
from worker.local_server import free_port
from worker.settings import Settings

SECRET = "route53-secret-never-shown"


def _settings(endpoint: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "acme_route53_enabled": True,
        "acme_route53_access_key_id": "test",
        "acme_route53_secret_access_key": SECRET,
        "acme_route53_endpoint_url": endpoint,
        **overrides,
    }
    return Settings(_env_file=None, **values)


def _boto(endpoint: str, service: str = "route53", key: str = "test", secret: str = "test") -> Any:
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
    )


@pytest.fixture
def zones(s3_endpoint: str) -> Iterator[Any]:
    """Create hosted zones on the session's moto server; they are deleted after the test."""
    client = _boto(s3_endpoint)
    created: list[str] = []

    def create(name: str) -> str:
        zone = client.create_hosted_zone(Name=name + ".", CallerReference=uuid.uuid4().hex)
        created.append(zone["HostedZone"]["Id"])
        return str(zone["HostedZone"]["Id"]).removeprefix("/hostedzone/")

    yield create
    for zone_id in created:
        drop_hosted_zone(client, zone_id)


@pytest.fixture
def apex() -> str:
    """A fresh apex name of this test."""
    return f"z{uuid.uuid4().hex[:10]}.test"


def test_upsert_and_delete_are_idempotent(s3_endpoint: str, zones: Any, apex: str) -> None:
    """Adding a present value and removing an absent one change nothing and succeed; the last
    value's removal deletes the record set."""
    zones(apex)
    settings = _settings(s3_endpoint)
    fqdn = f"_acme-challenge.{apex}"
    assert route53.upsert_txt(fqdn, "value-1", settings=settings) is True
    assert route53.upsert_txt(fqdn, "value-1", settings=settings) is False
    assert route53.txt_values(fqdn, settings) == ["value-1"]
    assert route53.delete_txt(fqdn, "value-1", settings=settings) is True
    assert route53.delete_txt(fqdn, "value-1", settings=settings) is False
    assert route53.txt_values(fqdn, settings) == []


def test_two_values_on_one_name_keep_each_other(s3_endpoint: str, zones: Any, apex: str) -> None:
    """A wildcard's and its apex's values live side by side at one name: adding one keeps the
    other, removing one keeps the other, and the TTL is the challenge TTL."""
    zone_id = zones(apex)
    settings = _settings(s3_endpoint)
    fqdn = f"_acme-challenge.{apex}"
    route53.upsert_txt(fqdn, "for-wildcard", settings=settings)
    route53.upsert_txt(fqdn, "for-apex", settings=settings)
    assert sorted(route53.txt_values(fqdn, settings)) == ["for-apex", "for-wildcard"]
    records = _boto(s3_endpoint).list_resource_record_sets(HostedZoneId=zone_id)
    txt = [r for r in records["ResourceRecordSets"] if r["Type"] == "TXT"]
    assert len(txt) == 1 and txt[0]["TTL"] == route53.CHALLENGE_TTL
    assert sorted(r["Value"] for r in txt[0]["ResourceRecords"]) == ['"for-apex"', '"for-wildcard"']
    route53.delete_txt(fqdn, "for-wildcard", settings=settings)
    assert route53.txt_values(fqdn, settings) == ["for-apex"]


def test_the_longest_matching_zone_holds_the_record(
    s3_endpoint: str, zones: Any, apex: str
) -> None:
    """Without a configured zone id, the zone is the longest one whose name is a suffix of the
    domain at a label boundary (a wildcard's ``*.`` ignored); a configured id wins."""
    parent = zones(apex)
    child = zones(f"sub.{apex}")
    settings = _settings(s3_endpoint)
    assert route53.find_hosted_zone(f"*.sub.{apex}", settings) == child
    assert route53.find_hosted_zone(f"_acme-challenge.a.sub.{apex}", settings) == child
    assert route53.find_hosted_zone(f"other.{apex}", settings) == parent
    assert route53.find_hosted_zone(f"xsub.{apex}", settings) == parent
    configured = _settings(s3_endpoint, acme_route53_hosted_zone_id=f"/hostedzone/{parent}")
    assert route53.find_hosted_zone(f"a.sub.{apex}", configured) == parent


def test_a_domain_without_a_zone_is_not_found(s3_endpoint: str, apex: str) -> None:
    """A domain no zone holds is a NotFoundError (terminal) naming the domain."""
    with pytest.raises(NotFoundError, match=f"no Route53 hosted zone holds 'a.{apex}'"):
        route53.find_hosted_zone(f"a.{apex}", _settings(s3_endpoint))


def test_a_missing_configured_zone_is_terminal(s3_endpoint: str, apex: str) -> None:
    """A configured zone id Route53 does not know is a NotFoundError (moto's real
    NoSuchHostedZone) naming the setting, without the secret."""
    settings = _settings(s3_endpoint, acme_route53_hosted_zone_id="ZNOSUCHZONE1")
    with pytest.raises(NotFoundError) as caught:
        route53.upsert_txt(f"_acme-challenge.{apex}", "v", settings=settings)
    assert "UNKEY_ACME_ROUTE53_HOSTED_ZONE_ID" in str(caught.value)
    assert SECRET not in str(caught.value)
    assert caught.value.__context__ is None and caught.value.__cause__ is None


def test_an_unreachable_endpoint_is_retryable(apex: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No server at the endpoint is a RetryableError (a network failure)."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries: not needed here
    settings = _settings(f"http://127.0.0.1:{free_port()}", acme_route53_hosted_zone_id="Z1")
    with pytest.raises(RetryableError, match="Route53 unreachable"):
        route53.upsert_txt(f"_acme-challenge.{apex}", "v", settings=settings)


@pytest.fixture(scope="module")
def moto_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthMoto]:
    """A moto server that verifies credentials, and a real IAM user's key id and secret."""
    with moto_with_auth(tmp_path_factory.mktemp("moto-auth")) as server:
        yield server


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("unknown key", "InvalidClientTokenId"),
        ("wrong secret", "SignatureDoesNotMatch"),
    ],
)
def test_refused_credentials_are_terminal_without_the_secret(
    moto_auth: AuthMoto, case: str, code: str
) -> None:
    """Credentials Route53 refuses are a terminal RefusedError naming the settings and the
    code, never the secret nor AWS's text, with no chained botocore exception."""
    url, key_id, real_secret = moto_auth.url, moto_auth.key_id, moto_auth.secret
    key, secret = {
        "unknown key": ("AKIAUNKNOWN000000000", SECRET),
        "wrong secret": (key_id, SECRET),
    }[case]
    settings = _settings(url, acme_route53_access_key_id=key, acme_route53_secret_access_key=secret)
    with pytest.raises(RefusedError) as caught:
        route53.find_hosted_zone("example.test", settings)
    message = str(caught.value)
    assert isinstance(caught.value, TerminalError)
    assert f"({code})" in message
    assert "UNKEY_ACME_ROUTE53_ACCESS_KEY_ID / UNKEY_ACME_ROUTE53_SECRET_ACCESS_KEY" in message
    assert secret not in message and real_secret not in message
    assert caught.value.__context__ is None and caught.value.__cause__ is None
