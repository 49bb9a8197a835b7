"""What the custom-domain tests share: a seeded project with a live deployment, this
process's DNS settings (challtestsrv), DNS records as a user publishes them, and row reads."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import sqlalchemy as sa
from prefect.client.orchestration import get_client

from tasks.db.engine import engine_for
from tasks.db.schema import (
    acme_challenges,
    certificates,
    custom_domains,
    frontline_routes,
    projects,
)
from tests.support.acme_servers import Challtestsrv
from tests.support.deploy_seed import DeploySeed, cleanup_deploy, seed_deploy
from tests.support.fixtures import PrefectApi
from tests.support.settings import changed_settings
from tests.support.waits import wait_for
from worker.kernel.clock import new_dns_label, new_id, now_ms
from worker.settings import Settings

CNAME_DOMAIN = "cname.example.test"


@dataclass
class Project:
    """A seeded workspace/project/environment whose live deployment is ``live``."""

    seed: DeploySeed
    live: str


@pytest.fixture
def dns_settings(control_db: str, challtestsrv: Challtestsrv) -> Iterator[Settings]:
    """This process's settings: DNS on challtestsrv, fast checks, a 3 s verification."""
    with changed_settings(
        dns_nameservers=[challtestsrv.dns_address],
        cname_domain=CNAME_DOMAIN,
        custom_domain_check_seconds=0.2,
        custom_domain_verify_timeout_seconds=3.0,
        acme_enabled=False,
    ) as settings:
        yield settings


@pytest.fixture
def project(control_db: str) -> Iterator[Project]:
    """A fresh project with a live deployment; everything of it removed afterwards."""
    seed = seed_deploy(control_db, regions=1)
    with engine_for(control_db).begin() as connection:
        connection.execute(
            sa.update(projects)
            .where(projects.c.id == seed.project_id)
            .values(live_deployment_id=seed.deployment_id)
        )
    try:
        yield Project(seed, seed.deployment_id)
    finally:
        remove_domains(control_db, seed.project_id)
        cleanup_deploy(seed)


def remove_domains(url: str, project_id: str) -> None:
    with engine_for(url).begin() as connection:
        rows = connection.execute(
            sa.select(custom_domains.c.id, custom_domains.c.domain).where(
                custom_domains.c.project_id == project_id
            )
        ).all()
        for row in rows:
            connection.execute(
                sa.delete(acme_challenges).where(acme_challenges.c.domain_id == row.id)
            )
            connection.execute(sa.delete(certificates).where(certificates.c.hostname == row.domain))
        connection.execute(
            sa.delete(custom_domains).where(custom_domains.c.project_id == project_id)
        )


def fresh_domain() -> str:
    return f"shop-{new_dns_label(10)}.example.test"


def read_domain(url: str, domain: str) -> sa.Row | None:
    with engine_for(url).connect() as connection:
        return connection.execute(
            sa.select(custom_domains).where(custom_domains.c.domain == domain)
        ).first()


def read_challenge(url: str, domain_id: str) -> sa.Row | None:
    with engine_for(url).connect() as connection:
        return connection.execute(
            sa.select(acme_challenges).where(acme_challenges.c.domain_id == domain_id)
        ).first()


def read_route(url: str, domain: str) -> sa.Row | None:
    with engine_for(url).connect() as connection:
        return connection.execute(
            sa.select(frontline_routes).where(
                frontline_routes.c.fully_qualified_domain_name == domain
            )
        ).first()


def read_certificate(url: str, domain: str) -> sa.Row | None:
    with engine_for(url).connect() as connection:
        return connection.execute(
            sa.select(certificates).where(certificates.c.hostname == domain)
        ).first()


def publish(dns: Challtestsrv, added: dict[str, Any], token: str | None = None) -> None:
    """The records the user is asked to create (``token`` overrides the right one)."""
    dns.add_txt(
        f"_unkey.{added['domain']}", f"unkey-domain-verify={token or added['verification_token']}"
    )
    dns.add_cname(added["domain"], added["target_cname"])


def unpublish(dns: Challtestsrv, domain: str) -> None:
    dns.clear_txt(f"_unkey.{domain}")
    dns.clear_cname(domain)


def insert_domain(url: str, project: Project, domain: str) -> dict[str, Any]:
    """A ``pending`` domain with no verification running (as a user's own verify_domain finds
    one), returned as add_custom_domain would."""
    values = {
        "domain": domain,
        "verification_token": new_id("tok"),
        "target_cname": f"{new_dns_label(16)}.{CNAME_DOMAIN}",
    }
    with engine_for(url).begin() as connection:
        connection.execute(
            sa.insert(custom_domains).values(
                id=new_id("cd"),
                workspace_id=project.seed.workspace_id,
                project_id=project.seed.project_id,
                environment_id=project.seed.environment_id,
                challenge_type="HTTP-01",
                verification_status="pending",
                created_at=now_ms(),
                **values,
            )
        )
    return values


def flow_run_state(flow_run_id: str) -> tuple[str, str]:
    async def read() -> tuple[str, str]:
        async with get_client() as client:
            run = await client.read_flow_run(UUID(flow_run_id))
        assert run.state is not None
        return run.state.type.value, run.state.name

    return asyncio.run(read())


def run_record(prefect_api: PrefectApi, flow_run_id: str) -> Path:
    return prefect_api.state_dir / "runs" / f"{flow_run_id}.json"


def count_domains(url: str) -> int:
    with engine_for(url).connect() as connection:
        return connection.execute(
            sa.select(sa.func.count()).select_from(custom_domains)
        ).scalar_one()


def domain_when(
    url: str, domain: str, condition: Callable[[sa.Row], bool], timeout: float, what: str
) -> sa.Row:
    """Wait until the domain's row exists and satisfies ``condition``; return it."""
    found: sa.Row = wait_for(
        lambda: (r := read_domain(url, domain)) is not None and condition(r) and r, timeout, what
    )
    return found
