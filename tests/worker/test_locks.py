"""Several keys under one lease (``worker.kernel.locks.key_locks``): all or nothing, and each
key still excludes every other holder of it. Against the session's real Prefect server."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from worker.kernel.locks import held_keys, key_lock, key_locks


def _elsewhere(coro: Callable[[], Coroutine[Any, Any, None]]) -> threading.Thread:
    """Run ``coro`` on an event loop of its own (another caller: no shared local gates), with
    this context's Prefect settings (a bare thread would talk to an ephemeral API)."""
    context = contextvars.copy_context()
    thread = threading.Thread(target=lambda: context.run(asyncio.run, coro()), daemon=True)
    thread.start()
    return thread


def _keys(count: int) -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return [f"test:bulk:{tag}:{i}" for i in range(count)]


def test_bulk_holder_and_single_holders_never_overlap(prefect_api) -> None:
    """While a call holds keys a..e at once, a holder of c waits for it, a holder of an unrelated
    key does not; keys that did not exist yet are created (nothing runs unguarded)."""
    keys = _keys(5)
    other = _keys(1)[0]

    async def scenario() -> dict[str, float]:
        marks: dict[str, float] = {}
        bulk_in = threading.Event()

        def single(key: str, label: str) -> Callable[[], Coroutine[Any, Any, None]]:
            async def take() -> None:
                await asyncio.to_thread(bulk_in.wait, 60)
                async with key_lock(key):
                    marks[label] = time.monotonic()

            return take

        threads = [_elsewhere(single(keys[2], "same")), _elsewhere(single(other, "other"))]
        async with key_locks(keys) as held:
            assert {name for name, _ in held.limits} == set(keys)
            assert held_keys()[-1] is held
            bulk_in.set()
            # Held until the unrelated key was taken meanwhile (or 30 s passed).
            for _ in range(300):
                if "other" in marks:
                    break
                await asyncio.sleep(0.1)
            marks["bulk_out"] = time.monotonic()
        for thread in threads:
            await asyncio.to_thread(thread.join, 60)
        return marks

    marks = asyncio.run(scenario())

    assert marks["same"] >= marks["bulk_out"]
    assert marks["other"] < marks["bulk_out"]


def test_bulk_acquisition_is_all_or_nothing(prefect_api) -> None:
    """A bulk call whose keys are partly held waits without holding the free ones: a single
    caller takes a free key of the set meanwhile; the bulk call gets every key once all are
    free."""
    keys = _keys(3)

    async def scenario() -> dict[str, float]:
        marks: dict[str, float] = {}
        for key in keys:  # the limits exist: the wait is for the holder, not for creation
            async with key_lock(key):
                pass
        holding, free_taken = threading.Event(), threading.Event()

        async def holder() -> None:
            async with key_lock(keys[0]):
                holding.set()
                # Held until the free key of the set was taken meanwhile (or 30 s passed).
                await asyncio.to_thread(free_taken.wait, 30)
                marks["holder_out"] = time.monotonic()

        async def free_key() -> None:
            await asyncio.sleep(0.5)  # the bulk call waits by now
            async with key_lock(keys[1]):
                marks["free_in"] = time.monotonic()
                free_taken.set()

        threads = [_elsewhere(holder)]
        await asyncio.to_thread(holding.wait, 30)
        threads.append(_elsewhere(free_key))
        async with key_locks(keys):
            marks["bulk_in"] = time.monotonic()
        for thread in threads:
            await asyncio.to_thread(thread.join, 60)
        return marks

    marks = asyncio.run(scenario())

    assert marks["free_in"] < marks["holder_out"] <= marks["bulk_in"]
