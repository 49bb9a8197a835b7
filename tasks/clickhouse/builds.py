"""A build's steps and log lines into ClickHouse (the original's BuildStepV1 / BuildStepLogV1).

Plain functions, not steps: the deploy's build step calls them once its build ended, and build
output is observability, so the caller logs a failure instead of failing the deploy. Each call
is one insert batch; a batch retried with the same rows is stored once (the tables'
deduplication window, see ``tasks.clickhouse.schema``).

A step's ``step_id`` is its BuildKit vertex number (``#5`` -> ``"5"``), unique within a build;
log lines carry the vertex they belong to (``""`` for lines of no step) and their position in
the build's output (``seq``). The plain progress format has no timestamps, so every line of a
batch carries the time it was recorded.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from blocks.clickhouse import ClickHouseClient
from tasks.build.progress import BuildProgress, BuildStep
from tasks.clickhouse.schema import BUILD_STEP_LOGS, BUILD_STEPS

__all__ = ["BUILD_LOG_COLUMNS", "BUILD_STEP_COLUMNS", "record_build_logs", "record_build_steps"]

BUILD_STEP_COLUMNS = (
    "step_id",
    "build_id",
    "deployment_id",
    "workspace_id",
    "project_id",
    "started_at",
    "completed_at",
    "name",
    "cached",
    "error",
    "has_logs",
)
BUILD_LOG_COLUMNS = (
    "build_id",
    "step_id",
    "deployment_id",
    "workspace_id",
    "project_id",
    "time",
    "seq",
    "message",
)


def record_build_steps(
    client: ClickHouseClient,
    *,
    build_id: str,
    deployment_id: str,
    workspace_id: str,
    project_id: str,
    steps: Sequence[BuildStep],
) -> None:
    """Insert a build's steps into ``build_steps_v1`` in one batch (none: no round trip).

    Args:
        client: the analytics ClickHouse client.
        build_id: the build.
        deployment_id: the deployment the build is for.
        workspace_id: the deployment's workspace.
        project_id: the deployment's project.
        steps: the BuildKit steps; a step that never ended is stored with ``completed_at`` 0.

    Raises:
        ClickHouseQueryError: the insert was refused (no table, no privilege).
        ClickHouseUnavailableError: ClickHouse could not answer now.
    """
    rows = [
        (
            str(s.number),
            build_id,
            deployment_id,
            workspace_id,
            project_id,
            s.started_at,
            s.completed_at or 0,
            s.name,
            s.cached,
            s.error or "",
            s.has_logs,
        )
        for s in steps
    ]
    client.insert(BUILD_STEPS, rows, BUILD_STEP_COLUMNS)


def record_build_logs(
    client: ClickHouseClient,
    *,
    build_id: str,
    deployment_id: str,
    workspace_id: str,
    project_id: str,
    lines: Sequence[str],
    time_ms: int | None = None,
) -> None:
    """Insert a build's output lines into ``build_step_logs_v1`` in one batch.

    Args:
        client: the analytics ClickHouse client.
        build_id: the build.
        deployment_id: the deployment the build is for.
        workspace_id: the deployment's workspace.
        project_id: the deployment's project.
        lines: the build's output in order, already redacted (``#5 0.21 hello``).
        time_ms: the lines' time (unix ms); now when omitted.

    Raises:
        ClickHouseQueryError: the insert was refused (no table, no privilege).
        ClickHouseUnavailableError: ClickHouse could not answer now.
    """
    at = time_ms if time_ms is not None else time.time_ns() // 1_000_000
    progress = BuildProgress()  # only to tell which step each line belongs to
    rows = []
    for seq, line in enumerate(lines):
        number = progress.feed(line, at)
        step_id = "" if number is None else str(number)
        rows.append((build_id, step_id, deployment_id, workspace_id, project_id, at, seq, line))
    client.insert(BUILD_STEP_LOGS, rows, BUILD_LOG_COLUMNS)
