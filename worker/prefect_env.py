"""Point this process (and every flow-run process it starts) at the right Prefect API and storage.

Must run before Prefect's settings are first read, so it imports nothing from Prefect.
``resolve_api_url`` is how every command finds the API: ``PREFECT_API_URL`` when set, else the
local server recorded under the state directory.
"""

from __future__ import annotations

import os

from worker import local_server
from worker.errors import ConfigError
from worker.settings import Settings

__all__ = ["apply", "resolve_api_url", "worker_env"]


def resolve_api_url(settings: Settings) -> str:
    """The Prefect API this command talks to.

    Raises:
        ConfigError: no ``PREFECT_API_URL`` and no local server is running for the state dir.
    """
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    server = local_server.discover(settings.state_path)
    if server is None:
        raise ConfigError(
            f"no Prefect API: PREFECT_API_URL is unset and no local server runs for "
            f"{settings.state_path} (start the worker with `ctrl-worker run`)"
        )
    return server.api_url


def worker_env(settings: Settings, api_url: str) -> dict[str, str]:
    """Environment shared by the worker and its flow-run processes."""
    env = {
        "PREFECT_API_URL": api_url,
        # Step records must be found by every process of every attempt of a call.
        "PREFECT_LOCAL_STORAGE_PATH": str(settings.results_dir()),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        # Heartbeats let the crash automation mark a silently dead run Crashed within ~90 s.
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
        "PREFECT_RUNNER_POLL_FREQUENCY": str(max(1, round(settings.runner_poll_seconds))),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Flow-run processes may run elsewhere than the worker's cwd.
        "UNKEY_STATE_DIR": str(settings.state_path),
    }
    if not os.environ.get("UNKEY_DATABASE_PRIMARY"):
        env["UNKEY_DATABASE_PRIMARY"] = settings.database_url()
    return env


def apply(env: dict[str, str]) -> None:
    """Export ``env`` to this process (and so to its children)."""
    os.environ.update(env)
