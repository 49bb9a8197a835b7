"""The worker process: ``ctrl-worker run``.

Startup order (SPEC §4): validate config -> logging -> vault -> DB -> result storage ->
ACME providers -> register deployments with Prefect, their key limits and the crash
automation (retried 10 x 5 s, fatal after) -> serve all flows -> health server -> metrics.
With ``PREFECT_API_URL`` unset it first starts (and at the end stops) a local Prefect server
under the state directory.

Shutdown on SIGTERM/SIGINT: ``/health/ready`` turns 503, no new runs are taken, running ones
get ``UNKEY_SHUTDOWN_GRACE_SECONDS`` (30 s) to finish; what is still running then is
terminated and resumed later by a worker (its finished steps replay). Then everything is
closed in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
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

    ``extra`` deployments are served besides the catalogue (tests, embedding programs).
    """
    _setup_logging()
    settings.state_path.mkdir(parents=True, exist_ok=True)
    server: local_server.LocalServer | None = None
    api_url = os.environ.get("PREFECT_API_URL")
    if not api_url:
        log.info("PREFECT_API_URL is unset: starting a local Prefect server")
        server = local_server.start(settings.state_path, settings.prefect_server_port)
        api_url = server.api_url
    prefect_env.apply(prefect_env.worker_env(settings, api_url))
    if settings.prometheus_port:
        _prepare_metrics_dir(settings)
    try:
        with prefect_env.refresh_prefect_settings():
            return asyncio.run(_run(settings, server, tuple(extra)))
    finally:
        if server is not None:
            log.info("stopping the local Prefect server")
            local_server.stop(settings.state_path, server)


async def _run(
    settings: Settings, server: local_server.LocalServer | None, extra: tuple[DeploymentSpec, ...]
) -> int:
    # Prefect is imported only now: its settings must see the environment set above.
    from prefect.client.orchestration import get_client
    from prefect.runner import Runner

    from blocks.results import save_results_block
    from blocks.vault import LocalVault, vault_from_settings
    from deployments import CATALOGUE, DEPLOYMENT_NAME
    from tasks.db.engine import dispose_engines, engine_for
    from tasks.db.schema import init_schema, missing_tables
    from worker.health import HealthState, serve_health
    from worker.kernel.locks import ensure_key_limit
    from worker.kernel.resume import ensure_crash_automation

    cleanups = _Cleanups()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    health = HealthState()

    try:
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
        if not settings.results_s3_bucket:
            settings.results_dir().mkdir(parents=True, exist_ok=True)

        runner = Runner(
            name=f"ctrl-worker-{settings.instance_id}".replace("/", "-"),
            query_seconds=settings.runner_poll_seconds,
            limit=settings.worker_limit,
            heartbeat_seconds=30,
            pause_on_shutdown=False,  # other workers keep serving the crons
        )
        flows_by_deployment: dict[UUID, str] = {}
        async with get_client() as client:
            for attempt in range(1, REGISTER_ATTEMPTS + 1):
                try:
                    for spec in (*CATALOGUE, *extra):
                        deployment_id = await runner.aadd_flow(
                            spec.load(),
                            name=DEPLOYMENT_NAME,
                            cron=spec.cron,
                            parameters=spec.parameters or None,
                            description=spec.description or None,
                        )
                        flows_by_deployment[deployment_id] = spec.flow_name
                    await ensure_crash_automation(client)
                    # Blocks are a projection of the environment, visible in the UI (the
                    # environment stays the source of truth; flows read it directly).
                    await vault.asave(VAULT_BLOCK_NAME, overwrite=True)
                    # Before any flow-run process starts: they load it as their default.
                    await save_results_block(settings)
                    for key in ("deploy:global", "certificate:global"):
                        await ensure_key_limit(key)
                    break
                except Exception as exc:
                    if attempt == REGISTER_ATTEMPTS:
                        raise SystemExit(
                            f"could not register with the Prefect API after {attempt} "
                            f"attempts: {exc}"
                        ) from exc
                    log.warning("registering with Prefect failed (%s); retrying in 5 s", exc)
                    await asyncio.sleep(REGISTER_DELAY_SECONDS)
            health.checks["prefect"] = _prefect_check()

            runner_task = asyncio.create_task(runner.start(), name="runner")
            cleanups.push("runner", lambda: _stop_runner(runner, runner_task, settings))
            # Runner.start() installs its own SIGTERM handler, which cancels every running
            # flow run; ours drains them instead, so take the signal back once it started.
            while not runner.started and not runner_task.done():
                await asyncio.sleep(0.05)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            reconciler = asyncio.create_task(
                _reconcile_forever(settings, list(flows_by_deployment), flows_by_deployment),
                name="reconciler",
            )
            cleanups.push("reconciler", reconciler.cancel)

            http = await serve_health(health, settings.http_port)
            cleanups.push("health server", lambda: setattr(http, "should_exit", True))
            if settings.prometheus_port:
                _serve_metrics(settings.prometheus_port)
            health.started = True
            ui = server.ui_url if server else os.environ["PREFECT_API_URL"].removesuffix("/api")
            print(f"ctrl-worker started: Prefect UI {ui}", flush=True)
            print(f"health: http://127.0.0.1:{settings.http_port}/health/ready", flush=True)

            done = asyncio.create_task(stop.wait())
            await asyncio.wait({done, runner_task}, return_when=asyncio.FIRST_COMPLETED)
            if runner_task.done() and not stop.is_set():
                runner_task.result()  # surfaces the runner's crash
                log.error("the runner stopped unexpectedly")
                return 1
            log.info("shutting down")
            health.shutting_down = True
            return 0
    finally:
        health.shutting_down = True
        await cleanups.run()


def _db_check(engine: Any) -> Callable[[], Any]:
    async def check() -> None:
        def ping() -> None:
            with engine.connect() as connection:
                connection.exec_driver_sql("SELECT 1")

        await asyncio.to_thread(ping)

    return check


def _prefect_check() -> Callable[[], Any]:
    async def check() -> None:
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            response = await client.hello()
            response.raise_for_status()

    return check


def _serve_metrics(port: int) -> None:
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    start_http_server(port, registry=registry)


async def _reconcile_forever(
    settings: Settings, deployment_ids: list[UUID], names: dict[UUID, str]
) -> None:
    from prefect.client.orchestration import get_client

    from worker.kernel.resume import reconcile_once

    while True:
        try:
            async with get_client() as client:
                report = await reconcile_once(
                    client,
                    deployment_ids,
                    max_attempts=settings.resume_max_attempts + 1,
                    flow_names=names,
                )
            if report.resumed or report.marked_crashed or report.gave_up:
                log.info(
                    "reconciled: crashed %s, resumed %s, gave up %s, released %d lease(s)",
                    [str(i) for i in report.marked_crashed],
                    [str(i) for i in report.resumed],
                    [str(i) for i in report.gave_up],
                    report.released_leases,
                )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("reconciling crashed runs failed; trying again")
        await asyncio.sleep(settings.reconcile_interval_seconds)


async def _stop_runner(runner: Any, runner_task: asyncio.Task[Any], settings: Settings) -> None:
    """Stop taking runs, give running ones the grace period, terminate the rest, stop."""
    # Prefect 3.8.8's Runner: `stopping` on the poller stops new submissions without
    # touching running processes (Runner.astop would mark them Cancelled, never resumed).
    poller = getattr(runner, "_scheduled_run_poller", None)
    if poller is not None:
        poller.stopping = True
    processes = runner._process_manager
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.shutdown_grace_seconds
    while processes.flow_run_ids() and loop.time() < deadline:
        await asyncio.sleep(0.2)
    for flow_run_id in processes.flow_run_ids():
        # Killed mid-step: it ends Crashed and the next reconciler pass (of any worker)
        # resumes it; its finished steps replay.
        handle = processes.get(flow_run_id)
        if handle is not None and handle.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.pid, signal.SIGKILL)
    deadline = loop.time() + 10
    while processes.flow_run_ids() and loop.time() < deadline:
        await asyncio.sleep(0.2)
    # Free the keys the killed runs held now, not when their leases expire.
    from prefect.client.orchestration import get_client

    from worker.kernel.resume import reconcile_once

    with contextlib.suppress(Exception):
        async with get_client() as client:
            await reconcile_once(client, [], max_attempts=settings.resume_max_attempts + 1)
    if not runner_task.done():
        with contextlib.suppress(Exception):
            await runner.astop()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(runner_task, 15)
