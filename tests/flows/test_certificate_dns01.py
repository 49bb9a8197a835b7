"""CertificateService (flows/certificate.py): DNS-01 issuance of a wildcard through the flow,
with the TXT record written to a real Route53 API (a moto server), published in DNS by a test
bridge (``tests.support.route53_bridge``: moto serves no DNS) into pebble-challtestsrv, where
pebble validates and the flow's propagation check (``UNKEY_DNS_NAMESERVERS``) looks.

Each test creates its own ``example-<random>.test`` hosted zone and seeds its own
``*.example-<random>.test`` custom domain; both are removed after.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import dns.flags
import dns.message
import dns.query
import dns.rdatatype
import pytest
from cryptography import x509
from pydantic import SecretStr

from flows.certificate import process_challenge
from tasks import route53
from tasks.db.certificates import challenge_failure
from tests.flows.helpers import fails_at_once
from tests.support.acme_servers import Challtestsrv, Pebble
from tests.support.certificate_seed import (
    SeededDomain,
    certificate_rows,
    challenge_row,
    seeded_domain,
)
from tests.support.moto_auth import moto_with_auth
from tests.support.route53_bridge import drop_hosted_zone, route53_bridge
from tests.support.settings import installed_settings
from worker.kernel.clock import new_dns_label
from worker.kernel.errors import RefusedError
from worker.settings import Settings, worker_settings

pytestmark = [pytest.mark.mysql, pytest.mark.usefixtures("fast_acme_polls")]

SECRET = "route53-secret-never-shown"


@dataclass(frozen=True)
class Zone:
    """A hosted zone on a Route53 API (``apex``), with the API's endpoint and a key it takes."""

    endpoint: str
    zone_id: str
    apex: str
    key_id: str = "test"
    secret: str = SECRET

    @property
    def challenge_name(self) -> str:
        """Where both ``apex``'s and ``*.apex``'s DNS-01 values live."""
        return f"_acme-challenge.{self.apex}"


def _route53(endpoint: str, key: str, secret: str) -> Any:
    return boto3.client(
        "route53",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
    )


@contextmanager
def _hosted_zone(endpoint: str, key: str = "test", secret: str = SECRET) -> Iterator[Zone]:
    """A fresh ``example-<random>.test`` zone; its records and the zone are deleted after."""
    client = _route53(endpoint, key, secret)
    apex = f"example-{new_dns_label(10)}.test"
    created = client.create_hosted_zone(Name=apex + ".", CallerReference=uuid.uuid4().hex)
    zone_id = str(created["HostedZone"]["Id"]).removeprefix("/hostedzone/")
    try:
        yield Zone(endpoint, zone_id, apex, key, secret)
    finally:
        drop_hosted_zone(client, zone_id)


def _dns01_settings(zone: Zone, pebble: Pebble, dns: Challtestsrv) -> Settings:
    """The session's settings with ACME on pebble and DNS-01 through ``zone``'s Route53."""
    return worker_settings().model_copy(
        update={
            "acme_enabled": True,
            "acme_directory_url": pebble.directory_url,
            "acme_ca_bundle": pebble.ca_bundle,
            "acme_email_domain": "example.test",
            "acme_route53_enabled": True,
            "acme_route53_access_key_id": zone.key_id,
            "acme_route53_secret_access_key": SecretStr(zone.secret),
            "acme_route53_endpoint_url": zone.endpoint,
            "acme_route53_hosted_zone_id": zone.zone_id,
            "dns_nameservers": [dns.dns_address],
        }
    )


@pytest.fixture
def zone(s3_endpoint: str) -> Iterator[Zone]:
    """A fresh hosted zone on the session's moto server (moto serves Route53 on that port)."""
    with _hosted_zone(s3_endpoint) as created:
        yield created


@pytest.fixture
def wildcard(control_db: str, zone: Zone) -> Iterator[SeededDomain]:
    """``*.<zone apex>`` with a ``waiting`` DNS-01 challenge; removed afterwards."""
    with seeded_domain(control_db, f"*.{zone.apex}", challenge_type="DNS-01") as seed:
        yield seed


def _txt_at(dns_server: Challtestsrv, name: str) -> list[str]:
    """The TXT values challtestsrv itself answers for ``name`` (recursion off)."""
    query = dns.message.make_query(name, "TXT")
    query.flags &= ~dns.flags.RD
    response = dns.query.udp(query, dns_server.dns_host, port=dns_server.dns_port, timeout=5)
    return [
        b"".join(rdata.strings).decode()
        for rrset in response.answer
        if rrset.rdtype == dns.rdatatype.TXT
        for rdata in rrset
    ]


async def _issue(seed: SeededDomain) -> dict[str, str]:
    return await process_challenge(workspace_id=seed.workspace_id, domain=seed.domain)


def test_wildcard_issuance_over_dns01_through_route53(
    control_db: str,
    pebble: Pebble,
    challtestsrv: Challtestsrv,
    zone: Zone,
    wildcard: SeededDomain,
) -> None:
    """DNS-01 issuance of `*.example-<random>.test` end to end: the TXT value is written to
    Route53 (published in challtestsrv only by the bridge, which pebble and the propagation
    check read), pebble validates it, the certificate is for exactly the wildcard and chains
    to pebble's root, the challenge is `verified`; afterwards the value is gone from Route53
    and, because it left Route53, from DNS too."""
    with (
        installed_settings(_dns01_settings(zone, pebble, challtestsrv)) as settings,
        route53_bridge(zone.endpoint, zone.zone_id, challtestsrv, secret=SECRET) as bridge,
    ):
        result = asyncio.run(_issue(wildcard))
        bridge.sync()  # the clean-up's DELETE mirrored, whatever the thread's timing
        published = list(bridge.published)
        cleared = list(bridge.cleared)
        in_route53 = route53.txt_values(zone.challenge_name, settings)
        in_dns = _txt_at(challtestsrv, zone.challenge_name)

    (row,) = certificate_rows(wildcard)
    assert result == {"certificate_id": row.id, "status": "success"}
    leaf, intermediate = x509.load_pem_x509_certificates(row.certificate.encode())[:2]
    root = x509.load_pem_x509_certificate(pebble.root_pem().encode())
    leaf.verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(root)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [wildcard.domain]

    challenge = challenge_row(wildcard)
    assert challenge.status == "verified"
    assert challenge.expires_at == int(leaf.not_valid_after_utc.timestamp() * 1000)

    assert [name for name, _ in published] == [zone.challenge_name], published
    assert in_route53 == [], "the TXT value must be removed from Route53 after issuance"
    assert cleared == [zone.challenge_name]
    assert in_dns == []


def test_refused_route53_credentials_fail_at_once_with_the_challenge_failed(
    control_db: str, pebble: Pebble, challtestsrv: Challtestsrv, tmp_path: Path
) -> None:
    """Route53 refuses the credentials (a moto server that verifies signatures, a wrong
    secret): the call fails at once (no step retried) with a `RefusedError` naming the
    settings, never the secret; the challenge is `failed` with that reason and no
    certificate is written."""
    apex = f"example-{new_dns_label(10)}.test"
    with moto_with_auth(tmp_path / "moto") as moto:
        # The zone id is never reached: moto checks the signature first.
        refused = Zone(moto.url, f"Z{new_dns_label(12).upper()}", apex, moto.key_id, SECRET)
        with (
            seeded_domain(control_db, f"*.{apex}", challenge_type="DNS-01") as seed,
            installed_settings(_dns01_settings(refused, pebble, challtestsrv)),
        ):
            error = fails_at_once(
                RefusedError, process_challenge, workspace_id=seed.workspace_id, domain=seed.domain
            )

            assert "(SignatureDoesNotMatch)" in str(error)
            assert "UNKEY_ACME_ROUTE53_SECRET_ACCESS_KEY" in str(error)
            assert SECRET not in str(error) and moto.secret not in str(error)
            assert challenge_row(seed).status == "failed"
            reason = challenge_failure(seed.domain_id)
            assert reason is not None and "Route53 refused the credentials" in reason
            assert SECRET not in reason
            assert certificate_rows(seed) == []
