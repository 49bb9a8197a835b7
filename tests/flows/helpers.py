"""What the service-flow tests share: calling a flow that must fail at once, and polling."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

E = TypeVar("E", bound=BaseException)

# A retried step backs off 1 + 2 + 4 + 8 + 16 s (+-20 %) before giving up: a call that fails
# well within this bound was not retried.
AT_ONCE_SECONDS = 15.0


def fails_at_once(error: type[E], flow: Callable[..., Awaitable[Any]], **params: Any) -> E:
    """Call ``flow`` in-process; it must raise ``error`` without retrying. Returns the error."""
    started = time.monotonic()
    with pytest.raises(error) as caught:
        asyncio.run(flow(**params))
    elapsed = time.monotonic() - started
    assert elapsed < AT_ONCE_SECONDS, f"{error.__name__} took {elapsed:.1f} s: was it retried?"
    return caught.value


async def poll_until(
    condition: Callable[[], Awaitable[bool]], timeout: float, what: str, interval: float = 0.25
) -> None:
    """Wait until ``condition()`` is true; fail the test with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)
