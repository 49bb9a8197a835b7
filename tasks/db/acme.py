"""The SQL of the CertificateService's ACME side: the account row and the challenge tokens.

- ``acme_users``: the one global ACME account (reference §6.2). ``workspace_id`` has no unique
  constraint, so these functions never decide alone that an account must be created: the
  caller serializes check-then-create (``tasks.acme.account``).
- ``acme_challenges``: the HTTP-01/DNS-01 token and key authorization of a domain's current
  issuance, which the HTTP-01 responder serves while the challenge is ``pending``.

Security: ``encrypted_key`` is stored and returned as the vault's ciphertext only; a key
authorization is public by design (the CA fetches it over plain HTTP), so storing it is fine.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import insert, select, update

from tasks.db.schema import acme_challenges, acme_users
from tasks.db.session import control_plane_transaction
from worker.kernel.clock import now_ms

__all__ = [
    "AcmeUserRow",
    "find_acme_user",
    "insert_acme_user",
    "pending_key_authorization",
    "set_challenge_pending",
    "set_registration_uri",
]


@dataclass(frozen=True)
class AcmeUserRow:
    """An ``acme_users`` row: the account id, its vault-encrypted key PEM, its account URL."""

    id: str
    encrypted_key: str
    registration_uri: str | None

    def __repr__(self) -> str:  # the ciphertext stays out of logs and tracebacks
        return f"AcmeUserRow(id={self.id!r}, registration_uri={self.registration_uri!r})"


def find_acme_user(workspace_id: str) -> AcmeUserRow | None:
    """The oldest ``acme_users`` row of ``workspace_id`` (the original's ``LIMIT 1``).

    Args:
        workspace_id: the account's workspace (``acme`` for the global account).

    Returns:
        The row, or None when there is none.
    """
    with control_plane_transaction() as connection:
        row = connection.execute(
            select(acme_users.c.id, acme_users.c.encrypted_key, acme_users.c.registration_uri)
            .where(acme_users.c.workspace_id == workspace_id)
            .order_by(acme_users.c.pk)
            .limit(1)
        ).first()
    if row is None:
        return None
    return AcmeUserRow(row.id, row.encrypted_key, row.registration_uri or None)


def insert_acme_user(user_id: str, workspace_id: str, encrypted_key: str) -> None:
    """Insert an account row, not yet registered (``registration_uri`` NULL).

    Args:
        user_id: the new id (``acme_<random>``).
        workspace_id: the account's workspace.
        encrypted_key: the vault ciphertext of the account key's PEM.
    """
    with control_plane_transaction() as connection:
        connection.execute(
            insert(acme_users).values(
                id=user_id,
                workspace_id=workspace_id,
                encrypted_key=encrypted_key,
                registration_uri=None,
                created_at=now_ms(),
            )
        )


def set_registration_uri(user_id: str, registration_uri: str) -> None:
    """Record the account URL the CA returned at registration.

    Args:
        user_id: the account row's id.
        registration_uri: the account URL (the JWS ``kid`` of every later request).
    """
    with control_plane_transaction() as connection:
        connection.execute(
            update(acme_users)
            .where(acme_users.c.id == user_id)
            .values(registration_uri=registration_uri, updated_at=now_ms())
        )


def set_challenge_pending(domain_id: str, token: str, key_authorization: str) -> bool:
    """Store a challenge's token and key authorization and mark it ``pending`` (idempotent).

    Args:
        domain_id: the custom domain whose challenge this is (``acme_challenges`` is unique
            on it).
        token: the CA's challenge token (the last path segment of the HTTP-01 URL).
        key_authorization: ``<token>.<account key thumbprint>``, what the responder serves.

    Returns:
        True when the domain has a challenge row (now updated), False when it has none.
    """
    with control_plane_transaction() as connection:
        result = connection.execute(
            update(acme_challenges)
            .where(acme_challenges.c.domain_id == domain_id)
            .values(
                token=token,
                authorization=key_authorization,
                status="pending",
                updated_at=now_ms(),
            )
        )
        if result.rowcount:
            return True
        # MySQL counts changed rows, not matched ones: a repeat within the same millisecond
        # changes nothing, so ask whether the row exists.
        found = connection.execute(
            select(acme_challenges.c.pk).where(acme_challenges.c.domain_id == domain_id)
        ).first()
    return found is not None


def pending_key_authorization(token: str) -> str | None:
    """The key authorization to serve for ``token``, while its challenge is ``pending``.

    Args:
        token: the token of the request path ``/.well-known/acme-challenge/<token>``.

    Returns:
        The key authorization, or None when no pending challenge has that token.
    """
    if not token:
        return None
    with control_plane_transaction() as connection:
        return connection.execute(
            select(acme_challenges.c.authorization)
            .where(acme_challenges.c.token == token, acme_challenges.c.status == "pending")
            .limit(1)
        ).scalar_one_or_none()
