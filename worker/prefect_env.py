"""Point this process (and every flow-run process it starts) at the right Prefect API and storage.

Must run before Prefect's settings are first read, so it imports nothing from Prefect.
``resolve_api_url`` is how every command finds the API: ``PREFECT_API_URL`` when set, else the
local server recorded under the state directory.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from pathlib import Path

from worker import local_server
from worker.kernel.errors import ConfigError
from worker.settings import Settings

__all__ = [
    "RESULTS_BLOCK",
    "apply",
    "drain_background_senders",
    "refresh_prefect_settings",
    "resolve_api_url",
    "worker_env",
]

RESULTS_BLOCK = "ctrl-results"  # blocks.results saves it under this name
CODE_DIR = Path(__file__).resolve().parents[1]  # the checkout holding flows/, tasks/, worker/


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
        # Heartbeats let the reconciler mark a silently dead run Crashed within ~90 s.
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Flow-run processes may run elsewhere than the worker's cwd.
        "UNKEY_STATE_DIR": str(settings.state_path),
        # The pull step of every deployment moves into the code (prefect.yaml): by default
        # the checkout this worker runs from.
        "CTRL_WORKER_DIR": os.environ.get("CTRL_WORKER_DIR") or str(CODE_DIR),
    }
    if api_url.startswith("http://") and not os.environ.get("PREFECT_API_SSL_CERT_FILE"):
        # Every Prefect client parses the whole CA bundle even for plain http (~16-37 ms and
        # ~220 ms of CPU per flow run, fast-dispatch.md): give it one certificate to parse.
        env["PREFECT_API_SSL_CERT_FILE"] = str(_small_ca_file(settings.state_path))
    if settings.results_s3_bucket:
        # Saved by the worker at startup (blocks.results); every flow-run process loads it.
        env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] = f"s3-bucket/{RESULTS_BLOCK}"
    if not os.environ.get("UNKEY_DATABASE_PRIMARY"):
        env["UNKEY_DATABASE_PRIMARY"] = settings.database_url()
    return env


def _small_ca_file(state_dir: Path) -> Path:
    """A PEM file with one CA certificate (the first of certifi's bundle), written once."""
    path = state_dir / "one-ca.pem"
    if not path.exists():
        import certifi

        bundle = Path(certifi.where()).read_text()
        end = "-----END CERTIFICATE-----"
        first = bundle[bundle.index("-----BEGIN CERTIFICATE-----") : bundle.index(end) + len(end)]
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(first + "\n")
        tmp.replace(path)
    return path


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


def drain_background_senders(timeout: float = 10.0) -> None:
    """Send Prefect's queued events and API logs now, while the server is still up.

    A process that ends with ``os._exit`` runs no atexit handler; one whose Prefect server
    stops first would have those handlers retry against a dead server for minutes.
    """
    import contextlib

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            service.drain_all(timeout=timeout)
