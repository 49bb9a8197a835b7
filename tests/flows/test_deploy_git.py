"""DeployService with a git source (flows/deploy.py, tasks/build/git_build.py) end to end.

These protect SPEC §4 DeployService (git via a GitHub App installation token, the Depot project
created on first use, the original's image name and build context, the token reaching the
builder only as a build secret) and SPEC §3 (no secret in persisted results, logs, artifacts,
exceptions or flow parameters). GitHub and Depot are stood in by pytest-httpserver, the build
CLI (``docker`` or ``depot``) by ``tests/support/build_cli.py`` first on ``PATH``; the deploy
runs in-process on the local data plane, against the session's MariaDB and Prefect server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterName,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from pydantic import SecretStr
from pytest_httpserver import HTTPServer

from flows.deploy import deploy
from tasks.build.cli import BuildFailedError
from tasks.db.deploys import failure_message
from tasks.db.engine import engine_for
from tasks.db.schema import deployment_failures, deployments, projects
from tasks.github import clear_token_cache
from tests.flows.deploy_support import deploy_settings, running_dataplane
from tests.flows.helpers import fails_at_once
from tests.support.build_cli import (
    DEFAULT_LINES,
    DEPOT_BUILD_ID,
    DEPOT_LINES,
    install_fake_build_cli,
    read_build_records,
)
from tests.support.deploy_seed import (
    DeploySeed,
    cleanup_deploy,
    deployment_row,
    project_row,
    seed_deploy,
)

pytestmark = pytest.mark.mysql

APP_ID = 424242
REGISTRY = "registry.depot.test"
DEPOT_PROJECT = "dpgit7x2k"
SHA = "89abcdef0123456789abcdef0123456789abcdef"
LIST = "/depot.core.v1.ProjectService/ListProjects"
CREATE = "/depot.core.v1.ProjectService/CreateProject"
TOKEN_PATH = "/app/installations/42/access_tokens"
GIT = {
    "installation_id": 42,
    "repository": "acme/api",
    "commit_sha": SHA,
    "context_path": "/services/api",
    "dockerfile_path": "docker/Dockerfile",
}
# The stand-in CLI prints this with the token it was given in place of $GIT_AUTH_TOKEN.
LEAKY_LINE = "#4 0.220 remote: fetched with $GIT_AUTH_TOKEN"


@pytest.fixture(scope="module")
def app_pem() -> str:
    """The GitHub App's RSA private key, PEM (one per module: generating it is slow)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.fixture
def token() -> Iterator[str]:
    """A distinctive installation token for this test (and an empty token cache around it)."""
    clear_token_cache()
    yield f"ghs_{secrets.token_hex(18)}"
    clear_token_cache()


@pytest.fixture
def depot_token() -> str:
    """A distinctive Depot token (``UNKEY_REGISTRY_PASSWORD``) for this test."""
    return f"depot_{secrets.token_hex(18)}"


@pytest.fixture
def seed(control_db) -> Iterator[DeploySeed]:
    seeded = seed_deploy(control_db, commit_sha=SHA, branch="main")
    try:
        yield seeded
    finally:
        cleanup_deploy(seeded)


def _stand_in_apis(httpserver: HTTPServer, token: str) -> None:
    expires = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    httpserver.expect_request(TOKEN_PATH, method="POST").respond_with_json(
        {"token": token, "expires_at": expires}, status=201
    )
    httpserver.expect_request(LIST, method="POST").respond_with_json({"projects": []})
    httpserver.expect_request(CREATE, method="POST").respond_with_json(
        {"project": {"projectId": DEPOT_PROJECT, "name": "unkey-x"}}
    )


def _settings(httpserver: HTTPServer, pem: str, depot_token: str, backend: str) -> Any:
    return deploy_settings(
        github_app_id=APP_ID,
        github_private_key_pem=SecretStr(pem),
        github_api_url=httpserver.url_for(""),
        registry_url=REGISTRY,
        registry_username="x-token",
        registry_password=SecretStr(depot_token),
        depot_api_url=httpserver.url_for("").rstrip("/"),
        build_backend=backend,
        build_platform="linux/arm64",
    )


def _cli(tmp_path: Path, monkeypatch, backend: str, exit_code: int = 0) -> Path:
    lines = DEPOT_LINES if backend == "depot" else DEFAULT_LINES
    directory = tmp_path / "bin"
    record = install_fake_build_cli(
        directory, backend, exit_code=exit_code, lines=(*lines, LEAKY_LINE)
    )
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ['PATH']}")
    return record


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


async def _deploy_run_material(deployment_id: str) -> tuple[list[str], dict[str, int]]:
    """What Prefect keeps of the deploy run and its subflows: the runs (parameters, states),
    their task runs, their API logs and their artifacts, as JSON; and how many of each."""
    async with get_client() as client:
        (run,) = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"deploy-{deployment_id}"]))
        )
        children = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])
            )
        )
        run_ids = [run.id, *(child.id for child in children)]
        task_runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids))
        )
        logs = await client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=run_ids))
        )
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=run_ids))
        )
    material = [
        *(r.model_dump_json() for r in [run, *children]),
        *(t.model_dump_json() for t in task_runs),
        *(entry.model_dump_json() for entry in logs),
        *(a.model_dump_json() for a in artifacts),
    ]
    counts = {"subflows": len(children), "task_runs": len(task_runs), "artifacts": len(artifacts)}
    return material, counts


def _db_rows(url: str, seed: DeploySeed) -> list[str]:
    with engine_for(url).connect() as connection:
        return [
            repr(tuple(row))
            for query in (
                sa.select(deployments).where(deployments.c.id.in_(seed.deployment_ids)),
                sa.select(deployment_failures).where(
                    deployment_failures.c.deployment_id.in_(seed.deployment_ids)
                ),
                sa.select(projects).where(projects.c.id == seed.project_id),
            )
            for row in connection.execute(query)
        ]


@pytest.mark.parametrize("backend", ["depot", "docker"])
def test_git_deploy_builds_with_the_token_as_a_secret_and_leaks_it_nowhere(
    httpserver,
    prefect_api,
    app_pem,
    token,
    depot_token,
    seed,
    tmp_path,
    monkeypatch,
    caplog,
    backend,
) -> None:
    """A git deploy (both backends) builds the original's context and image with the
    platform and Dockerfile asked for; the installation token reaches the CLI only as the
    ``GIT_AUTH_TOKEN`` build secret (never in argv); the deployment is ``ready`` with that
    image and a build id; with depot the Depot project is created once and stored.

    Secret scan (SPEC §3): neither the token nor the Depot token appears in any file of the
    Prefect result storage (``<state dir>/results``, every file's bytes), in the Python log
    records of the ``prefect`` loggers (run and task loggers, captured here: the session sends
    no logs to the API), in the run's API logs, flow and task runs or artifacts read back
    through the Prefect client, or in the deployments / deployment_failures / projects rows.
    """
    caplog.set_level(logging.INFO, logger="prefect")
    _stand_in_apis(httpserver, token)
    record = _cli(tmp_path, monkeypatch, backend)
    with (
        _settings(httpserver, app_pem, depot_token, backend),
        running_dataplane(seed.url, seed.regions),
    ):
        result = asyncio.run(deploy(deployment_id=seed.deployment_id, git=GIT))

    project, deployment = seed.project_id, seed.deployment_id
    repository = DEPOT_PROJECT if backend == "depot" else f"unkey-{project.lower()}"
    image = f"{REGISTRY}/{repository}:{project}-{deployment}"
    (run,) = read_build_records(record)
    argv = run["argv"][1:]
    assert argv[-1] == f"https://github.com/acme/api.git#{SHA}:services/api"
    assert _option(argv, "--platform") == "linux/arm64"
    assert _option(argv, "--file") == "docker/Dockerfile"
    assert _option(argv, "--tag") == image
    assert _option(argv, "--secret") == "id=GIT_AUTH_TOKEN.github.com,env=GIT_AUTH_TOKEN"
    assert "--push" in argv
    assert run["env"]["GIT_AUTH_TOKEN"] == token
    assert not any(token in arg or depot_token in arg for arg in run["argv"])
    assert not any(name.startswith(("UNKEY_", "PREFECT_")) for name in run["env"])

    row = deployment_row(seed.url, deployment)
    assert (row.status, row.image, result["image"]) == ("ready", image, image)
    if backend == "depot":
        assert _option(argv, "--project") == DEPOT_PROJECT
        assert row.build_id == DEPOT_BUILD_ID
        assert project_row(seed.url, project).depot_project_id == DEPOT_PROJECT
        assert [r.path for r, _ in httpserver.log].count(CREATE) == 1
    else:
        assert row.build_id and row.build_id.startswith("build_")
        assert project_row(seed.url, project).depot_project_id is None
        assert not any(r.path.startswith("/depot.") for r, _ in httpserver.log)
    assert [r.path for r, _ in httpserver.log].count(TOKEN_PATH) == 1

    leaks = [token.encode(), depot_token.encode()]
    results = [
        p.read_bytes() for p in (prefect_api.state_dir / "results").rglob("*") if p.is_file()
    ]
    assert any(deployment.encode() in data for data in results)  # this deploy's steps are here
    assert not [data for data in results for leak in leaks if leak in data]

    messages = [record.getMessage() for record in caplog.records]
    assert any("build: #5 exporting to image" in m for m in messages)  # the build's log lines
    assert any("[redacted]" in m for m in messages)  # the token it printed, redacted
    material, counts = asyncio.run(_deploy_run_material(deployment))
    assert min(counts.values()) >= 1, counts  # routing subflow, steps, progress and table
    scanned = [*messages, *material, *_db_rows(seed.url, seed)]
    assert not [text for text in scanned if token in text or depot_token in text]


def test_failing_git_build_is_terminal_and_leaves_the_deployment_failed(
    httpserver, app_pem, token, depot_token, seed, tmp_path, monkeypatch
) -> None:
    """A build the CLI fails (exit status 1) fails the deploy at once with BuildFailedError
    (terminal: the build step is not retried, the CLI ran once); the give-up hook leaves the
    deployment ``failed`` with the build's message, which carries no token."""
    _stand_in_apis(httpserver, token)
    record = _cli(tmp_path, monkeypatch, "docker", exit_code=1)
    with _settings(httpserver, app_pem, depot_token, "docker"):
        error = fails_at_once(BuildFailedError, deploy, deployment_id=seed.deployment_id, git=GIT)

    assert len(read_build_records(record)) == 1
    assert "exited with status 1" in str(error) and token not in str(error)
    assert deployment_row(seed.url, seed.deployment_id).status == "failed"
    message = failure_message(seed.deployment_id)
    assert message is not None and "build failed" in message
    assert token not in message and depot_token not in message
