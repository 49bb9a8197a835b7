"""The Depot project of an Unkey project: created through the Depot API on first use, stored once.

Guarantees: ``ensure_depot_project`` returns the project's stored Depot project when it has
one; otherwise it reuses the Depot project named ``unkey-<project id>`` if one exists, and
only then creates it (``CreateProject``, cache policy 50 GB / 14 days, region
``UNKEY_DEPOT_PROJECT_REGION``). Listing first is what makes it idempotent: a step re-run
after a crash between "created" and "stored" finds the project it created and does not
create a second one. ``store_depot_project_id`` writes the id only while the column is
empty (compare-and-set) and returns the id the project ends up with.

Both are plain functions: the deploy flow wraps them in its durable steps.

Security: the Depot token (``UNKEY_REGISTRY_PASSWORD``, as in the original) is sent only as a
bearer header; messages tell a Connect error's code, never its message or the request.

Error handling: Depot not configured is a ``ConfigError`` naming the variable; 4xx other than
408/429 is terminal (``RefusedError``); 408, 429, 5xx, timeouts and network failures are
retryable.
"""

from __future__ import annotations

from typing import Any

import httpx
import sqlalchemy as sa

from tasks.db.schema import projects
from tasks.db.session import control_plane_transaction
from tasks.http import connect_error_code, http_client, is_retryable_status, send
from worker.kernel.clock import now_ms
from worker.kernel.errors import (
    ConfigError,
    InvalidParameterError,
    NotFoundError,
    RefusedError,
    RetryableError,
)
from worker.settings import Settings, env_name, worker_settings

__all__ = [
    "CACHE_KEEP_DAYS",
    "CACHE_KEEP_GB",
    "depot_project_name",
    "ensure_depot_project",
    "store_depot_project_id",
]

CACHE_KEEP_GB = 50
CACHE_KEEP_DAYS = 14
_SERVICE = "depot.core.v1.ProjectService"
_TIMEOUT_SECONDS = 30.0
# ListProjects pages; an organization with more than this many pages of projects is not
# plausible, and a server that always returns a next page must not loop forever.
_MAX_PAGES = 100


def depot_project_name(project_id: str) -> str:
    """The Depot project name of an Unkey project (the original's ``unkey-<projectId>``).

    Args:
        project_id: the Unkey project id.

    Returns:
        ``unkey-<project_id>``.
    """
    return f"unkey-{project_id}"


def ensure_depot_project(project_id: str, existing: str | None) -> str:
    """The Depot project of ``project_id``: ``existing``, else found by name, else created.

    Args:
        project_id: the Unkey project id.
        existing: the project's stored ``depot_project_id`` (``None`` or ``""`` if none).

    Returns:
        The Depot project id.

    Raises:
        InvalidParameterError: ``project_id`` is empty.
        ConfigError: ``UNKEY_DEPOT_API_URL`` or ``UNKEY_REGISTRY_PASSWORD`` is not set.
        RefusedError: Depot refused the request (4xx other than 408/429).
        RetryableError: 408, 429, 5xx, timeout or network failure.
    """
    if existing and existing.strip():
        return existing.strip()
    if not project_id:
        raise InvalidParameterError("project_id", "must not be empty")
    settings = worker_settings()
    api = _Depot(settings)
    name = depot_project_name(project_id)
    with http_client(_TIMEOUT_SECONDS) as client:
        found = api.find_project(client, name)
        if found is not None:
            return found
        body = {
            "name": name,
            "regionId": settings.depot_project_region,
            "cachePolicy": {"keepGb": CACHE_KEEP_GB, "keepDays": CACHE_KEEP_DAYS},
        }
        response = api.call(client, "CreateProject", body, what=f"depot CreateProject '{name}'")
        if response is None:
            # already_exists: a concurrent or earlier create won; reuse what it made.
            found = api.find_project(client, name)
            if found is None:
                raise RetryableError(
                    f"depot CreateProject '{name}': already exists but is not listed yet"
                )
            return found
    created = _project_id(response.get("project")) or _project_id(response)
    if created is None:
        raise RetryableError(f"depot CreateProject '{name}' returned no project id")
    return created


class _Depot:
    """Connect JSON calls to Depot's ProjectService."""

    def __init__(self, settings: Settings) -> None:
        token = settings.registry_password.get_secret_value() if settings.registry_password else ""
        if not settings.depot_api_url:
            raise ConfigError(f"{env_name('depot_api_url')} is required to create Depot projects")
        if not token:
            raise ConfigError(
                f"{env_name('registry_password')} (the Depot token) is required to create "
                "Depot projects"
            )
        self._base = settings.depot_api_url.rstrip("/")
        self._headers = {
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "Connect-Protocol-Version": "1",
        }

    def __repr__(self) -> str:
        return f"_Depot({self._base!r})"

    def call(
        self, client: httpx.Client, method: str, body: dict[str, Any], *, what: str
    ) -> dict[str, Any] | None:
        """The JSON response of ``method``; ``None`` for HTTP 409 (Connect already_exists)."""
        url = f"{self._base}/{_SERVICE}/{method}"
        response = send(client, "POST", url, what=what, json=body, headers=self._headers)
        status = response.status_code
        if status == 409:
            return None
        if is_retryable_status(status):
            raise RetryableError(f"{what} failed: HTTP {status}{connect_error_code(response)}")
        if not 200 <= status < 300:
            raise RefusedError(f"{what} refused: HTTP {status}{connect_error_code(response)}")
        try:
            parsed = response.json()
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise RetryableError(f"{what}: HTTP {status} without a JSON object")
        return parsed

    def find_project(self, client: httpx.Client, name: str) -> str | None:
        """The id of the (first listed) Depot project called ``name``, if any."""
        request: dict[str, Any] = {}
        for _ in range(_MAX_PAGES):
            page = self.call(client, "ListProjects", request, what="depot ListProjects") or {}
            for project in page.get("projects") or []:
                if isinstance(project, dict) and project.get("name") == name:
                    found = _project_id(project)
                    if found is not None:
                        return found
            next_token = page.get("nextPageToken")
            if not isinstance(next_token, str) or not next_token:
                return None
            request = {"pageToken": next_token}
        raise RetryableError(f"depot ListProjects: more than {_MAX_PAGES} pages")


def _project_id(project: object) -> str | None:
    if not isinstance(project, dict):
        return None
    value = project.get("projectId") or project.get("project_id")
    return value if isinstance(value, str) and value else None


def store_depot_project_id(project_id: str, depot_project_id: str) -> str:
    """Store the Depot project on the project, unless it already has one.

    Args:
        project_id: the Unkey project id.
        depot_project_id: the Depot project id ``ensure_depot_project`` returned.

    Returns:
        The Depot project id the project has now: ``depot_project_id``, or the one stored
        before (a compare-and-set never overwrites it).

    Raises:
        InvalidParameterError: ``depot_project_id`` is empty.
        NotFoundError: the project does not exist.
    """
    if not depot_project_id:
        raise InvalidParameterError("depot_project_id", "must not be empty")
    column = projects.c.depot_project_id
    with control_plane_transaction() as connection:
        connection.execute(
            sa.update(projects)
            .where(projects.c.id == project_id, sa.or_(column.is_(None), column == ""))
            .values(depot_project_id=depot_project_id, updated_at=now_ms())
        )
        # After the update the column is set whenever the row exists: None means no row.
        stored = connection.execute(
            sa.select(column).where(projects.c.id == project_id)
        ).scalar_one_or_none()
    if not stored:
        raise NotFoundError(f"project '{project_id}' not found")
    return str(stored)
