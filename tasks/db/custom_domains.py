"""The SQL of CustomDomainService (reference §7): the ``custom_domains`` row and its verification.

Guarantees:

- A verification belongs to one flow run, ``custom_domains.invocation_id``. Every write of a
  verification (its checks, ``verified``, ``failed``) is a compare-and-set on that column, so a
  verification that was superseded (``retry_verification``) or whose domain was deleted writes
  nothing, whichever order the runs take the key in.
- ``claim_verification`` makes a run the domain's verification only when the domain has none
  (``invocation_id`` NULL) or already is this run's.
- ``insert_custom_domain`` is idempotent for the same id (a replayed add) and refuses a name
  that another domain holds.
- ``delete_custom_domain`` removes the domain's route, challenge (and its failure) and the
  domain in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, delete, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from tasks.db.schema import (
    acme_challenge_failures,
    acme_challenges,
    custom_domains,
    frontline_routes,
)
from tasks.db.session import control_plane_transaction
from tasks.dns import DomainCheck
from worker.kernel.clock import now_ms
from worker.kernel.errors import ConflictError

__all__ = [
    "ERROR_MAX",
    "CustomDomain",
    "claim_verification",
    "delete_custom_domain",
    "ensure_waiting_challenge",
    "find_custom_domain",
    "insert_custom_domain",
    "mark_verification_failed",
    "mark_verified",
    "record_check",
    "reset_verification",
]

ERROR_MAX = 512  # custom_domains.verification_error is varchar(512)


@dataclass(frozen=True)
class CustomDomain:
    """A ``custom_domains`` row, as the service reads it."""

    id: str
    workspace_id: str
    project_id: str
    environment_id: str
    domain: str
    verification_status: str
    verification_token: str
    target_cname: str
    check_attempts: int
    verification_error: str | None
    invocation_id: str | None

    def public(self) -> dict[str, Any]:
        """What a call returns about the domain (the token is published in DNS: not secret)."""
        return {
            "domain": self.domain,
            "target_cname": self.target_cname,
            "verification_token": self.verification_token,
            "verification_status": self.verification_status,
        }


def _read(connection: Connection, domain: str) -> CustomDomain | None:
    row = connection.execute(
        select(
            custom_domains.c.id,
            custom_domains.c.workspace_id,
            custom_domains.c.project_id,
            custom_domains.c.environment_id,
            custom_domains.c.domain,
            custom_domains.c.verification_status,
            custom_domains.c.verification_token,
            custom_domains.c.target_cname,
            custom_domains.c.check_attempts,
            custom_domains.c.verification_error,
            custom_domains.c.invocation_id,
        ).where(custom_domains.c.domain == domain)
    ).first()
    return None if row is None else CustomDomain(**row._asdict())


def find_custom_domain(domain: str) -> CustomDomain | None:
    """The custom domain named ``domain`` (exact, lowercase), or None."""
    with control_plane_transaction() as connection:
        return _read(connection, domain)


def insert_custom_domain(values: dict[str, Any]) -> None:
    """Insert a new custom domain (``HTTP-01``, ``pending``); a replay of the same id is a no-op.

    Args:
        values: ``id``, ``workspace_id``, ``project_id``, ``environment_id``, ``domain``,
            ``verification_token``, ``target_cname``, ``invocation_id``.

    Raises:
        ConflictError: another custom domain has this name (or, astronomically rarely, the
            drawn CNAME target).
    """
    with control_plane_transaction() as connection:
        existing = _read(connection, values["domain"])
        if existing is not None:
            if existing.id == values["id"]:
                return
            raise ConflictError(f"custom domain '{values['domain']}' already exists")
        try:
            connection.execute(
                insert(custom_domains).values(
                    **values,
                    challenge_type="HTTP-01",
                    verification_status="pending",
                    created_at=now_ms(),
                )
            )
        except IntegrityError:
            raise ConflictError(f"custom domain '{values['domain']}' already exists") from None


def _mine(domain_id: str, flow_run_id: str) -> Any:
    return and_(custom_domains.c.id == domain_id, custom_domains.c.invocation_id == flow_run_id)


def claim_verification(domain_id: str, flow_run_id: str) -> bool:
    """Make ``flow_run_id`` the domain's verification (status ``verifying``).

    Returns:
        True when the run now owns the verification; False when another run does.
    """
    with control_plane_transaction() as connection:
        result = connection.execute(
            update(custom_domains)
            .where(
                custom_domains.c.id == domain_id,
                custom_domains.c.verification_status != "verified",
                or_(
                    custom_domains.c.invocation_id.is_(None),
                    custom_domains.c.invocation_id == flow_run_id,
                ),
            )
            .values(
                invocation_id=flow_run_id,
                verification_status="verifying",
                verification_error=None,
                updated_at=now_ms(),
            )
        )
    return bool(result.rowcount)


def record_check(domain_id: str, flow_run_id: str, check: DomainCheck) -> bool:
    """Count one DNS check of the run's verification and keep what it found.

    Returns:
        False when the run no longer owns the verification (nothing written).
    """
    at = now_ms()
    with control_plane_transaction() as connection:
        result = connection.execute(
            update(custom_domains)
            .where(_mine(domain_id, flow_run_id))
            .values(
                check_attempts=custom_domains.c.check_attempts + 1,
                last_checked_at=at,
                ownership_verified=check.txt_ok,
                cname_verified=check.cname_ok,
                verification_error=check.missing_message()[:ERROR_MAX] or None,
                updated_at=at,
            )
        )
    return bool(result.rowcount)


def mark_verified(domain_id: str, flow_run_id: str) -> bool:
    """The run's verification succeeded: ``verified``, both checks true, no error.

    Returns:
        False when the run no longer owns the verification (nothing written).
    """
    with control_plane_transaction() as connection:
        result = connection.execute(
            update(custom_domains)
            .where(_mine(domain_id, flow_run_id))
            .values(
                verification_status="verified",
                ownership_verified=True,
                cname_verified=True,
                verification_error=None,
                updated_at=now_ms(),
            )
        )
    return bool(result.rowcount)


def mark_verification_failed(domain_id: str, flow_run_id: str, message: str) -> bool:
    """The run's verification ended without success: ``failed`` with ``message``, and the
    domain has no running verification any more (a later ``verify_domain`` may claim it).

    Returns:
        False when the run did not own the verification (nothing written).
    """
    with control_plane_transaction() as connection:
        result = connection.execute(
            update(custom_domains)
            .where(
                _mine(domain_id, flow_run_id),
                custom_domains.c.verification_status != "verified",
            )
            .values(
                verification_status="failed",
                verification_error=message[:ERROR_MAX],
                invocation_id=None,
                updated_at=now_ms(),
            )
        )
    return bool(result.rowcount)


def reset_verification(domain_id: str) -> tuple[bool, str | None]:
    """Start the domain's verification over (the original's reset, §7.2): ``pending``,
    attempts 0, no error, and no verification owning it (the next ``verify_domain`` claims
    it). A ``verified`` domain is left as it is.

    Returns:
        Whether it was reset, and the run that owned the verification before (to cancel).
    """
    with control_plane_transaction() as connection:
        row = connection.execute(
            select(custom_domains.c.verification_status, custom_domains.c.invocation_id)
            .where(custom_domains.c.id == domain_id)
            .with_for_update()
        ).first()
        if row is None or row.verification_status == "verified":
            return False, None
        connection.execute(
            update(custom_domains)
            .where(custom_domains.c.id == domain_id)
            .values(
                verification_status="pending",
                check_attempts=0,
                verification_error=None,
                last_checked_at=None,
                ownership_verified=False,
                cname_verified=False,
                invocation_id=None,
                updated_at=now_ms(),
            )
        )
    return True, row.invocation_id


def ensure_waiting_challenge(domain: CustomDomain, expires_at_ms: int) -> bool:
    """An HTTP-01 challenge for the domain, ``waiting`` for its issuance (idempotent: an
    existing challenge is kept, a ``failed`` one is set ``waiting`` again).

    Returns:
        True when a challenge was inserted or re-armed now.
    """
    at = now_ms()
    with control_plane_transaction() as connection:
        status = connection.execute(
            select(acme_challenges.c.status).where(acme_challenges.c.domain_id == domain.id)
        ).scalar_one_or_none()
        if status is None:
            connection.execute(
                insert(acme_challenges).values(
                    domain_id=domain.id,
                    workspace_id=domain.workspace_id,
                    token="",
                    challenge_type="HTTP-01",
                    authorization="",
                    status="waiting",
                    expires_at=expires_at_ms,
                    created_at=at,
                )
            )
            return True
        if status == "failed":
            connection.execute(
                update(acme_challenges)
                .where(acme_challenges.c.domain_id == domain.id)
                .values(status="waiting", updated_at=at)
            )
            return True
    return False


def delete_custom_domain(domain: CustomDomain) -> None:
    """Delete the domain's frontline route, its challenge (and failure) and the domain, in one
    transaction (a replay finds nothing left and deletes nothing)."""
    with control_plane_transaction() as connection:
        connection.execute(
            delete(frontline_routes).where(
                frontline_routes.c.fully_qualified_domain_name == domain.domain,
                frontline_routes.c.project_id == domain.project_id,
            )
        )
        for table in (acme_challenges, acme_challenge_failures):
            connection.execute(delete(table).where(table.c.domain_id == domain.id))
        connection.execute(delete(custom_domains).where(custom_domains.c.id == domain.id))
