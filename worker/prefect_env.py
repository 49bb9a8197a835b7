"""Point this process (and every flow-run process it starts) at the right Prefect API and storage.

Must run before Prefect's settings are first read, so it imports nothing from Prefect.
``resolve_api_url`` is how every command finds the API: ``PREFECT_API_URL`` when set, else the
local server recorded under the state directory.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager

from worker import local_server
from worker.kernel.errors import ConfigError
from worker.settings import Settings

__all__ = ["RESULTS_BLOCK", "apply", "refresh_prefect_settings", "resolve_api_url", "worker_env"]

RESULTS_BLOCK = "ctrl-results"  # blocks.results saves it under this name


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
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(settings.results_dir()),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        # Heartbeats let the crash automation mark a silently dead run Crashed within ~90 s.
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
        "PREFECT_RUNNER_POLL_FREQUENCY": str(max(1, round(settings.runner_poll_seconds))),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Flow-run processes may run elsewhere than the worker's cwd.
        "UNKEY_STATE_DIR": str(settings.state_path),
    }
    if settings.results_s3_bucket:
        # Saved by the worker at startup (blocks.results); every flow-run process loads it.
        env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] = f"s3-bucket/{RESULTS_BLOCK}"
    if not os.environ.get("UNKEY_DATABASE_PRIMARY"):
        env["UNKEY_DATABASE_PRIMARY"] = settings.database_url()
    return env


# Older spellings Prefect also reads; left in the environment they could shadow ours in a
# child process, whose settings merge the parent's canonical names with its environment.
_ALIASES = (
    "PREFECT_LOCAL_STORAGE_PATH",
    "PREFECT_DEFAULT_RESULT_STORAGE_BLOCK",
    "PREFECT_RUNNER_HEARTBEAT_FREQUENCY",
)


def apply(env: dict[str, str]) -> None:
    """Export ``env`` to this process (and so to its children), using canonical names only."""
    for alias in _ALIASES:
        os.environ.pop(alias, None)
    os.environ.update(env)


def refresh_prefect_settings() -> AbstractContextManager[object]:
    """A Prefect settings context re-read from the environment as it is now.

    Prefect builds its settings once, at first use; when something imported and used it
    before ``apply`` (an embedding program, a test runner), this makes the values current.
    """
    from prefect.context import SettingsContext, get_settings_context
    from prefect.settings import Settings as PrefectSettings

    return SettingsContext(profile=get_settings_context().profile, settings=PrefectSettings())
