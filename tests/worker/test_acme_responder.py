"""``ctrl-worker acme-responder``: the real command, serving HTTP-01 challenges from MariaDB.

The challenge rows each test inserts have their own ids and tokens and are deleted after.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from tasks.db.engine import engine_for
from tasks.db.schema import acme_challenges
from tests.support.acme_servers import start_acme_responder
from tests.support.processes import ReadyProcess
from worker.acme_responder import responder_app
from worker.kernel.clock import new_id, now_ms
from worker.local_server import free_port


@pytest.fixture
def responder(control_db: str, tmp_path: Path) -> Iterator[str]:
    """The command on a free port against the session's database; yields its base URL.
    At the end it must exit 0 on SIGTERM (the README's contract)."""
    port = free_port()
    process: ReadyProcess = start_acme_responder(tmp_path / "responder", control_db, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        code = process.stop(timeout=10)
    assert code == 0, process.tail()


@pytest.fixture
def challenge_rows(control_db: str) -> Iterator[list[str]]:
    """Domain ids of the challenge rows a test inserts (deleted after)."""
    created: list[str] = []
    yield created
    with engine_for(control_db).begin() as connection:
        connection.execute(
            sa.delete(acme_challenges).where(acme_challenges.c.domain_id.in_(created))
        )


def _insert(url: str, created: list[str], status: str) -> tuple[str, str]:
    """A challenge row of ``status`` with a fresh token; returns (token, key authorization)."""
    domain_id, token = new_id("cd"), secrets.token_urlsafe(32)
    key_authorization = f"{token}.{secrets.token_urlsafe(32)}"
    with engine_for(url).begin() as connection:
        connection.execute(
            sa.insert(acme_challenges).values(
                domain_id=domain_id,
                workspace_id="ws_responder_test",
                token=token,
                challenge_type="HTTP-01",
                authorization=key_authorization,
                status=status,
                expires_at=0,
                created_at=now_ms(),
            )
        )
    created.append(domain_id)
    return token, key_authorization


def test_pending_challenge_is_served_as_plain_text(
    control_db: str, responder: str, challenge_rows: list[str]
) -> None:
    """Guarantee: the key authorization of a pending challenge is served at
    /.well-known/acme-challenge/<token> as 200 text/plain, exactly (what the CA compares)."""
    token, key_authorization = _insert(control_db, challenge_rows, "pending")
    response = httpx.get(f"{responder}/.well-known/acme-challenge/{token}", timeout=5)
    assert response.status_code == 200
    assert response.text == key_authorization
    assert response.headers["content-type"].startswith("text/plain")


def test_unknown_or_finished_token_is_404(
    control_db: str, responder: str, challenge_rows: list[str]
) -> None:
    """Guarantee: an unknown token, and the token of a challenge no longer pending
    (verified/failed), answer 404 and never a key authorization; other paths are 404 too."""
    verified, _ = _insert(control_db, challenge_rows, "verified")
    failed, _ = _insert(control_db, challenge_rows, "failed")
    for token in ("no-such-token", verified, failed):
        response = httpx.get(f"{responder}/.well-known/acme-challenge/{token}", timeout=5)
        assert response.status_code == 404, token
    assert httpx.get(f"{responder}/", timeout=5).status_code == 404


def test_database_failure_is_503_not_404() -> None:
    """Guarantee: a failing lookup (database down) answers 503, so it is never mistaken for
    "no such challenge", and the error's text is not sent to the requester."""

    def broken(token: str) -> str | None:
        raise RuntimeError("database unreachable at mysql://secret@host")

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=responder_app(broken))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/.well-known/acme-challenge/abc")

    response = asyncio.run(get())
    assert response.status_code == 503
    assert "secret" not in response.text
