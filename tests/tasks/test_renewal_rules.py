"""The renewal sweep's pure rules (tasks/acme/renewal.py): when a certificate is due, the
ARI certificate identifier, and the backoff of a failed challenge."""

from __future__ import annotations

import base64
import datetime

import pytest
from acme import client as acme_client
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tasks.acme.renewal import (
    Leaf,
    ari_certificate_id,
    failure_backoff_ms,
    is_due,
    lifetime_renewal_at,
    parse_leaf,
    retry_at_ms,
)

HOUR_MS = 3_600_000
UTC = datetime.UTC
T0 = datetime.datetime(2026, 1, 1, tzinfo=UTC)


def _certificate(serial: int, *, with_aki: bool = True) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rules.example.test")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(T0)
        .not_valid_after(T0 + datetime.timedelta(days=90))
    )
    if with_aki:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
    return builder.sign(key, hashes.SHA256())


LEAF_90_DAYS = Leaf(T0, T0 + datetime.timedelta(days=90), "aki.serial")


def test_without_ari_due_when_a_third_of_the_lifetime_remains() -> None:
    """A 90-day certificate is due from day 60 on (30 days = a third left), not before."""
    assert lifetime_renewal_at(LEAF_90_DAYS) == T0 + datetime.timedelta(days=60)
    assert not is_due(LEAF_90_DAYS, T0 + datetime.timedelta(days=59, hours=23))
    assert is_due(LEAF_90_DAYS, T0 + datetime.timedelta(days=60))
    assert is_due(LEAF_90_DAYS, T0 + datetime.timedelta(days=100))  # expired: due too


def test_ari_window_replaces_the_lifetime_rule() -> None:
    """With an ARI window, due from its start on, whatever the lifetime rule says."""
    early = T0 + datetime.timedelta(days=10)
    assert is_due(LEAF_90_DAYS, early, ari_window_start=early - datetime.timedelta(seconds=1))
    late = T0 + datetime.timedelta(days=70)
    assert not is_due(LEAF_90_DAYS, late, ari_window_start=late + datetime.timedelta(days=1))


def test_days_before_expiry_also_makes_due() -> None:
    """An operator's ``days_before_expiry`` makes due what expires within that many days,
    inside or outside the ARI window."""
    at = T0 + datetime.timedelta(days=50)  # 40 days left, not due by lifetime
    assert not is_due(LEAF_90_DAYS, at, days_before_expiry=39)
    assert is_due(LEAF_90_DAYS, at, days_before_expiry=40)
    future_window = at + datetime.timedelta(days=5)
    assert is_due(LEAF_90_DAYS, at, ari_window_start=future_window, days_before_expiry=45)


def test_failed_challenge_backoff_doubles_from_one_hour_to_a_day() -> None:
    """1 h after the first failure, doubling per consecutive failure, capped at 24 h."""
    assert [failure_backoff_ms(n) // HOUR_MS for n in range(1, 8)] == [1, 2, 4, 8, 16, 24, 24]
    assert failure_backoff_ms(0) == HOUR_MS  # a row without a count is one failure
    assert failure_backoff_ms(10_000) == 24 * HOUR_MS
    assert retry_at_ms(1_000, 3) == 1_000 + 4 * HOUR_MS


@pytest.mark.parametrize("serial", [1, 127, 128, 255, 256, 0x87654321, 2**159 - 1])
def test_ari_identifier_matches_the_acme_library(serial: int) -> None:
    """The RFC 9773 identifier is base64url(AKI) "." base64url(DER serial), the same as the
    acme library builds for its own ARI GET (including serials needing a leading zero)."""
    certificate = _certificate(serial)
    ours = ari_certificate_id(certificate)
    assert ours == acme_client._renewal_info_path_component(certificate)
    assert ours is not None
    encoded_aki, encoded_serial = ours.split(".")
    key_id = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert _decode(encoded_aki) == key_id.value.key_identifier
    assert int.from_bytes(_decode(encoded_serial), "big", signed=True) == serial


def _decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_leaf_without_aki_has_no_ari_identifier() -> None:
    """No authority key identifier: no ARI id (the lifetime rule applies)."""
    assert ari_certificate_id(_certificate(5, with_aki=False)) is None


def test_parse_leaf_reads_the_first_certificate_of_the_chain() -> None:
    """The leaf is the chain's first certificate: its validity and ARI id."""
    leaf_cert, other = _certificate(11), _certificate(12)
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf_cert, other))
    leaf = parse_leaf(chain.decode())
    assert leaf.not_before == T0 and leaf.not_after == T0 + datetime.timedelta(days=90)
    assert leaf.ari_id == ari_certificate_id(leaf_cert)
    with pytest.raises(ValueError):
        parse_leaf("not a certificate")
