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
local run record for crash detection, and run metrics.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, ParamSpec, TypeVar

from prefect import Flow, flow
from prefect.context import SyncClientContext
from pydantic import BaseModel, ValidationError

from worker.kernel import metrics, run_records
from worker.kernel.errors import InvalidParameterError, is_terminal
from worker.kernel.locks import key_lock
from worker.settings import worker_settings

__all__ = ["critical_section", "parse", "service_flow"]

P = ParamSpec("P")
R = TypeVar("R")
M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], **values: Any) -> M:
    """Validate a call's parameters; any problem is an ``InvalidParameterError`` naming them."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        problems = exc.errors(include_input=False, include_url=False)
        first = problems[0]
        name = ".".join(str(part) for part in first["loc"]) or "parameters"
        text = first["msg"]
        if len(problems) > 1:
            others = "; ".join(
                f"'{'.'.join(str(p) for p in err['loc'])}': {err['msg']}" for err in problems[1:]
            )
            text = f"{text} (also {others})"
        raise InvalidParameterError(name, text) from None


def service_flow(
    name: str, *, description: str | None = None
) -> Callable[[Callable[P, Awaitable[R]]], Flow[P, Awaitable[R]]]:
    """Declare a service call (one Prefect flow, deployed as ``<name>/ctrl``)."""

    def decorate(fn: Callable[P, Awaitable[R]]) -> Flow[P, Awaitable[R]]:
        @functools.wraps(fn)
        async def body(*args: P.args, **kwargs: P.kwargs) -> R:
            metrics.RUNS_STARTED.labels(flow=name).inc()
            # Steps are sync tasks: without a shared sync client Prefect builds one per step
            # call (TLS context and all), ~20 of the ~28 ms a step cost (bench/step_overhead).
            with run_records.run_record(), SyncClientContext.get_or_create():
                try:
                    result = await fn(*args, **kwargs)
                except BaseException as exc:
                    kind = "terminal" if is_terminal(exc) else "error"
                    metrics.RUNS_FAILED.labels(flow=name, kind=kind).inc()
                    raise
            metrics.RUNS_COMPLETED.labels(flow=name).inc()
            return result

        return flow(  # type: ignore[call-overload]
            body,
            name=name,
            description=description or (fn.__doc__ or "").strip().split("\n")[0] or None,
            persist_result=True,
            result_serializer="json",
            validate_parameters=False,
            retries=0,
            log_prints=False,
        )

    return decorate


@asynccontextmanager
async def critical_section(key: str) -> AsyncIterator[None]:
    """Hold the call's per-key lock (Restate's exclusive handler) for the block."""
    async with key_lock(key, lease_seconds=worker_settings().lock_lease_seconds):
        yield
