"""When a certificate is due for renewal, and when a failed challenge may be tried again.

Pure functions (no I/O), shared by the renewal sweep (``flows.certificate_renewal``), the
issuance (``replaces`` on a renewal's order) and the certificate metrics:

- ``parse_leaf``: the stored chain's leaf, reduced to what renewal needs (NotBefore, NotAfter,
  the RFC 9773 ARI certificate identifier).
- ``lifetime_renewal_at``: without ARI a certificate is due when a third of its lifetime
  (NotAfter - NotBefore) remains (Let's Encrypt's own advice for 90-day certificates: renew
  at day 60).
- ``is_due``: the rule the sweep applies: inside the CA's ARI window when the CA offers one,
  else the lifetime rule; an operator's ``days_before_expiry`` also makes due whatever expires
  within that many days.
- ``failure_backoff_ms`` / ``retry_at_ms``: a ``failed`` challenge is retried 1 h after its
  first failure, the wait doubling per consecutive failure, capped at 24 h (the original
  never retried a failed challenge).
"""

from __future__ import annotations

import base64
import datetime
import math
from dataclasses import dataclass

from cryptography import x509

__all__ = [
    "FAILURE_BACKOFF_FIRST_MS",
    "FAILURE_BACKOFF_MAX_MS",
    "Leaf",
    "ari_certificate_id",
    "failure_backoff_ms",
    "is_due",
    "lifetime_renewal_at",
    "parse_leaf",
    "retry_at_ms",
]

FAILURE_BACKOFF_FIRST_MS = 3600 * 1000
FAILURE_BACKOFF_MAX_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class Leaf:
    """What renewal needs of a certificate chain's leaf."""

    not_before: datetime.datetime
    not_after: datetime.datetime
    ari_id: str | None  # None when the leaf has no authority key identifier


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def ari_certificate_id(certificate: x509.Certificate) -> str | None:
    """RFC 9773's certificate identifier: base64url(AKI keyIdentifier) "." base64url(serial).

    The serial is the DER integer's content octets (two's complement, a leading zero byte when
    the high bit is set), as RFC 9773 §4.1 says.

    Args:
        certificate: the certificate (the leaf).

    Returns:
        The identifier, or None when the certificate carries no authority key identifier.
    """
    try:
        aki = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    if aki.key_identifier is None:
        return None
    serial = certificate.serial_number
    serial_bytes = serial.to_bytes(math.ceil((serial.bit_length() + 1) / 8), "big", signed=True)
    return f"{_b64url(aki.key_identifier)}.{_b64url(serial_bytes)}"


def parse_leaf(chain_pem: str) -> Leaf:
    """The first certificate of a PEM chain (the leaf), reduced to its renewal facts.

    Args:
        chain_pem: the stored full chain (leaf, then intermediates).

    Returns:
        Its NotBefore, NotAfter (timezone-aware UTC) and ARI identifier.

    Raises:
        ValueError: the text holds no PEM certificate.
    """
    leaf = x509.load_pem_x509_certificate(chain_pem.encode())
    return Leaf(leaf.not_valid_before_utc, leaf.not_valid_after_utc, ari_certificate_id(leaf))


def lifetime_renewal_at(leaf: Leaf) -> datetime.datetime:
    """When a third of the certificate's lifetime remains (the rule without ARI)."""
    return leaf.not_after - (leaf.not_after - leaf.not_before) / 3


def is_due(
    leaf: Leaf,
    now: datetime.datetime,
    *,
    ari_window_start: datetime.datetime | None = None,
    days_before_expiry: int | None = None,
) -> bool:
    """Whether a ``verified`` certificate is due for renewal at ``now``.

    Args:
        leaf: the stored certificate's leaf.
        now: the sweep's instant (timezone-aware).
        ari_window_start: the start of the CA's suggested renewal window (RFC 9773) when the
            CA offers ARI; due from then on (also past the window's end). None: the lifetime
            rule applies.
        days_before_expiry: an operator's forced sweep: also due when NotAfter is at most this
            many days away.

    Returns:
        True when the sweep should renew it now.
    """
    if days_before_expiry is not None and leaf.not_after - now <= datetime.timedelta(
        days=days_before_expiry
    ):
        return True
    if ari_window_start is not None:
        return now >= ari_window_start
    return now >= lifetime_renewal_at(leaf)


def failure_backoff_ms(failures: int) -> int:
    """How long a challenge that failed ``failures`` times in a row waits before its retry:
    1 h after the first failure, doubling per failure, at most 24 h."""
    exponent = max(failures, 1) - 1
    if exponent >= 5:  # 2**5 h already exceeds the cap (and keeps huge counts cheap)
        return FAILURE_BACKOFF_MAX_MS
    return min(FAILURE_BACKOFF_MAX_MS, FAILURE_BACKOFF_FIRST_MS * 2**exponent)


def retry_at_ms(failed_at_ms: int, failures: int) -> int:
    """When a challenge that last failed at ``failed_at_ms`` (its ``failures``-th failure in a
    row) may be tried again, in ms since the epoch."""
    return failed_at_ms + failure_backoff_ms(failures)
