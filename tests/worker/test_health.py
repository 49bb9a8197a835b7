"""Health endpoints: the original's pkg/runner semantics."""

from __future__ import annotations

import asyncio

from starlette.testclient import TestClient

from worker.health import HealthState, health_app


def _client(state: HealthState) -> TestClient:
    return TestClient(health_app(state))


def test_not_started_is_503_everywhere():
    """Until the worker has started, live, startup and ready all answer 503."""
    client = _client(HealthState())
    for path in ("/health/live", "/health/startup", "/health/ready"):
        response = client.get(path)
        assert response.status_code == 503
        assert response.json() == {"status": "not started"}


def test_started_with_passing_checks_is_200():
    """Once started, live is 200 and ready runs the checks and reports each."""

    async def ok() -> None:
        return None

    client = _client(HealthState(started=True, checks={"database": ok, "prefect": ok}))
    assert client.get("/health/live").json() == {"status": "ok"}
    ready = client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "prefect": "ok"}


def test_a_failing_or_slow_check_makes_ready_503_with_the_reason():
    """A check that raises or exceeds 500 ms fails readiness; the others still report."""

    async def ok() -> None:
        return None

    async def broken() -> None:
        raise ConnectionError("database is down")

    async def slow() -> None:
        await asyncio.sleep(5)

    client = _client(HealthState(started=True, checks={"a": ok, "b": broken, "c": slow}))
    ready = client.get("/health/ready")
    assert ready.status_code == 503
    body = ready.json()
    assert body["status"] == "fail"
    assert body["checks"]["a"] == "ok"
    assert "database is down" in body["checks"]["b"]
    assert body["checks"]["c"].startswith("timeout")


def test_shutting_down_is_not_ready_but_alive():
    """While shutting down, ready is 503 (no new traffic) and live stays 200."""
    client = _client(HealthState(started=True, shutting_down=True))
    assert client.get("/health/ready").json() == {"status": "shutting down"}
    assert client.get("/health/ready").status_code == 503
    assert client.get("/health/live").status_code == 200
