"""What the DeployService tests share: the local data plane running beside the test, settings
for fast deploys, and a module-scoped real worker (it registers the catalogue, so the calls a
deploy sends, like the standby of the previous live deployment, find their deployments)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.support.settings import changed_settings
from worker.dataplane import LocalDataPlane
from worker.settings import Settings

__all__ = ["deploy_settings", "running_dataplane"]


@contextmanager
def running_dataplane(
    url: str, regions: list[str], start_seconds: float = 0.0
) -> Iterator[LocalDataPlane]:
    """The local data plane (the real simulation) for ``regions``, in a thread of its own."""
    plane = LocalDataPlane(url, regions, start_seconds, poll_seconds=0.05)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(plane.run(stop))

    thread = threading.Thread(target=serve, name="test-dataplane", daemon=True)
    thread.start()
    try:
        yield plane
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)
        loop.close()


@contextmanager
def deploy_settings(**changes: Any) -> Iterator[Settings]:
    """This process's settings with fast deploy polling (and ``changes``) for the block."""
    update = {"deploy_poll_seconds": 0.05, "default_domain": "unkey.test", **changes}
    with changed_settings(**update) as updated:
        yield updated
