"""The durable steps of a deploy's git source: the Depot project, and the build itself.

``get or create depot project`` (depot backend only) returns the project's Depot project,
creating it through the Depot API on first use and storing it on the project.
``build docker image from git`` gets the GitHub installation token *inside* the step (it is
never a parameter or a result, so it is never persisted), runs the backend's CLI, sends every
line of output to the run's logs and, when ClickHouse is configured, the build's steps and
logs to the build tables. Its result (image, build id) holds no secret.

A build that fails for good is terminal (the deploy fails); a timed-out or killed build is
retried by the step.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TypedDict

from prefect import get_run_logger

from blocks.clickhouse import analytics_client
from tasks.build.cli import BuildResult, build_request, run_build
from tasks.build.depot import ensure_depot_project, store_depot_project_id
from tasks.clickhouse.builds import record_build_logs, record_build_steps
from tasks.github import installation_token
from worker.kernel.steps import step
from worker.settings import worker_settings

__all__ = ["BuiltImage", "GitSpec", "build_from_git", "get_or_create_depot_project"]

BUILD_RETRIES = 2


@dataclass(frozen=True)
class GitSpec:
    """What to build: the deploy's git source and the deployment it is for."""

    workspace_id: str
    project_id: str
    deployment_id: str
    installation_id: int
    repository: str
    commit_sha: str
    context_path: str
    dockerfile_path: str


class BuiltImage(TypedDict):
    image: str
    build_id: str


@step(name="get or create depot project")
def get_or_create_depot_project(project_id: str, existing: str | None) -> str | None:
    """The project's Depot project (depot backend), created and stored on first use.

    Returns:
        The Depot project id, or None with the docker backend (no Depot project).
    """
    if worker_settings().build_backend != "depot":
        return None
    if existing:
        return existing
    return store_depot_project_id(project_id, ensure_depot_project(project_id, existing))


def _record_in_clickhouse(spec: GitSpec, result: BuildResult, lines: list[str]) -> None:

    client = analytics_client()
    if client is None:
        return
    record_build_steps(
        client,
        build_id=result.build_id,
        deployment_id=spec.deployment_id,
        workspace_id=spec.workspace_id,
        project_id=spec.project_id,
        steps=result.steps,
    )
    record_build_logs(
        client,
        build_id=result.build_id,
        deployment_id=spec.deployment_id,
        workspace_id=spec.workspace_id,
        project_id=spec.project_id,
        lines=lines,
    )


@step(name="build docker image from git", retries=BUILD_RETRIES, retry_delay=5.0)
async def build_from_git(spec: GitSpec, depot_project_id: str | None) -> BuiltImage:
    """Build the commit and push the image.

    Returns:
        The pushed image and the build id.

    Raises:
        BuildFailedError: the build failed (terminal).
        BuildInterruptedError: it timed out or was killed (retried).
        ConfigError: the backend, registry or GitHub is not configured.
    """
    log = get_run_logger()
    token = await asyncio.to_thread(installation_token, spec.installation_id)
    request = build_request(
        worker_settings(),
        project_id=spec.project_id,
        deployment_id=spec.deployment_id,
        repository=spec.repository,
        commit_sha=spec.commit_sha,
        context_path=spec.context_path,
        dockerfile_path=spec.dockerfile_path,
        depot_project_id=depot_project_id,
        token=token,
    )
    del token
    lines: list[str] = []

    def on_line(line: str) -> None:  # already redacted by run_build
        lines.append(line)
        log.info("build: %s", line)

    log.info("building %s from %s", request.image, request.context_url)
    result = await run_build(request, on_line)
    try:
        await asyncio.to_thread(_record_in_clickhouse, spec, result, lines)
    except Exception as exc:  # build output is observability: it never fails the deploy
        log.warning("could not write the build's steps and logs to ClickHouse: %s", exc)
    return BuiltImage(image=result.image, build_id=result.build_id)
