"""Durable steps: Restate's journaled ``restate.Run`` on Prefect.

A step is a Prefect task whose result is persisted under an explicit cache key::

    <flow name>:<call key>:<step name>[:<distinguishing inputs>]

The *call key* is the idempotency key the call was made with (``run_deployment(...,
idempotency_key=K)``, ``ctrl-worker trigger --idempotency-key K``), or the flow run id when it
had none. So a finished step is never executed again for the same call: a flow retry, a
resumption after the process was killed (the same flow run is rescheduled) and a new attempt
with the same idempotency key all find the record and replay its value.

Why not Prefect's stock policies: ``DEFAULT`` includes the run id (no replay on a new run),
``INPUTS`` collides across different tasks with equal arguments, ``TASK_SOURCE`` invalidates
every record on any code edit (../shared/reference/prefect-mechanics.md §2).

A step retries with exponential backoff and jitter for retryable errors only; a
``TerminalError`` fails it at once. A step interrupted mid-way runs again, so every step
must itself be idempotent (upserts, compare-and-set, provider-side idempotency).

Values a step returns are persisted as JSON: never return a secret from a step.
"""

from __future__ import annotations

import contextvars
import hashlib
import re
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, ParamSpec, TypeVar, overload

from prefect import Task, task
from prefect.cache_policies import CachePolicy
from prefect.client.schemas.objects import TaskRun
from prefect.context import FlowRunContext, TaskRunContext
from prefect.states import State

from worker.kernel import metrics
from worker.kernel.errors import is_terminal

__all__ = [
    "backoff_delays",
    "call_key",
    "call_subflow",
    "durable_call",
    "register_tick_key",
    "step",
    "step_cache_key",
]

P = ParamSpec("P")
R = TypeVar("R")

_CALL_KEY_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "ctrl_call_key", default=None
)

# Cache keys become file names in result storage (and S3 object names): no "/" (the
# filesystem lock manager cannot create subdirectories), and at most 200 characters.
_UNSAFE = re.compile(r"[^A-Za-z0-9._:=@+,-]")
_MAX_KEY = 200


@contextmanager
def durable_call(key: str) -> Iterator[None]:
    """Run flows called directly in this block under the call key ``key``.

    For in-process callers (tests, scripts, one flow calling another as a subflow) that want
    idempotency-key semantics without going through a deployment.
    """
    token = _CALL_KEY_OVERRIDE.set(key)
    try:
        yield
    finally:
        _CALL_KEY_OVERRIDE.reset(token)


async def call_subflow(
    flow: Callable[..., Awaitable[R]],
    call_id: str,
    *,
    idempotency_key: str | None = None,
    **parameters: Any,
) -> R:
    """Call another service's flow as a subflow of this call, under its own key.

    The subflow's steps are recorded under ``<this call's key>:<call_id>``, so when this call
    is resumed or retried the subflow (a new subflow run) replays its finished steps instead of
    doing them again: Restate's journaled call of another service.

    Args:
        flow: a service flow (``flows.routing.assign_frontline_routes``).
        call_id: what distinguishes this call from the call's other subflow calls
            (``"routing"``, ``"standby:<deployment id>"``).
        idempotency_key: record the subflow's steps under this key alone instead (Restate's
            call with an idempotency key: every caller using it gets the one call).
        **parameters: the flow's parameters.

    Returns:
        The subflow's result.
    """
    with durable_call(idempotency_key or f"{call_key()}:{call_id}"):
        return await flow(**parameters)


# Cron flows: the call key of a scheduled run, a template over its tick (``{tick:%Y-%m-%d}``).
_TICK_KEYS: dict[str, str] = {}
_SCHEDULER_KEY_PREFIX = "scheduled "  # Prefect's scheduler: "scheduled <dep> <schedule> <time>"


def register_tick_key(flow_name: str, template: str) -> None:
    """Key the scheduled runs of ``flow_name`` by their tick, as the original's crons were
    (``scale-down-idle-{tick:%Y-%m-%dT%H:%M}``): a manual call made with the same idempotency
    key as a tick replays that tick's steps instead of doing them again."""
    _TICK_KEYS[flow_name] = template


def call_key() -> str:
    """The key of the current call: override, the flow run's idempotency key (a cron tick's
    key for scheduled runs of a flow with a tick key), or its id."""
    override = _CALL_KEY_OVERRIDE.get()
    if override:
        return override
    flow_ctx = FlowRunContext.get()
    if flow_ctx is not None and flow_ctx.flow_run is not None:
        run = flow_ctx.flow_run
        template = _TICK_KEYS.get(flow_ctx.flow.name) if flow_ctx.flow is not None else None
        if template and (run.idempotency_key or "").startswith(_SCHEDULER_KEY_PREFIX):
            tick = run.expected_start_time or run.created
            if tick is not None:
                return template.format(tick=tick)
        if run.idempotency_key:
            return run.idempotency_key
        return str(run.id)
    task_ctx = TaskRunContext.get()
    if task_ctx is not None and task_ctx.task_run.flow_run_id is not None:
        return str(task_ctx.task_run.flow_run_id)
    raise RuntimeError("durable steps must run inside a flow run")


def _flow_name() -> str:
    flow_ctx = FlowRunContext.get()
    if flow_ctx is not None and flow_ctx.flow is not None:
        return flow_ctx.flow.name
    return "no-flow"


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text)


def step_cache_key(flow_name: str, key_of_call: str, step_name: str, parts: Sequence[Any]) -> str:
    """The record name of one step of one call (stable across code edits and processes)."""
    raw = ":".join([flow_name, key_of_call, step_name, *(str(p) for p in parts)])
    safe = _safe(raw)
    if len(safe) <= _MAX_KEY and safe == raw:
        return safe
    # Unsafe characters or too long: keep a readable prefix, make it unique with a hash of
    # the exact raw key (so "a/b" and "a_b" never share a record).
    digest = hashlib.sha256(raw.encode()).hexdigest()[:32]
    return f"{safe[: _MAX_KEY - 33]}~{digest}"


def backoff_delays(
    retries: int, first: float = 1.0, factor: float = 2.0, cap: float = 60.0
) -> list[float]:
    """Exponential backoff delays for ``retries`` attempts: first, first*factor, ... <= cap."""
    return [min(cap, first * factor**i) for i in range(retries)]


def _retry_only_retryable(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as raised:
            exc = raised
    if exc is not None and is_terminal(exc):
        return False
    metrics.STEP_RETRIES.labels(step=task.name).inc()
    return True


def _key_fn(
    step_name: str,
    key_params: tuple[str, ...],
    fresh: bool,
    ctx: TaskRunContext,
    params: dict[str, Any],
) -> str:
    parts = [params.get(name) for name in key_params]
    if fresh:
        # One record per holding of the call's key: after a resume or a durable sleep the key
        # is taken again (a new lease) and the read runs again.
        from worker.kernel.locks import held_keys

        held = held_keys()
        parts.append(f"lease={held[-1].lease_id}" if held else "unlocked")
    return step_cache_key(_flow_name(), call_key(), step_name, parts)


@overload
def step(fn: Callable[P, R]) -> Task[P, R]: ...


@overload
def step(
    fn: None = None,
    *,
    name: str | None = None,
    key: Sequence[str] = (),
    retries: int = 5,
    retry_delay: float = 1.0,
    retry_backoff: float = 2.0,
    retry_max_delay: float = 60.0,
    timeout_seconds: float | None = None,
    fresh: bool = False,
    run_name: str | None = None,
) -> Callable[[Callable[P, R]], Task[P, R]]: ...


def step(
    fn: Callable[P, R] | None = None,
    *,
    name: str | None = None,
    key: Sequence[str] = (),
    retries: int = 5,
    retry_delay: float = 1.0,
    retry_backoff: float = 2.0,
    retry_max_delay: float = 60.0,
    timeout_seconds: float | None = None,
    fresh: bool = False,
    run_name: str | None = None,
) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
    """Make ``fn`` a durable step (a Prefect task with a persisted, keyed result).

    Args:
        fn: the function doing one side effect, or one read whose value must not change on
            replay. Sync or async.
        name: the step name in the key and the UI; defaults to the function name.
        key: names of the parameters that distinguish repeated calls of this step within one
            call (for example ``("region",)`` for a step run once per region).
        retries: attempts after the first, for retryable errors only.
        retry_delay: the first backoff delay in seconds (then times ``retry_backoff``, capped).
        retry_backoff: the backoff factor.
        retry_max_delay: the longest delay between two attempts.
        timeout_seconds: fail an attempt that takes longer (then retry it).
        fresh: a read that guards a write: recorded once per holding of the call's key, so
            it runs again after the key is re-taken (a resume, a durable sleep) instead of
            replaying a value the world may have moved past.
        run_name: the task run's name in the UI, a template over the parameters
            (``"wait for instances in {region}"``), so a run reads like the original's journal.

    Returns:
        A Prefect task; call it inside a flow like the function.
    """

    def decorate(func: Callable[P, R]) -> Task[P, R]:
        step_name = name or func.__name__
        missing = [
            p
            for p in key
            if p
            not in func.__code__.co_varnames[
                : func.__code__.co_argcount + func.__code__.co_kwonlyargcount
            ]
        ]
        if missing:
            raise TypeError(f"step {step_name!r}: key names unknown parameters {missing}")
        policy = CachePolicy.from_cache_key_fn(partial(_key_fn, step_name, tuple(key), fresh))
        return task(  # type: ignore[call-overload]
            func,
            name=step_name,
            cache_policy=policy,
            persist_result=True,
            result_serializer="json",
            retries=retries,
            retry_delay_seconds=backoff_delays(retries, retry_delay, retry_backoff, retry_max_delay)
            or 0,
            retry_jitter_factor=0.2 if retries else None,
            retry_condition_fn=_retry_only_retryable,
            timeout_seconds=timeout_seconds,
            task_run_name=run_name,
            log_prints=False,
        )

    if fn is not None:
        return decorate(fn)
    return decorate
