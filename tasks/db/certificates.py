"""The SQL of ``process_challenge``: the custom domain, its challenge's status, the certificate.

- ``custom_domains``: read by domain (the original's ``FindCustomDomainByDomain``).
- ``acme_challenges``: claimed (``waiting`` -> ``pending``), then ``verified`` with the
  certificate's NotAfter, or ``failed`` (with the reason in the worker's own
  ``acme_challenge_failures``, since the original table has no message column, and the count
  of consecutive failures the renewal sweep's backoff doubles with).
- ``certificates``: upserted by hostname (unique), keeping the id a renewal replaces.

Security: ``encrypted_private_key`` is only ever given and stored as the vault's ciphertext;
the certificate chain is public.
"""

from __future__ import annotations

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from tasks.db.schema import acme_challenge_failures, acme_challenges, certificates
from tasks.db.session import control_plane_transaction
from worker.kernel.clock import new_id, now_ms
from worker.kernel.errors import RetryableError

__all__ = [
    "MESSAGE_MAX",
    "challenge_failure",
    "claim_challenge",
    "mark_challenge_failed",
    "mark_challenge_verified",
    "upsert_certificate",
]

MESSAGE_MAX = 1024  # acme_challenge_failures.message is varchar(1024)


def claim_challenge(domain_id: str) -> bool:
    """``waiting`` -> ``pending`` (a ``verified`` renewal is left as it is, as the original).

    Returns:
        True when a ``waiting`` challenge was claimed now.
    """
    with control_plane_transaction() as connection:
        result = connection.execute(
            update(acme_challenges)
            .where(acme_challenges.c.domain_id == domain_id, acme_challenges.c.status == "waiting")
            .values(status="pending", updated_at=now_ms())
        )
    return bool(result.rowcount)


def _certificate_id(hostname: str) -> str | None:
    with control_plane_transaction() as connection:
        return connection.execute(
            select(certificates.c.id).where(certificates.c.hostname == hostname)
        ).scalar_one_or_none()


def upsert_certificate(
    workspace_id: str, hostname: str, certificate: str, encrypted_private_key: str
) -> str:
    """Insert or replace the certificate of ``hostname``, keeping its id; return the id.

    Raises:
        RetryableError: another writer inserted the hostname between the read and the write.
    """
    at = now_ms()
    existing = _certificate_id(hostname)
    values = {
        "workspace_id": workspace_id,
        "certificate": certificate,
        "encrypted_private_key": encrypted_private_key,
    }
    with control_plane_transaction() as connection:
        if existing is not None:
            connection.execute(
                update(certificates)
                .where(certificates.c.hostname == hostname)
                .values(**values, updated_at=at)
            )
            return existing
        certificate_id = new_id("cert")
        try:
            connection.execute(
                insert(certificates).values(
                    id=certificate_id, hostname=hostname, created_at=at, **values
                )
            )
        except IntegrityError:
            raise RetryableError(f"certificate of '{hostname}' was inserted meanwhile") from None
    return certificate_id


def mark_challenge_verified(domain_id: str, expires_at_ms: int) -> None:
    """The challenge is ``verified`` until ``expires_at_ms``; any earlier failure is cleared."""
    with control_plane_transaction() as connection:
        connection.execute(
            update(acme_challenges)
            .where(acme_challenges.c.domain_id == domain_id)
            .values(status="verified", expires_at=expires_at_ms, updated_at=now_ms())
        )
        connection.execute(
            delete(acme_challenge_failures).where(acme_challenge_failures.c.domain_id == domain_id)
        )


def mark_challenge_failed(domain_id: str, message: str) -> bool:
    """The challenge is ``failed``, ``message`` kept as its reason and the consecutive
    failures counted (``failures``: 1 on the first, +1 on each later one until a success
    clears the row), so the renewal sweep's backoff can double per failure.

    The give-up hook calling this runs as a step keyed by the call's attempt, so one failed
    attempt counts once (a replay does not count it again).

    Returns:
        True when the domain has a challenge row (now ``failed``).
    """
    at = now_ms()
    message = message[:MESSAGE_MAX]
    with control_plane_transaction() as connection:
        found = connection.execute(
            select(acme_challenges.c.pk).where(acme_challenges.c.domain_id == domain_id)
        ).first()
        if found is None:
            return False
        connection.execute(
            update(acme_challenges)
            .where(acme_challenges.c.domain_id == domain_id)
            .values(status="failed", updated_at=at)
        )
        previous = connection.execute(
            select(acme_challenge_failures.c.failures)
            .where(acme_challenge_failures.c.domain_id == domain_id)
            .with_for_update()
        ).scalar_one_or_none()
        if previous is None:
            connection.execute(
                insert(acme_challenge_failures).values(
                    domain_id=domain_id, message=message, failed_at=at, failures=1
                )
            )
        else:
            connection.execute(
                update(acme_challenge_failures)
                .where(acme_challenge_failures.c.domain_id == domain_id)
                .values(message=message, failed_at=at, failures=previous + 1)
            )
    return True


def challenge_failure(domain_id: str) -> str | None:
    """Why the domain's challenge last failed, or None."""
    with control_plane_transaction() as connection:
        return connection.execute(
            select(acme_challenge_failures.c.message).where(
                acme_challenge_failures.c.domain_id == domain_id
            )
        ).scalar_one_or_none()
