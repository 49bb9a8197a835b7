"""The SQL of the certificate renewal sweep, the platform wildcard bootstrap and the
certificate metrics.

- ``list_renewal_candidates``: every challenge the sweep may act on (``waiting``,
  ``verified``, ``failed``) with its domain, its failure count and the stored chain, in the
  order the domains were created (the original's ``ListExecutableChallenges`` order).
- ``certificate_chain``: the stored chain of a hostname (a renewal's ``replaces``).
- ``ensure_platform_domain``: the ``unkey_internal`` custom domain and ``waiting`` DNS-01
  challenge of a platform wildcard, created once (the original's bootstrap).
- ``certificate_states`` / ``certificate_chains``: what the metrics collector reads (ids and
  ``updated_at`` first, chains only for the certificates it has not parsed yet).

Security: the certificate chain is public; no private key is read here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from tasks.db.schema import acme_challenge_failures, acme_challenges, certificates, custom_domains
from tasks.db.session import control_plane_transaction
from worker.kernel.clock import new_dns_label, new_id, now_ms

__all__ = [
    "INTERNAL_WORKSPACE",
    "CertificateState",
    "RenewalCandidate",
    "certificate_chain",
    "certificate_chains",
    "certificate_states",
    "ensure_platform_domain",
    "list_renewal_candidates",
]

INTERNAL_WORKSPACE = "unkey_internal"
_SWEPT = ("waiting", "verified", "failed")


@dataclass(frozen=True)
class RenewalCandidate:
    """A challenge the sweep looks at, with what deciding about it needs."""

    domain_id: str
    workspace_id: str
    domain: str
    status: str
    failed_at: int | None
    failures: int
    chain_pem: str | None


@dataclass(frozen=True)
class CertificateState:
    """A stored certificate as the metrics see it (no chain: parsed once per version)."""

    id: str
    hostname: str
    updated_at: int
    challenge_status: str | None


def list_renewal_candidates() -> list[RenewalCandidate]:
    """Every ``waiting``, ``verified`` or ``failed`` challenge with its domain, oldest domain
    first."""
    query = (
        select(
            acme_challenges.c.domain_id,
            custom_domains.c.workspace_id,
            custom_domains.c.domain,
            acme_challenges.c.status,
            acme_challenge_failures.c.failed_at,
            acme_challenge_failures.c.failures,
            certificates.c.certificate,
        )
        .join(custom_domains, custom_domains.c.id == acme_challenges.c.domain_id)
        .outerjoin(
            acme_challenge_failures,
            acme_challenge_failures.c.domain_id == acme_challenges.c.domain_id,
        )
        .outerjoin(certificates, certificates.c.hostname == custom_domains.c.domain)
        .where(acme_challenges.c.status.in_(_SWEPT))
        .order_by(custom_domains.c.created_at, custom_domains.c.pk)
    )
    with control_plane_transaction() as connection:
        rows = connection.execute(query).all()
    return [
        RenewalCandidate(
            domain_id=row.domain_id,
            workspace_id=row.workspace_id,
            domain=row.domain,
            status=row.status,
            failed_at=row.failed_at,
            failures=row.failures or 0,
            chain_pem=row.certificate,
        )
        for row in rows
    ]


def certificate_chain(hostname: str) -> str | None:
    """The stored chain PEM of ``hostname``, or None."""
    with control_plane_transaction() as connection:
        return connection.execute(
            select(certificates.c.certificate).where(certificates.c.hostname == hostname)
        ).scalar_one_or_none()


def ensure_platform_domain(domain: str) -> bool:
    """The platform wildcard ``domain``'s custom domain (workspace, project and environment
    ``unkey_internal``, DNS-01) and its ``waiting`` challenge, unless the domain exists.

    Idempotent, also against another worker bootstrapping at the same time.

    Returns:
        True when the rows were created now.
    """
    at = now_ms()
    domain_id = new_id("cd")
    try:
        with control_plane_transaction() as connection:
            exists = connection.execute(
                select(custom_domains.c.id).where(custom_domains.c.domain == domain)
            ).first()
            if exists is not None:
                return False
            connection.execute(
                insert(custom_domains).values(
                    id=domain_id,
                    workspace_id=INTERNAL_WORKSPACE,
                    project_id=INTERNAL_WORKSPACE,
                    environment_id=INTERNAL_WORKSPACE,
                    domain=domain,
                    challenge_type="DNS-01",
                    verification_status="verified",
                    verification_token="",
                    # The original's DNS1035(16): unique, never resolved for a platform name.
                    target_cname=new_dns_label(16),
                    created_at=at,
                )
            )
            connection.execute(
                insert(acme_challenges).values(
                    domain_id=domain_id,
                    workspace_id=INTERNAL_WORKSPACE,
                    token="",
                    challenge_type="DNS-01",
                    authorization="",
                    status="waiting",
                    expires_at=0,
                    created_at=at,
                )
            )
    except IntegrityError:
        return False  # another worker created it between the read and the write
    return True


def certificate_states() -> list[CertificateState]:
    """Every stored certificate's id, hostname, version and challenge status (no chain)."""
    query = (
        select(
            certificates.c.id,
            certificates.c.hostname,
            certificates.c.created_at,
            certificates.c.updated_at,
            acme_challenges.c.status,
        )
        .outerjoin(custom_domains, custom_domains.c.domain == certificates.c.hostname)
        .outerjoin(acme_challenges, acme_challenges.c.domain_id == custom_domains.c.id)
    )
    with control_plane_transaction() as connection:
        rows = connection.execute(query).all()
    return [
        CertificateState(row.id, row.hostname, row.updated_at or row.created_at, row.status)
        for row in rows
    ]


def certificate_chains(ids: Sequence[str]) -> dict[str, str]:
    """The chain PEMs of the certificates ``ids``, by id."""
    if not ids:
        return {}
    with control_plane_transaction() as connection:
        rows = connection.execute(
            select(certificates.c.id, certificates.c.certificate).where(
                certificates.c.id.in_(list(ids))
            )
        ).all()
    return {row.id: row.certificate for row in rows}
