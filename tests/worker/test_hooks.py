"""Give-up hooks in-process: a call that ends without success runs its hook, exactly when it
should (SPEC §3: a call that gives up leaves its resource in a terminal state)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from tests.support.fixtures import step_log
from tests.support.kernel_flows import kernel_give_up
from worker.kernel.errors import InvalidParameterError, RefusedError


def _give_ups(url: str, tag: str) -> list[str]:
    return [row.note for row in step_log(url, tag) if row.step == "give_up"]


def test_a_terminal_error_runs_the_give_up_hook_with_the_reason(control_db):
    """A step refusing the call (terminal): the hook runs once, told why, before the call
    fails with the step's own error."""
    tag = f"hook-terminal-{uuid.uuid4().hex[:8]}"
    with pytest.raises(RefusedError, match="refused on purpose"):
        asyncio.run(kernel_give_up(tag=tag, fail="terminal"))
    (reason,) = _give_ups(control_db, tag)
    assert reason.startswith("RefusedError: refused on purpose")


def test_exhausted_retries_run_the_give_up_hook(control_db):
    """A retryable error whose step has no retries left ends the call: the hook runs."""
    tag = f"hook-retry-{uuid.uuid4().hex[:8]}"
    with pytest.raises(RuntimeError, match="retryable failure"):
        asyncio.run(kernel_give_up(tag=tag, fail="retryable"))
    (reason,) = _give_ups(control_db, tag)
    assert "RuntimeError" in reason


def test_a_refused_parameter_runs_no_hook(control_db):
    """A call refused at parameter validation accepted nothing: no hook, nothing written."""
    tag = f"hook-param-{uuid.uuid4().hex[:8]}"
    with pytest.raises(InvalidParameterError, match="fail"):
        asyncio.run(kernel_give_up(tag=tag, fail="sideways"))
    assert step_log(control_db, tag) == []


def test_a_successful_call_runs_no_hook(control_db):
    """Success is not a give-up: the hook never runs."""
    tag = f"hook-ok-{uuid.uuid4().hex[:8]}"
    assert asyncio.run(kernel_give_up(tag=tag)) == "done"
    assert _give_ups(control_db, tag) == []
