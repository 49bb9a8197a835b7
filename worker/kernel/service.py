"""How a service call is written: ``@service_flow``, ``parse`` and ``critical_section``.

::

    @service_flow("next_version")
    async def next_version(region: str) -> int:
        params = parse(RegionParams, region=region)          # bad input: terminal, nothing written
        async with critical_section(f"versioning:region:{params.region}"):
            return await take_version(params.region)          # durable steps

``service_flow`` is a Prefect flow with the worker's conventions: async (a sync flow costs ~1 s
of heartbeat-thread join), results persisted as JSON (so callers can wait for them), no
flow-level retries (steps retry; a terminal error must fail the call at once), parameters
validated by ``parse`` (so messages name the parameter the same way for every caller), a
local run record for crash detection, run metrics, and an optional give-up hook
(``worker.kernel.hooks``) run whenever the call ends without success.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, ParamSpec, TypeVar
from uuid import UUID

from prefect import Flow, flow
from prefect.context import FlowRunContext, SyncClientContext
from prefect.exceptions import Pause
from prefect.states import Cancelled
from pydantic import BaseModel, ValidationError

from worker.kernel import metrics, run_records
from worker.kernel.errors import InvalidParameterError, is_terminal
from worker.kernel.hooks import (
    CANCELLED_REASON,
    GIVE_UP_PREFIX,
    GIVE_UP_TAG,
    GaveUpError,
    GiveUpHook,
    register_give_up_hook,
)
from worker.kernel.locks import HeldKey, key_lock, key_locks
from worker.kernel.steps import register_tick_key, step
from worker.settings import worker_settings

__all__ = ["critical_section", "critical_sections", "parse", "service_flow"]

P = ParamSpec("P")
R = TypeVar("R")
M = TypeVar("M", bound=BaseModel)


def _message(error: Any) -> str:
    # A validator's own ValueError reads "Value error, <its message>": keep the message.
    return str(error["msg"]).removeprefix("Value error, ")


def parse(model: type[M], **values: Any) -> M:
    """Validate a call's parameters; any problem is an ``InvalidParameterError`` naming them.

    Raises:
        InvalidParameterError: a value is missing, of the wrong type or out of range.
    """
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        problems = exc.errors(include_input=False, include_url=False)
        first = problems[0]
        name = ".".join(str(part) for part in first["loc"]) or "parameters"
        text = _message(first)
        if len(problems) > 1:
            others = "; ".join(
                f"'{'.'.join(str(p) for p in err['loc'])}': {_message(err)}" for err in problems[1:]
            )
            text = f"{text} (also {others})"
        raise InvalidParameterError(name, text) from None


@step(name="give_up", key=("attempt",), retries=5)
def _run_give_up_hook(
    flow_name: str, attempt: int, parameters: dict[str, Any], reason: str
) -> None:
    from worker.kernel.hooks import give_up_hook

    hook = give_up_hook(flow_name)
    if hook is None:
        return
    # Parameters that never parsed: the call accepted nothing, so there is nothing to undo.
    with contextlib.suppress(InvalidParameterError):
        hook(parameters, reason)


async def _give_up_reason(flow_run_id: UUID) -> str:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        states = await client.read_flow_run_states(flow_run_id)
    for state in sorted(states, key=lambda s: s.timestamp, reverse=True):
        if state.message and state.message.startswith(GIVE_UP_PREFIX):
            return state.message.removeprefix(GIVE_UP_PREFIX)
    return "the worker gave up on this call"


def _attempt() -> int:
    ctx = FlowRunContext.get()
    return ctx.flow_run.run_count if ctx is not None and ctx.flow_run is not None else 0


async def _call_body(
    name: str, fn: Callable[..., Awaitable[Any]], has_hook: bool, *args: Any, **kwargs: Any
) -> Any:
    ctx = FlowRunContext.get()
    flow_run = ctx.flow_run if ctx is not None else None
    parameters = dict(inspect.signature(fn).bind_partial(*args, **kwargs).arguments)
    if flow_run is not None and GIVE_UP_TAG in (flow_run.tags or []):
        # The reconciler gave up on this run (or it was cancelled): run only the hook.
        reason = await _give_up_reason(flow_run.id)
        _run_give_up_hook(name, _attempt(), parameters, reason)
        metrics.RUNS_FAILED.labels(flow=name, kind="gave_up").inc()
        if reason == CANCELLED_REASON:
            return Cancelled(message=reason)
        raise GaveUpError(reason)
    try:
        return await fn(*args, **kwargs)
    except Pause:
        raise  # a durable sleep: the run is Scheduled again, nothing failed
    except BaseException as exc:
        kind = "terminal" if is_terminal(exc) else "error"
        metrics.RUNS_FAILED.labels(flow=name, kind=kind).inc()
        if has_hook and isinstance(exc, Exception) and not isinstance(exc, InvalidParameterError):
            _run_give_up_hook(name, _attempt(), parameters, f"{type(exc).__name__}: {exc}")
        raise


def service_flow(
    name: str,
    *,
    description: str | None = None,
    on_give_up: GiveUpHook | None = None,
    run_name: str | None = None,
    tick_key: str | None = None,
) -> Callable[[Callable[P, Awaitable[R]]], Flow[P, Awaitable[R]]]:
    """Declare a service call (one Prefect flow, deployed as ``<name>/ctrl``).

    Args:
        name: the flow's name (also its deployment's flow name).
        description: shown in the UI; defaults to the first line of the docstring.
        on_give_up: ``hook(parameters, reason)``, run whenever a call whose parameters were
            accepted ends without success (``worker.kernel.hooks``); must be idempotent.
        run_name: the flow run's name, a template over the parameters
            (``"deploy-{deployment_id}"``), so runs are found by the resource they act on.
        tick_key: for crons, the call key of a scheduled run as a template over its tick
            (``"scale-down-idle-{tick:%Y-%m-%dT%H:%M}"``; see ``steps.register_tick_key``).
    """
    if on_give_up is not None:
        register_give_up_hook(name, on_give_up)
    if tick_key is not None:
        register_tick_key(name, tick_key)

    def decorate(fn: Callable[P, Awaitable[R]]) -> Flow[P, Awaitable[R]]:
        @functools.wraps(fn)
        async def body(*args: P.args, **kwargs: P.kwargs) -> R:
            metrics.RUNS_STARTED.labels(flow=name).inc()
            # Steps are sync tasks: without a shared sync client Prefect builds one per step
            # call (TLS context and all), ~20 of the ~28 ms a step cost (bench/step_overhead).
            with run_records.run_record(), SyncClientContext.get_or_create():
                result: R = await _call_body(name, fn, on_give_up is not None, *args, **kwargs)
            metrics.RUNS_COMPLETED.labels(flow=name).inc()
            if tick_key is not None:  # a cron (worker.cron_watch)
                metrics.CRON_LAST_SUCCESS.labels(flow=name).set(time.time())
            return result

        return flow(  # type: ignore[call-overload]
            body,
            name=name,
            description=description or (fn.__doc__ or "").strip().split("\n")[0] or None,
            persist_result=True,
            result_serializer="json",
            validate_parameters=False,
            flow_run_name=run_name,
            retries=0,
            log_prints=False,
        )

    return decorate


@asynccontextmanager
async def critical_section(key: str) -> AsyncIterator[HeldKey]:
    """Hold the call's per-key lock (Restate's exclusive handler) for the block.

    Reads that guard a write inside the block must be done after the key is taken (again,
    after a resume or a durable sleep): use ``step(fresh=True)`` for them.
    """
    async with key_lock(key, lease_seconds=worker_settings().lock_lease_seconds) as held:
        yield held


@asynccontextmanager
async def critical_sections(keys: Sequence[str]) -> AsyncIterator[HeldKey]:
    """Hold several calls' per-key locks at once for the block (bulk work on many keys, e.g.
    a page of deployments put on standby): all of them or none, one lease
    (``worker.kernel.locks.key_locks``). Fresh reads inside follow the same rule as in
    ``critical_section``."""
    async with key_locks(keys, lease_seconds=worker_settings().lock_lease_seconds) as held:
        yield held
