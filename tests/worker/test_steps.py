"""Durable steps: record names, retries for retryable errors only, terminal errors at once."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from worker.kernel.errors import InvalidParameterError, NotFoundError, RetryableError
from worker.kernel.service import service_flow
from worker.kernel.steps import backoff_delays, durable_call, step, step_cache_key

ATTEMPTS: dict[str, int] = {}


@step(retries=3, retry_delay=0.01)
def flaky(tag: str, failures: int) -> str:
    ATTEMPTS[tag] = ATTEMPTS.get(tag, 0) + 1
    if ATTEMPTS[tag] <= failures:
        raise RetryableError(f"transient failure {ATTEMPTS[tag]}")
    return f"ok after {ATTEMPTS[tag]}"


@step(retries=3, retry_delay=0.01)
def refuses(tag: str) -> str:
    ATTEMPTS[tag] = ATTEMPTS.get(tag, 0) + 1
    raise NotFoundError(f"row '{tag}' not found")


@step(key=("region",), retries=0)
def per_region(tag: str, region: str) -> str:
    ATTEMPTS[f"{tag}:{region}"] = ATTEMPTS.get(f"{tag}:{region}", 0) + 1
    return region


@service_flow("test_steps_flaky")
async def flaky_flow(tag: str, failures: int) -> str:
    return flaky(tag, failures)


@service_flow("test_steps_refuses")
async def refusing_flow(tag: str) -> str:
    return refuses(tag)


@service_flow("test_steps_regions")
async def regions_flow(tag: str, regions: list[str]) -> list[str]:
    return [per_region(tag, region) for region in regions]


def test_retryable_errors_are_retried_with_backoff(prefect_api):
    """A step failing with a retryable error is attempted again until it succeeds."""
    tag = uuid.uuid4().hex
    assert asyncio.run(flaky_flow(tag=tag, failures=2)) == "ok after 3"
    assert ATTEMPTS[tag] == 3


def test_retries_are_bounded(prefect_api):
    """A step that keeps failing gives up after its retries, with the last error."""
    tag = uuid.uuid4().hex
    with pytest.raises(RetryableError, match="transient failure 4"):
        asyncio.run(flaky_flow(tag=tag, failures=10))
    assert ATTEMPTS[tag] == 4


def test_terminal_errors_fail_at_once(prefect_api):
    """A terminal error is never retried: one attempt, and the call fails with its message."""
    tag = uuid.uuid4().hex
    with pytest.raises(NotFoundError, match=f"row '{tag}' not found"):
        asyncio.run(refusing_flow(tag=tag))
    assert ATTEMPTS[tag] == 1


def test_key_inputs_distinguish_repeated_steps_and_replay(prefect_api):
    """One step called per region runs once per region, and replays per region."""
    tag = uuid.uuid4().hex
    with durable_call(f"regions-{tag}"):
        assert asyncio.run(regions_flow(tag=tag, regions=["a", "b"])) == ["a", "b"]
    with durable_call(f"regions-{tag}"):
        assert asyncio.run(regions_flow(tag=tag, regions=["a", "b", "c"])) == ["a", "b", "c"]
    assert [ATTEMPTS[f"{tag}:{r}"] for r in "abc"] == [1, 1, 1]


def test_cache_keys_are_safe_file_names_and_distinct():
    """Record names never contain '/', stay short, and unsafe inputs never collide."""
    plain = step_cache_key("f", "k", "s", ["us-east-1"])
    assert plain == "f:k:s:us-east-1"
    slash = step_cache_key("f", "a/b", "s", [])
    underscore = step_cache_key("f", "a_b", "s", [])
    assert "/" not in slash and slash != underscore
    long = step_cache_key("f", "x" * 500, "s", [])
    assert len(long) <= 200
    assert long != step_cache_key("f", "x" * 499, "s", [])


def test_backoff_grows_and_is_capped():
    """Retry delays double from the first and never exceed the cap."""
    assert backoff_delays(5, first=1, factor=2, cap=5) == [1, 2, 4, 5, 5]
    assert backoff_delays(0) == []


def test_step_key_must_name_parameters():
    """A typo in a step's key names is caught when the module is imported, not at run time."""
    with pytest.raises(TypeError, match="unknown parameters"):

        @step(key=("regoin",))
        def typo(region: str) -> str:
            return region


def test_invalid_parameter_error_names_the_parameter_and_pickles():
    """Terminal errors cross process boundaries (Prefect pickles exceptions) intact."""
    import pickle

    error = pickle.loads(pickle.dumps(InvalidParameterError("region", "must not be empty")))
    assert str(error) == "invalid parameter 'region': must not be empty"


def test_scheduled_runs_of_a_cron_are_keyed_by_their_tick(monkeypatch) -> None:
    """A cron flow's scheduled run (Prefect's scheduler key, ``scheduled <dep> <schedule>
    <time>``) gets the call key of its tick (``scale-down-idle-<YYYY-MM-DDTHH:MM>``), so a
    manual call with that idempotency key replays the tick's steps; other runs keep their own
    idempotency key, and a run without one its id."""
    from datetime import UTC, datetime
    from types import SimpleNamespace

    from prefect.context import FlowRunContext

    from worker.kernel.steps import call_key, register_tick_key

    register_tick_key("test_tick_cron", "tick-{tick:%Y-%m-%dT%H:%M}")
    tick = datetime(2026, 12, 2, 5, 15, tzinfo=UTC)

    def context(flow_name: str, idempotency_key: str | None) -> SimpleNamespace:
        run = SimpleNamespace(
            id=uuid.UUID(int=7), idempotency_key=idempotency_key, expected_start_time=tick
        )
        return SimpleNamespace(flow_run=run, flow=SimpleNamespace(name=flow_name))

    cases = [
        ("test_tick_cron", "scheduled d1 s1 2026-12-02 05:15:00+00:00", "tick-2026-12-02T05:15"),
        ("test_tick_cron", "manual-key", "manual-key"),
        ("another_flow", "scheduled d1 s1 2026-12-02 05:15:00+00:00", None),
        ("test_tick_cron", None, str(uuid.UUID(int=7))),
    ]
    for flow_name, key, expected in cases:
        current = context(flow_name, key)
        monkeypatch.setattr(FlowRunContext, "get", classmethod(lambda cls, c=current: c))
        assert call_key() == (expected if expected is not None else key)
