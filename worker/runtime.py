"""The worker process: ``ctrl-worker run``, a warm worker of the ``ctrl`` work pool.

Startup order (SPEC §4): validate config -> logging -> health server (503 until started) ->
vault -> DB -> result storage -> register with Prefect: the ``ctrl`` pool and the catalogue's
deployments (the same as ``prefect deploy --all`` of ``prefect.yaml``) and their key limits
(retried 10 x 5 s, fatal after) -> the warm worker
(``worker.dispatch``: fork server, event push, fallback poll) -> the reconciler (resumes
crashed runs of the pool's deployments, whichever worker ran them) -> the local data plane
(``worker.dataplane``, a simulation of krane) if ``UNKEY_DATAPLANE`` is ``local`` -> metrics ->
the platform wildcard certificates' bootstrap (``worker.certificate_bootstrap``).
With ``PREFECT_API_URL`` unset it first starts (and at the end stops) a local Prefect server
under the state directory.

Shutdown on SIGTERM/SIGINT: ``/health/ready`` turns 503 at once, no new runs are claimed,
running ones get ``UNKEY_SHUTDOWN_GRACE_SECONDS`` (30 s) to finish; what is still running then
is killed, reported ``Crashed`` and resumed later by a worker (its finished steps replay).
Then everything is closed in reverse order; the health server, started first, stops last.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from deployments import DeploymentSpec
from worker import local_server, prefect_env
from worker.settings import Settings

__all__ = ["run_worker"]

log = logging.getLogger("ctrl.worker")

VAULT_BLOCK_NAME = "ctrl-vault"
REGISTER_ATTEMPTS = 10
REGISTER_DELAY_SECONDS = 5.0
GLOBAL_KEYS = ("deploy:global", "certificate:global")


@dataclass
class _Cleanups:
    """Closers run in reverse order of registration (the original's LIFO cleanups)."""

    steps: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)

    def push(self, name: str, closer: Callable[[], Any]) -> None:
        self.steps.append((name, closer))

    async def run(self) -> None:
        for name, closer in reversed(self.steps):
            try:
                result = closer()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("cleanup %s failed", name)
        self.steps.clear()


def _setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("UNKEY_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One line per HTTP request to the Prefect API drowns everything else.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _prepare_metrics_dir(settings: Settings) -> None:
    # Multiprocess mode: flow-run processes write their counters here, /metrics sums them.
    directory = settings.state_path / "metrics"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)


def run_worker(settings: Settings, extra: Sequence[DeploymentSpec] = ()) -> int:
    """Run the worker until SIGTERM/SIGINT; returns the exit code.

    Args:
        settings: the validated configuration.
        extra: deployments registered and run besides the catalogue (tests, embedding
            programs); their modules are preloaded into the fork server too.
    """
    _setup_logging()
    settings.state_path.mkdir(parents=True, exist_ok=True)
    server: local_server.LocalServer | None = None
    api_url = os.environ.get("PREFECT_API_URL")
    if not api_url:
        log.info("PREFECT_API_URL is unset: starting a local Prefect server")
        server = local_server.start(
            settings.state_path,
            settings.prefect_server_port,
            database=settings.prefect_server_database,
        )
        api_url = server.api_url
    prefect_env.apply(prefect_env.worker_env(settings, api_url))
    if settings.prometheus_port:
        _prepare_metrics_dir(settings)
    ui = server.ui_url if server else api_url.removesuffix("/api")
    try:
        with prefect_env.refresh_prefect_settings():
            return asyncio.run(_run(settings, ui, tuple(extra)))
    finally:
        if server is not None:
            # The worker's own events (claims, lock releases) must reach the server before it
            # stops, or the interpreter's exit would retry them for minutes.
            prefect_env.drain_background_senders()
            log.info("stopping the local Prefect server")
            local_server.stop(settings.state_path, server)


async def _run(settings: Settings, ui: str, extra: tuple[DeploymentSpec, ...]) -> int:
    # Prefect is imported only now: its settings must see the environment set above.
    from worker.health import HealthState, serve_health

    cleanups = _Cleanups()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    health = HealthState()
    http = await serve_health(health, settings.http_port)
    cleanups.push("health server", lambda: setattr(http, "should_exit", True))
    try:
        vault = _open_local_resources(settings, health, cleanups)
        registered = await _register(settings, extra, vault)
        worker = await _start_warm_worker(settings, extra, cleanups)
        background = [
            asyncio.create_task(_sync_forever(worker), name="pool-sync"),
            asyncio.create_task(_reconcile_forever(settings, registered), name="reconciler"),
        ]
        if settings.dataplane_mode() == "local":
            from worker.dataplane import start_local_dataplane

            background.append(start_local_dataplane(settings))
        cleanups.push("background tasks", lambda: [task.cancel() for task in background])
        if settings.prometheus_port:
            _serve_metrics(settings.prometheus_port)
        await _bootstrap_certificates(settings)
        _add_prefect_check(health)
        health.started = True
        print(f"ctrl-worker started: Prefect UI {ui}", flush=True)
        print(f"health: http://127.0.0.1:{settings.http_port}/health/ready", flush=True)
        done = asyncio.create_task(stop.wait())
        await asyncio.wait({done, *background}, return_when=asyncio.FIRST_COMPLETED)
        for task in background:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("%s stopped unexpectedly", task.get_name(), exc_info=task.exception())
                return 1
        log.info("shutting down")
        return 0
    finally:
        health.shutting_down = True
        await cleanups.run()


def _open_local_resources(settings: Settings, health: Any, cleanups: _Cleanups) -> Any:
    """Vault, control-plane DB and the results directory; returns the vault."""
    from blocks.vault import LocalVault, vault_from_settings
    from tasks.db.engine import dispose_engines, engine_for
    from tasks.db.schema import init_schema, missing_tables

    # vault: the local keyring creates its master key now, not in the middle of a call.
    vault = vault_from_settings(settings)
    if isinstance(vault, LocalVault):
        vault.encrypt("ctrl-startup", "probe")
    # DB: the embedded SQLite file is created on demand; MySQL is never changed implicitly.
    url = settings.database_url()
    if url.startswith("sqlite"):
        init_schema(url)
    else:
        absent = missing_tables(url)
        if absent:
            raise SystemExit(
                f"the control-plane database lacks {len(absent)} table(s) "
                f"({', '.join(absent[:5])}...): run `ctrl-worker db init`"
            )
    cleanups.push("database", dispose_engines)
    health.checks["database"] = _db_check(engine_for(url))
    # Analytics: an embedded chdb gets its tables like the SQLite file (in a short child
    # process: chdb never loads into the worker); a ClickHouse server is never changed here.
    from tasks.clickhouse.bootstrap import ensure_embedded_analytics

    ensure_embedded_analytics(settings)
    if not settings.results_s3_bucket:
        settings.results_dir().mkdir(parents=True, exist_ok=True)
    return vault


async def _register(
    settings: Settings, extra: tuple[DeploymentSpec, ...], vault: Any
) -> dict[UUID, DeploymentSpec]:
    """Pool, deployments, blocks and global keys (and the old automation retired), 10 x 5 s."""
    from prefect.client.orchestration import get_client

    from blocks.results import save_results_block
    from deployments import CATALOGUE
    from worker.cron_watch import ensure_cron_watch
    from worker.kernel.locks import ensure_key_limit
    from worker.kernel.resume import retire_crash_automation
    from worker.registration import register_deployments

    for attempt in range(1, REGISTER_ATTEMPTS + 1):
        try:
            async with get_client() as client:
                registered = await register_deployments(client, (*CATALOGUE, *extra))
                await retire_crash_automation(client)
                await ensure_cron_watch(client, registered, settings.cron_missed_grace_seconds)
                # Blocks are a projection of the environment, visible in the UI (the
                # environment stays the source of truth; flows read it directly).
                await vault.asave(VAULT_BLOCK_NAME, overwrite=True)
                # Before any flow-run process starts: they load it as their default.
                await save_results_block(settings)
            for key in GLOBAL_KEYS:
                await ensure_key_limit(key)
            return registered
        except Exception as exc:
            if attempt == REGISTER_ATTEMPTS:
                raise SystemExit(
                    f"could not register with the Prefect API after {attempt} attempts: {exc}"
                ) from exc
            log.warning("registering with Prefect failed (%s); retrying in 5 s", exc)
            await asyncio.sleep(REGISTER_DELAY_SECONDS)
    raise AssertionError("unreachable")


async def _start_warm_worker(
    settings: Settings, extra: tuple[DeploymentSpec, ...], cleanups: _Cleanups
) -> Any:
    from deployments import POOL_NAME
    from worker.dispatch.worker_type import WarmProcessWorker

    worker = WarmProcessWorker(
        POOL_NAME,
        name=f"ctrl-worker-{settings.instance_id}".replace("/", "-").replace("%", "-"),
        limit=settings.worker_limit,
        preload=[spec.module for spec in extra],
        fallback_poll_seconds=settings.runner_poll_seconds,
        create_pool_if_not_found=False,
    )
    await worker.__aenter__()
    cleanups.push("warm worker", lambda: _drain(worker, settings))
    return worker


async def _sync_forever(worker: Any) -> None:
    """Heartbeat the worker to its pool (what ``BaseWorker.start`` does every 30 s)."""
    while True:
        await asyncio.sleep(worker.heartbeat_interval_seconds)
        try:
            await worker.sync_with_backend()
        except Exception:
            log.exception("syncing with the work pool failed; trying again")


async def _drain(worker: Any, settings: Settings) -> None:
    """Stop claiming, give running calls the grace period, kill the rest, close the worker."""
    worker.stop_claiming()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.shutdown_grace_seconds
    while worker.children and loop.time() < deadline:
        await asyncio.sleep(0.1)
    for child in list(worker.children.values()):
        # Killed mid-step: reported Crashed, and the next reconciler pass (of any worker)
        # resumes it; its finished steps replay.
        child.kill_group()
    deadline = loop.time() + 10
    while worker.children and loop.time() < deadline:
        await asyncio.sleep(0.1)
    # Free the keys the killed runs held now, not when their leases expire.
    await _reconcile_pass(settings, {})
    await worker.__aexit__(None, None, None)


def _db_check(engine: Any) -> Callable[[], Any]:
    async def check() -> None:
        def ping() -> None:
            with engine.connect() as connection:
                connection.exec_driver_sql("SELECT 1")

        await asyncio.to_thread(ping)

    return check


def _add_prefect_check(health: Any) -> None:
    async def check() -> None:
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            response = await client.hello()
            response.raise_for_status()

    health.checks["prefect"] = check


def _serve_metrics(port: int) -> None:
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    from worker.certificate_metrics import CertificateCollector

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    # Read from the DB at scrape time: a gauge set in a flow-run process would go stale.
    registry.register(CertificateCollector())
    start_http_server(port, registry=registry)


async def _bootstrap_certificates(settings: Settings) -> None:
    """The platform wildcards' rows and today's startup sweep (logged, never fatal)."""
    from worker.certificate_bootstrap import bootstrap_certificates

    await bootstrap_certificates(settings)


async def _reconcile_pass(settings: Settings, registered: dict[UUID, DeploymentSpec]) -> None:
    from prefect.client.orchestration import get_client

    from worker.kernel.resume import reconcile_once

    async with get_client() as client:
        report = await reconcile_once(
            client,
            list(registered),
            max_resumes=settings.resume_max_attempts,
            flow_names={
                deployment_id: spec.flow_name for deployment_id, spec in registered.items()
            },
        )
    if report.resumed or report.marked_crashed or report.gave_up:
        log.info(
            "reconciled: crashed %s, resumed %s, gave up %s, released %d lease(s)",
            [str(i) for i in report.marked_crashed],
            [str(i) for i in report.resumed],
            [str(i) for i in report.gave_up],
            report.released_leases,
        )


async def _reconcile_forever(settings: Settings, registered: dict[UUID, DeploymentSpec]) -> None:
    while True:
        try:
            await _reconcile_pass(settings, registered)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("reconciling crashed runs failed; trying again")
        await asyncio.sleep(settings.reconcile_interval_seconds)
