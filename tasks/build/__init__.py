"""Building a deploy's image from git: the Depot project (``depot``), the build CLI (``cli``),
its progress output (``progress``) and registry credentials (``registry``).

Every name here is a plain function or type, not a durable step: the deploy flow wraps the
calls in its steps (and never persists a ``BuildRequest``, which holds the GitHub token).
"""

from __future__ import annotations

from tasks.build.cli import (
    GIT_AUTH_SECRET,
    BuildBackend,
    BuildFailedError,
    BuildInterruptedError,
    BuildRequest,
    BuildResult,
    build_command,
    build_context_url,
    build_request,
    dockerfile_or_default,
    image_name,
    run_build,
)
from tasks.build.depot import (
    CACHE_KEEP_DAYS,
    CACHE_KEEP_GB,
    depot_project_name,
    ensure_depot_project,
    store_depot_project_id,
)
from tasks.build.progress import BuildProgress, BuildStep, depot_build_id

__all__ = [
    "CACHE_KEEP_DAYS",
    "CACHE_KEEP_GB",
    "GIT_AUTH_SECRET",
    "BuildBackend",
    "BuildFailedError",
    "BuildInterruptedError",
    "BuildProgress",
    "BuildRequest",
    "BuildResult",
    "BuildStep",
    "build_command",
    "build_context_url",
    "build_request",
    "depot_build_id",
    "depot_project_name",
    "dockerfile_or_default",
    "ensure_depot_project",
    "image_name",
    "run_build",
    "store_depot_project_id",
]
