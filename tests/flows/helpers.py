"""What the service-flow tests share: calling a flow that must fail at once (no step
retried), and polling."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

E = TypeVar("E", bound=BaseException)


def _step_retries() -> float:
    """Every step retry counted in this process (``ctrl_step_retries_total``, all steps)."""
    from worker.kernel import metrics

    return sum(
        sample.value
        for family in metrics.STEP_RETRIES.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    )


def fails_at_once(error: type[E], flow: Callable[..., Awaitable[Any]], **params: Any) -> E:
    """Call ``flow`` in-process; it must raise ``error`` without any step being retried.

    Returns:
        The error raised.
    """
    retries_before = _step_retries()
    with pytest.raises(error) as caught:
        asyncio.run(flow(**params))
    retried = _step_retries() - retries_before
    assert retried == 0, f"{error.__name__} came after {retried:.0f} step retries"
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
