"""Health endpoints (the original's pkg/runner semantics) on ``UNKEY_HTTP_PORT``.

- ``/health/live`` and ``/health/startup``: 503 ``{"status":"not started"}`` until the worker
  has started, then 200 ``{"status":"ok"}``.
- ``/health/ready``: 503 while starting or shutting down; otherwise every check runs in
  parallel with a 500 ms timeout, giving 200 or 503 ``{"status":"fail","checks":{...}}``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

__all__ = ["CHECK_TIMEOUT_SECONDS", "HealthState", "health_app", "serve_health"]

CHECK_TIMEOUT_SECONDS = 0.5

Check = Callable[[], Awaitable[None]]


@dataclass
class HealthState:
    started: bool = False
    shutting_down: bool = False
    checks: dict[str, Check] = field(default_factory=dict)

    async def run_checks(self) -> dict[str, str]:
        async def one(check: Check) -> str:
            try:
                await asyncio.wait_for(check(), CHECK_TIMEOUT_SECONDS)
            except TimeoutError:
                return f"timeout after {CHECK_TIMEOUT_SECONDS * 1000:.0f} ms"
            except Exception as exc:  # a failing check is a result, not a crash
                return f"{type(exc).__name__}: {exc}"[:300]
            return "ok"

        names = list(self.checks)
        results = await asyncio.gather(*(one(self.checks[name]) for name in names))
        return dict(zip(names, results, strict=True))


def health_app(state: HealthState) -> Starlette:
    """The ASGI app serving the three endpoints."""

    async def live(_: Request) -> JSONResponse:
        if not state.started:
            return JSONResponse({"status": "not started"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def ready(_: Request) -> JSONResponse:
        if state.shutting_down:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if not state.started:
            return JSONResponse({"status": "not started"}, status_code=503)
        results = await state.run_checks()
        if all(value == "ok" for value in results.values()):
            return JSONResponse({"status": "ok", "checks": results})
        return JSONResponse({"status": "fail", "checks": results}, status_code=503)

    return Starlette(
        routes=[
            Route("/health/live", live),
            Route("/health/startup", live),
            Route("/health/ready", ready),
        ]
    )


async def serve_health(state: HealthState, port: int, host: str = "0.0.0.0") -> uvicorn.Server:
    """Start serving; returns the server (``should_exit = True`` stops it)."""
    config = uvicorn.Config(
        health_app(state), host=host, port=port, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    # The worker handles SIGTERM/SIGINT itself; uvicorn must not install its handlers.
    serving = asyncio.get_running_loop().create_task(server._serve())
    while not server.started:
        if serving.done():
            serving.result()
            raise RuntimeError(f"the health server could not listen on {host}:{port}")
        await asyncio.sleep(0.02)
    return server
