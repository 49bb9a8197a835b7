"""A custom domain with a ``waiting`` ACME challenge, for the certificate flow's tests, and
what they read back (its certificate row, its challenge row).

The seeder removes only the rows it created (the certificate of its hostname, its challenge
and failure rows, its custom domain), so the crons scanning the whole database never see
another test's leftovers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import sqlalchemy as sa

from tasks.db.engine import engine_for
from tasks.db.schema import acme_challenge_failures, acme_challenges, certificates, custom_domains
from worker.kernel.clock import new_dns_label, new_id, now_ms

__all__ = [
    "SeededDomain",
    "certificate_rows",
    "challenge_row",
    "insert_domain",
    "remove_domains",
    "seeded_domain",
]


@dataclass(frozen=True)
class SeededDomain:
    """A custom domain with a ``waiting`` challenge.

    Attributes:
        url: the control-plane database it lives in.
        workspace_id: its workspace.
        domain_id: its ``custom_domains`` id (the challenge's ``domain_id``).
        domain: its name (``*.`` first for a wildcard).
    """

    url: str
    workspace_id: str
    domain_id: str
    domain: str


def insert_domain(
    connection: sa.Connection,
    domain: str,
    *,
    url: str = "",
    workspace_id: str | None = None,
    challenge_type: str = "HTTP-01",
    status: str = "waiting",
    expires_at: int = 0,
) -> SeededDomain:
    """Insert a ``verified`` custom domain named ``domain`` and its challenge in ``status``.

    Args:
        connection: an open connection (the caller's transaction).
        domain: the name to seed (unique to the caller).
        url: the database, recorded in the result for the read-back helpers.
        workspace_id: its workspace (default: a new one).
        challenge_type: ``HTTP-01`` or ``DNS-01``.
        status: the challenge's status.
        expires_at: the challenge's ``expires_at`` (ms).

    Returns:
        The seeded domain.
    """
    seed = SeededDomain(url, workspace_id or new_id("ws"), new_id("cd"), domain)
    at = now_ms()
    connection.execute(
        sa.insert(custom_domains).values(
            id=seed.domain_id,
            workspace_id=seed.workspace_id,
            project_id=new_id("proj"),
            environment_id=new_id("env"),
            domain=domain,
            challenge_type=challenge_type,
            verification_status="verified",
            verification_token=new_id("tok"),
            target_cname=f"{new_dns_label(16)}.cname.test",
            created_at=at,
        )
    )
    connection.execute(
        sa.insert(acme_challenges).values(
            domain_id=seed.domain_id,
            workspace_id=seed.workspace_id,
            token="",
            challenge_type=challenge_type,
            authorization="",
            status=status,
            expires_at=expires_at,
            created_at=at,
        )
    )
    return seed


def remove_domains(url: str, seeds: list[SeededDomain]) -> None:
    """Delete what ``insert_domain`` made of ``seeds``, and their certificates and failures."""
    with engine_for(url).begin() as connection:
        for seed in seeds:
            hostname = certificates.c.hostname
            connection.execute(sa.delete(certificates).where(hostname == seed.domain))
            for table in (acme_challenges, acme_challenge_failures):
                connection.execute(sa.delete(table).where(table.c.domain_id == seed.domain_id))
            connection.execute(
                sa.delete(custom_domains).where(custom_domains.c.id == seed.domain_id)
            )


@contextmanager
def seeded_domain(url: str, domain: str, challenge_type: str = "HTTP-01") -> Iterator[SeededDomain]:
    """Insert ``domain`` and its ``waiting`` challenge; remove them (and its certificate) after.

    Args:
        url: the control-plane database.
        domain: the name to seed (unique to the caller).
        challenge_type: ``HTTP-01`` or ``DNS-01``.

    Yields:
        The seeded domain.
    """
    with engine_for(url).begin() as connection:
        seed = insert_domain(connection, domain, url=url, challenge_type=challenge_type)
    try:
        yield seed
    finally:
        remove_domains(url, [seed])


def certificate_rows(seed: SeededDomain) -> list[sa.Row]:
    """Every ``certificates`` row of the seeded hostname (at most one, by the unique key)."""
    with engine_for(seed.url).connect() as connection:
        return list(
            connection.execute(
                sa.select(certificates).where(certificates.c.hostname == seed.domain)
            )
        )


def challenge_row(seed: SeededDomain) -> sa.Row:
    """The seeded domain's ``acme_challenges`` row."""
    with engine_for(seed.url).connect() as connection:
        return connection.execute(
            sa.select(acme_challenges).where(acme_challenges.c.domain_id == seed.domain_id)
        ).one()
