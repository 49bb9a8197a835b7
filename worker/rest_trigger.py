"""``ctrl-worker trigger`` without importing Prefect: the REST API and the event stream, direct.

Importing Prefect's client takes ~1.4 s, longer than a whole warm service call; a command
that starts one call and waits for it should not pay that. This module does what
``worker.client.trigger`` does with ``httpx`` and ``websockets`` only (both Prefect's own
dependencies): look up ``<flow>/ctrl``, create the flow run (idempotency key, delay), learn
of its end from the server's ``/events/out`` stream (with a poll fallback), and read a JSON
result from local result storage.

Whatever needs more raises ``NeedsPrefect`` and the command falls back to
``worker.client`` (never creating a second run): an idempotency key whose run must be
re-run (that is a compare-and-set under a key, ``worker.kernel.calls``), a server that wants
credentials, a result kept in a storage block (S3).
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

__all__ = ["NeedsPrefect", "Outcome", "trigger"]

_FINAL = {"COMPLETED", "FAILED", "CANCELLED"}
_RERUNNABLE = {"FAILED", "CRASHED", "CANCELLED"}
FALLBACK_POLL_SECONDS = 2.0
NO_STREAM_POLL_SECONDS = 0.25


class NeedsPrefect(Exception):
    """This call needs the full Prefect client; ``flow_run_id`` is set once a run exists."""

    def __init__(self, reason: str, flow_run_id: str | None = None) -> None:
        self.flow_run_id = flow_run_id
        super().__init__(reason)


@dataclass
class Outcome:
    """How a triggered run ended (or only its id, when not waited for)."""

    flow_run_id: str
    state_type: str | None = None
    state_name: str | None = None
    message: str = ""
    result: Any = None

    @property
    def completed(self) -> bool:
        return self.state_type == "COMPLETED"


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


async def _create(
    client: httpx.AsyncClient,
    flow_name: str,
    parameters: dict[str, Any],
    idempotency_key: str | None,
    scheduled_time: datetime | None,
) -> dict[str, Any]:
    from deployments import DEPLOYMENT_NAME
    from worker.kernel.errors import deployment_not_found

    full_name = f"{flow_name}/{DEPLOYMENT_NAME}"
    found = await client.get(f"/deployments/name/{full_name}")
    if found.status_code == 404:
        raise deployment_not_found(full_name)
    found.raise_for_status()
    body: dict[str, Any] = {"parameters": parameters, "idempotency_key": idempotency_key}
    if scheduled_time is not None:
        body["state"] = {
            "type": "SCHEDULED",
            "name": "Scheduled",
            "state_details": {"scheduled_time": _iso(scheduled_time)},
        }
    created = await client.post(f"/deployments/{found.json()['id']}/create_flow_run", json=body)
    created.raise_for_status()
    flow_run: dict[str, Any] = created.json()
    state = flow_run.get("state") or {}
    if idempotency_key and state.get("type") in _RERUNNABLE:
        raise NeedsPrefect("the key's run must be re-run", flow_run["id"])
    return flow_run


async def _watch_end(api_url: str, flow_run_id: str, ended: asyncio.Event) -> None:
    """Set ``ended`` on each state event of the run (legacy-mode socket: no auth on the API)."""
    import websockets

    now = datetime.now(UTC)
    filter = {
        "occurred": {
            "since": _iso(now - timedelta(minutes=1)),
            "until": _iso(now.replace(year=now.year + 1)),
        },
        "event": {"prefix": ["prefect.flow-run."]},
        "resource": {"id": [f"prefect.flow-run.{flow_run_id}"]},
    }
    url = api_url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
    async with websockets.connect(f"{url}/events/out") as socket:
        await socket.send(json.dumps({"type": "filter", "filter": filter}))
        async for raw in socket:
            message = json.loads(raw)
            event = message.get("event") or {}
            if (event.get("resource") or {}).get("prefect.state-type") in _FINAL:
                ended.set()


def _local_result(state: dict[str, Any], flow_run_id: str) -> Any:
    data = state.get("data")
    if isinstance(data, dict) and "storage_key" in data:
        if data.get("storage_block_id") or (data.get("serializer") or {}).get("type") != "json":
            raise NeedsPrefect("the result is kept in a storage block", flow_run_id)
        try:
            return json.loads(Path(data["storage_key"]).read_text())
        except OSError as exc:
            raise NeedsPrefect(f"result not readable here: {exc}", flow_run_id) from None
    return data


async def _wait(
    client: httpx.AsyncClient, api_url: str, flow_run_id: str, timeout: float | None
) -> Outcome:
    from worker.kernel.events import until_signalled

    ended = asyncio.Event()

    async def check() -> Outcome | None:
        response = await client.get(f"/flow_runs/{flow_run_id}")
        response.raise_for_status()
        state = response.json().get("state") or {}
        if state.get("type") not in _FINAL:
            return None
        result = _local_result(state, flow_run_id) if state["type"] == "COMPLETED" else None
        name, message = state.get("name"), state.get("message") or ""
        return Outcome(flow_run_id, state["type"], name, message, result)

    return await until_signalled(
        check,
        _watch_end(api_url, flow_run_id, ended),
        ended,
        # Without the event stream (a server that refuses the socket) poll briskly instead.
        poll_seconds=lambda stopped: NO_STREAM_POLL_SECONDS if stopped else FALLBACK_POLL_SECONDS,
        timeout=timeout,
        what=f"flow run {flow_run_id}",
    )


async def trigger(
    api_url: str,
    flow_name: str,
    parameters: dict[str, Any],
    *,
    idempotency_key: str | None = None,
    scheduled_time: datetime | None = None,
    wait: bool = False,
    timeout: float | None = None,
) -> Outcome:
    """Start a call of ``flow_name``; with ``wait``, wait for its end.

    Raises:
        NeedsPrefect: this call needs ``worker.client`` (see the module docstring).
        NotFoundError: no ``<flow_name>/ctrl`` deployment on the server.
        httpx.HTTPError: the Prefect API failed.
    """
    if os.environ.get("PREFECT_API_KEY") or os.environ.get("PREFECT_API_AUTH_STRING"):
        raise NeedsPrefect("the Prefect API wants credentials")
    async with httpx.AsyncClient(base_url=api_url, timeout=30.0) as client:
        flow_run = await _create(client, flow_name, parameters, idempotency_key, scheduled_time)
        if not wait:
            return Outcome(flow_run["id"])
        return await _wait(client, api_url, flow_run["id"], timeout)
