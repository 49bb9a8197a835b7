"""The ``ctrl-warm`` worker type: runs a ``process`` work pool's runs in forked, warm children.

A Prefect worker type through the public plugin interface (``prefect.workers.base.BaseWorker``,
registered by the project's ``prefect.collections`` entry point), chosen over patching the
Runner's internals because claiming and starting runs needs no private Prefect name (the one
optional speed-up that does lives in ``worker.prefect_private``): BaseWorker claims each run with
the stock state machine (Scheduled -> Pending -> Running, the server's ``FOR UPDATE`` check
keeps two workers off one run), and this class only decides how a claimed run starts:

- **warm**: a fork server (``worker.dispatch.forkserver``) preloaded with Prefect and every
  flow module forks one child per run (~0.2 s of CPU instead of ~2 s for a new interpreter);
- **pushed**: the server's flow-run events (``worker.dispatch.push``) start a run when it
  becomes due instead of at the next poll; the poll stays as the fallback;
- **tracked**: each child by pidfd and its own exit report, so a dead fork server never makes
  a live run look crashed (it is re-warmed at once) and a SIGKILLed child is ``Crashed``;
- **cancellable**: a ``Cancelling`` run's process group is killed and the run marked
  ``Cancelled`` (no ``Crashed``, so it is not resumed).

The pool stays of type ``process``: ``prefect deploy`` and a stock ``prefect worker start
--pool ctrl`` work unchanged next to it (the stock one is just slower).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

import anyio
import anyio.abc
from prefect.exceptions import InfrastructureNotFound
from prefect.workers.base import BaseWorker, BaseWorkerResult
from prefect.workers.process import ProcessJobConfiguration, ProcessVariables
from pydantic import PrivateAttr

from worker import prefect_private
from worker.dispatch.forkserver import Child, ForkServer

if TYPE_CHECKING:
    from prefect.client.schemas.objects import Flow as APIFlow
    from prefect.client.schemas.objects import FlowRun, WorkPool
    from prefect.client.schemas.responses import DeploymentResponse

__all__ = ["WORKER_TYPE", "WarmJobConfiguration", "WarmProcessWorker", "WarmWorkerResult"]

WORKER_TYPE = "ctrl-warm"
# Modules every child needs: the engine and what it imports while running a flow.
ENGINE_MODULES = (
    "prefect.flow_engine",
    "prefect.task_engine",
    "prefect.engine",
    "prefect.deployments.steps.core",
    "prefect.deployments.steps.pull",
    "prefect.events.worker",
    "prefect.logging.handlers",
    "worker.dispatch.child",
)
log = logging.getLogger("ctrl.worker.dispatch")


class WarmJobConfiguration(ProcessJobConfiguration):
    """The ``process`` pool's job configuration, plus what a child needs from the deployment."""

    _entrypoint: str | None = PrivateAttr(default=None)
    _pull_steps: list[dict[str, Any]] = PrivateAttr(default_factory=list)

    @classmethod
    async def resolve_for_flow_run(
        cls,
        flow_run: FlowRun,
        *,
        client: Any,
        work_pool: WorkPool,
        worker_name: str,
        worker_id: UUID | None = None,
        deployment: DeploymentResponse | None = None,
    ) -> WarmJobConfiguration:
        """As the process worker's, with the deployment read at most once per few seconds."""
        if deployment is None and flow_run.deployment_id is not None:
            deployment = await _DEPLOYMENTS.read(client, flow_run.deployment_id)
        return await super().resolve_for_flow_run(
            flow_run,
            client=client,
            work_pool=work_pool,
            worker_name=worker_name,
            worker_id=worker_id,
            deployment=deployment,
        )

    def prepare_for_flow_run(
        self,
        flow_run: FlowRun,
        deployment: DeploymentResponse | None = None,
        flow: APIFlow | None = None,
        work_pool: WorkPool | None = None,
        worker_name: str | None = None,
        worker_id: UUID | None = None,
    ) -> None:
        """Prepare as the process worker does; keep the entrypoint and the pull steps."""
        super().prepare_for_flow_run(flow_run, deployment, flow, work_pool, worker_name, worker_id)
        if deployment is not None:
            self._entrypoint = deployment.entrypoint
            self._pull_steps = list(deployment.pull_steps or [])


class WarmWorkerResult(BaseWorkerResult):
    """The exit of one child (``status_code`` 0 unless the engine itself failed)."""


class WarmProcessWorker(BaseWorker[WarmJobConfiguration, ProcessVariables, WarmWorkerResult]):
    """Runs each claimed flow run in a child forked from a warm fork server."""

    type = WORKER_TYPE
    job_configuration = WarmJobConfiguration
    job_configuration_variables = ProcessVariables
    _description = (
        "Runs a process pool's flow runs in children forked from a pre-imported fork server, "
        "started by the server's events (ctrl-worker)."
    )
    _display_name = "Warm process (ctrl-worker)"

    def __init__(
        self,
        work_pool_name: str,
        *args: Any,
        preload: Sequence[str] = (),
        fallback_poll_seconds: float = 2.0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("prefetch_seconds", 1)
        super().__init__(work_pool_name, *args, **kwargs)
        self.prefetch_seconds = float(self.get_status()["settings"]["prefetch_seconds"])
        self.forkserver = ForkServer([*ENGINE_MODULES, *preload, *_default_preload()])
        self.fallback_poll_seconds = fallback_poll_seconds
        self.children: dict[UUID, Child] = {}
        self._entrypoints: dict[UUID, str] = {}
        self._cancelled: set[UUID] = set()
        self._claiming = True
        self._kick = asyncio.Event()
        self._pushed: set[UUID] = set()
        self._background: list[asyncio.Task[None]] = []
        self._settings_env: dict[str, str] = {}
        self._label_tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    async def setup(self) -> None:
        """Warm the fork server, sync with the pool, start the push watcher and the polls."""
        warming = asyncio.create_task(asyncio.to_thread(self.forkserver.start))
        from prefect.settings import get_current_settings

        # The job environment repeats the worker's settings as variables (BaseJobConfiguration
        # adds them), spelled differently from the environment they came from: they are what
        # the fork server already runs with, so they must not make a child rebuild settings.
        self._settings_env = get_current_settings().to_environment_variables(exclude_unset=True)
        await super().setup()
        await warming
        from worker.dispatch.push import watch_pool_runs

        loop = asyncio.get_running_loop()
        self._kick = asyncio.Event()
        self._background = [
            loop.create_task(self._kicked_polls(), name="ctrl-warm-polls"),
            loop.create_task(self._rewarm_forkserver(), name="ctrl-warm-forkserver"),
            loop.create_task(
                watch_pool_runs(self._pool_id, self.on_due, self.on_cancelling),
                name="ctrl-warm-push",
            ),
        ]

    async def teardown(self, *exc_info: Any) -> None:
        """Stop the background tasks and the fork server (children keep running)."""
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._background = []
        await asyncio.to_thread(self.forkserver.stop)
        await super().teardown(*exc_info)

    @property
    def _pool_id(self) -> UUID | None:
        try:
            return self.work_pool.id
        except RuntimeError:  # not synced with the pool yet
            return None

    def stop_claiming(self) -> None:
        """Take no new runs from now on (graceful shutdown); running children go on."""
        self._claiming = False

    async def get_and_submit_flow_runs(self) -> list[FlowRun]:
        """Claim due runs of the pool (none once ``stop_claiming`` was called)."""
        if not self._claiming:
            return []
        return await super().get_and_submit_flow_runs()

    # -- push ----------------------------------------------------------------------------------

    def on_due(self, flow_run_id: UUID, scheduled_time: datetime | None) -> None:
        """A run of the pool became Scheduled: poll now, or when it is due."""
        delay = 0.0
        if scheduled_time is not None:
            delay = scheduled_time.timestamp() - time.time() - self.prefetch_seconds
        if delay > 0.05:
            asyncio.get_running_loop().call_later(delay, self._push, flow_run_id)
        else:
            self._push(flow_run_id)

    def _push(self, flow_run_id: UUID) -> None:
        self._pushed.add(flow_run_id)
        self._kick.set()

    async def _kicked_polls(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self.fallback_poll_seconds)
            self._kick.clear()
            pushed, self._pushed = self._pushed, set()
            try:
                for attempt in range(4):
                    claimed = {run.id for run in await self.get_and_submit_flow_runs()}
                    # The server publishes a run's event inside the transaction that creates
                    # it: a poll right after the event can miss the run. Look again shortly.
                    if not pushed - claimed - set(self.children) or attempt == 3:
                        break
                    await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("polling the pool for runs failed; the next poll retries")

    async def on_cancelling(self, flow_run_id: UUID) -> None:
        """A run of ours is Cancelling: kill its process group, then end it.

        A flow with a give-up hook gets one more attempt that runs only the hook and ends
        Cancelled (``worker.kernel.hooks``); any other run is marked Cancelled at once.
        """
        child = self.children.get(flow_run_id)
        if child is None:
            return
        from prefect.states import AwaitingRetry, Cancelled

        from worker.kernel.hooks import (
            CANCELLED_REASON,
            GIVE_UP_PREFIX,
            GIVE_UP_TAG,
            has_give_up_hook,
        )

        self._cancelled.add(flow_run_id)
        child.kill_group()
        try:
            if has_give_up_hook(_flow_name(self._entrypoints.get(flow_run_id))):
                run = await self.client.read_flow_run(flow_run_id)
                await self.client.update_flow_run(flow_run_id, tags=[*run.tags, GIVE_UP_TAG])
                state: Any = AwaitingRetry(message=GIVE_UP_PREFIX + CANCELLED_REASON)
            else:
                state = Cancelled(message="cancelled: the worker killed the run's processes")
            await self.client.set_flow_run_state(flow_run_id, state, force=True)
        except Exception:
            log.exception("could not end the cancelled flow run %s", flow_run_id)

    async def _rewarm_forkserver(self) -> None:
        # A dead fork server would make the next run pay the whole warm-up (2-4 s): restart
        # it as soon as it is seen gone. Its children are unaffected (own sessions, pidfds).
        while True:
            await asyncio.sleep(0.5)
            if not self.forkserver.alive():
                log.warning("the fork server died: re-warming it")
                try:
                    await asyncio.to_thread(self.forkserver.start)
                except Exception:
                    log.exception("re-warming the fork server failed; retrying")

    # -- running one flow run ------------------------------------------------------------------

    async def run(
        self,
        flow_run: FlowRun,
        configuration: WarmJobConfiguration,
        task_status: anyio.abc.TaskStatus[int] | None = None,
    ) -> WarmWorkerResult:
        """Fork a child for ``flow_run`` and wait for it to exit.

        Returns:
            The child's exit code (0 when the engine handled the outcome; 0 as well when the
            run was cancelled by this worker, so that it is not reported Crashed).
        """
        entrypoint = configuration._entrypoint or os.environ.get("PREFECT__FLOW_ENTRYPOINT")
        if not entrypoint:
            raise ValueError(f"flow run {flow_run.id} has no deployment entrypoint to run")
        payload = {
            "flow_run": flow_run.model_dump(mode="json"),
            "env": self.forkserver.env_diff(configuration.env, self._settings_env),
            "entrypoint": entrypoint,
            "pull_steps": configuration._pull_steps,
            "cwd": str(configuration.working_dir) if configuration.working_dir else None,
        }
        child = await asyncio.to_thread(self.forkserver.spawn, payload)
        self.children[flow_run.id] = child
        self._entrypoints[flow_run.id] = entrypoint
        if task_status is not None:
            task_status.started(child.pid)
        try:
            await _wait_exit(child)
            code = child.exit_code()
        finally:
            self.children.pop(flow_run.id, None)
            self._entrypoints.pop(flow_run.id, None)
            child.close()
            self._kick.set()  # a slot is free: take the next due run now
        if flow_run.id in self._cancelled:
            self._cancelled.discard(flow_run.id)
            code = 0
        return WarmWorkerResult(identifier=str(child.pid), status_code=code)

    if prefect_private.available(prefect_private.LABELS_METHOD):

        async def _give_worker_labels_to_flow_run(self, flow_run_id: UUID) -> None:
            # Labels are for the UI only: send them off the run's critical path.
            parent = super()._give_worker_labels_to_flow_run
            task = asyncio.get_running_loop().create_task(parent(flow_run_id))
            self._label_tasks.add(task)
            task.add_done_callback(self._label_tasks.discard)

    async def kill_infrastructure(
        self,
        infrastructure_pid: str,
        configuration: WarmJobConfiguration,
        grace_seconds: int = 30,
    ) -> None:
        """Kill the process group of one of this worker's children.

        Raises:
            InfrastructureNotFound: no child of this worker has that pid.
        """
        for flow_run_id, child in list(self.children.items()):
            if str(child.pid) == str(infrastructure_pid):
                self._cancelled.add(flow_run_id)
                child.kill_group()
                return
        raise InfrastructureNotFound(f"no flow-run process {infrastructure_pid} on this worker")


async def _wait_exit(child: Child) -> None:
    """Until the child has exited: its pidfd is readable (or, without one, its pipe closed)."""
    fd = child.pidfd if child.pidfd is not None else child.status_fd
    if fd is None or fd < 0:
        return
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def exited() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(fd, exited)
    try:
        await done
    finally:
        loop.remove_reader(fd)


class _DeploymentCache:
    """Deployments read within the last ``ttl`` seconds (an update shows within that time)."""

    def __init__(self, ttl: float = 10.0) -> None:
        self.ttl = ttl
        self._entries: dict[UUID, tuple[float, Any]] = {}

    async def read(self, client: Any, deployment_id: UUID) -> Any:
        now = time.monotonic()
        cached = self._entries.get(deployment_id)
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        deployment = await client.read_deployment(deployment_id)
        self._entries[deployment_id] = (now, deployment)
        return deployment


_DEPLOYMENTS = _DeploymentCache()


def _flow_name(entrypoint: str | None) -> str:
    """The name of the flow at ``entrypoint`` ("" when it cannot be loaded here)."""
    if not entrypoint:
        return ""
    from worker.dispatch.child import resolve_flow

    try:
        return str(resolve_flow(entrypoint).name)
    except Exception:
        return ""


def _default_preload() -> list[str]:
    """The flow modules of the catalogue (imported by the fork server, not here)."""
    from deployments import CATALOGUE

    return [spec.module for spec in CATALOGUE]
