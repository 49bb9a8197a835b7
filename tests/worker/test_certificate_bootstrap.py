"""The startup bootstrap of the platform wildcard certificates (worker/certificate_bootstrap.py)
on the session's MariaDB: which wildcards, rows created once, the day's sweep sent once, and
a failure never stopping the worker."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

import worker.client
from tasks.db.engine import engine_for
from tasks.db.renewals import INTERNAL_WORKSPACE, ensure_platform_domain
from tasks.db.schema import acme_challenges, custom_domains
from worker.certificate_bootstrap import bootstrap_certificates, platform_wildcards
from worker.kernel.clock import new_dns_label, now
from worker.settings import Settings, worker_settings

pytestmark = pytest.mark.mysql


@pytest.fixture
def platform(control_db: str) -> Iterator[Settings]:
    """Settings with ACME and Route53 on and a unique default and regional apex domain; the
    rows of every wildcard they name removed afterwards."""
    label = new_dns_label(8)
    settings = worker_settings().model_copy(
        update={
            "acme_enabled": True,
            "acme_route53_enabled": True,
            "default_domain": f"{label}.app.test",
            "regional_apex_domain": f"{label}.regions.test",
            "available_regions": ["us-east-1.aws", "eu-west-1.aws"],
        }
    )
    yield settings
    names = platform_wildcards(settings)
    with engine_for(control_db).begin() as connection:
        ids = select_ids(connection, names)
        connection.execute(sa.delete(acme_challenges).where(acme_challenges.c.domain_id.in_(ids)))
        connection.execute(sa.delete(custom_domains).where(custom_domains.c.id.in_(ids)))


def select_ids(connection: sa.Connection, names: list[str]) -> list[str]:
    return list(
        connection.execute(
            sa.select(custom_domains.c.id).where(custom_domains.c.domain.in_(names))
        ).scalars()
    )


def test_platform_wildcards_need_acme_and_route53(platform: Settings) -> None:
    """`*.{default}` and `*.{region}.{regional apex}` per region; none unless both ACME and
    Route53 are enabled; no regional ones without the apex."""
    default, apex = platform.default_domain, platform.regional_apex_domain
    assert platform_wildcards(platform) == [
        f"*.{default}",
        f"*.us-east-1.aws.{apex}",
        f"*.eu-west-1.aws.{apex}",
    ]
    assert platform_wildcards(platform.model_copy(update={"acme_route53_enabled": False})) == []
    assert platform_wildcards(platform.model_copy(update={"acme_enabled": False})) == []
    no_apex = platform.model_copy(update={"regional_apex_domain": None})
    assert platform_wildcards(no_apex) == [f"*.{default}"]


def test_bootstrap_creates_the_rows_once_and_sends_the_days_sweep(
    platform: Settings, control_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each wildcard gets an `unkey_internal` DNS-01 custom domain and a `waiting` challenge,
    once (a second bootstrap, as after a restart, creates nothing); each bootstrap sends the
    sweep with the day's key `cert-renewal-startup-<date>` (the API dedupes it)."""
    sent: list[tuple[str, dict[str, Any], str | None]] = []

    async def trigger(flow: str, params: dict[str, Any], *, idempotency_key: str | None) -> str:
        sent.append((flow, params, idempotency_key))
        return "run-id"

    monkeypatch.setattr(worker.client, "trigger", trigger)

    assert asyncio.run(bootstrap_certificates(platform)) == "run-id"
    assert asyncio.run(bootstrap_certificates(platform)) == "run-id"

    names = platform_wildcards(platform)
    with engine_for(control_db).connect() as connection:
        rows = connection.execute(
            sa.select(
                custom_domains.c.domain,
                custom_domains.c.workspace_id,
                custom_domains.c.challenge_type,
                acme_challenges.c.status,
                acme_challenges.c.challenge_type.label("challenge"),
            )
            .join(acme_challenges, acme_challenges.c.domain_id == custom_domains.c.id)
            .where(custom_domains.c.domain.in_(names))
        ).all()
    assert sorted(row.domain for row in rows) == sorted(names)
    assert {(r.workspace_id, r.challenge_type, r.status, r.challenge) for r in rows} == {
        (INTERNAL_WORKSPACE, "DNS-01", "waiting", "DNS-01")
    }
    key = f"cert-renewal-startup-{now():%Y-%m-%d}"
    assert sent == [("renew_expiring_certificates", {}, key)] * 2
    assert not ensure_platform_domain(names[0])


def test_a_failing_bootstrap_is_logged_and_never_raises(
    platform: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The Prefect API refusing the sweep (or any other failure) is logged; the worker goes on."""

    async def trigger(*_args: Any, **_kwargs: Any) -> str:
        raise RuntimeError("the Prefect API is away")

    monkeypatch.setattr(worker.client, "trigger", trigger)
    assert asyncio.run(bootstrap_certificates(platform)) is None
    assert "bootstrapping the platform certificates failed" in caplog.text
