"""The client for API-triggered runs: how the control API calls the worker.

One typed async function per service call. Each creates a flow run of the call's deployment
(``<flow>/ctrl``) through the Prefect API::

    run_id = await next_version("us-east-1.aws", idempotency_key=request_id)      # fire and forget
    version = await next_version("us-east-1.aws", wait=True)                       # the result

Idempotency (Restate's ingress idempotency key): the same key returns the same flow run, and
its parameters are those of the first call. If that run ended ``Failed``, ``Crashed`` or
``Cancelled``, calling again with the key runs it again (a new attempt of the same flow run):
its finished steps replay from their records, only the rest executes.

``wait=True`` returns the flow's result or raises ``FlowRunFailed`` with the run's message.
``scheduled_time`` delays the start (Restate's delayed send).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any
from uuid import UUID

from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.objects import FlowRun, StateType

from worker import prefect_env
from worker.kernel.calls import submit_call
from worker.kernel.errors import CtrlError
from worker.kernel.events import until_signalled, watch_events
from worker.settings import load_settings

__all__ = [
    "FlowRunFailed",
    "add_custom_domain",
    "assign_frontline_routes",
    "change_desired_state",
    "clear_scheduled_state_changes",
    "configure_clickhouse_user",
    "connect",
    "delete_custom_domain",
    "deploy",
    "get_version",
    "next_version",
    "process_challenge",
    "promote",
    "renew_expiring_certificates",
    "retry_verification",
    "rollback",
    "run_key_refill",
    "run_quota_check",
    "scale_down_idle_preview_deployments",
    "schedule_desired_state_change",
    "submit",
    "trigger",
    "verify_domain",
    "wait_for_result",
]

# A Crashed run is not final for a caller: the reconciler resumes it (or gives up: Failed).
_FINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED}
FALLBACK_POLL_SECONDS = 2.0


class FlowRunFailed(CtrlError):
    """A waited-for run ended without completing; the message is the run's own."""

    def __init__(self, flow_run_id: UUID, state_name: str, message: str) -> None:
        self.flow_run_id = flow_run_id
        self.state_name = state_name
        super().__init__(f"flow run {flow_run_id} ended {state_name}: {message}")


@asynccontextmanager
async def connect() -> AsyncIterator[PrefectClient]:
    """A Prefect client for ``PREFECT_API_URL``, or, when it is unset, for the worker's local
    server found under the state directory (SPEC §2.2: no configuration needed)."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        temporary_settings,
    )

    if PREFECT_API_URL.value():
        async with get_client() as client:
            yield client
        return
    settings = load_settings()
    api_url = prefect_env.resolve_api_url(settings)
    with temporary_settings(
        updates={
            PREFECT_API_URL: api_url,
            PREFECT_RESULTS_LOCAL_STORAGE_PATH: settings.results_dir(),
        }
    ):
        async with get_client() as client:
            yield client


async def submit(
    flow_name: str,
    parameters: dict[str, Any],
    *,
    idempotency_key: str | None = None,
    scheduled_time: datetime | None = None,
    client: PrefectClient | None = None,
) -> FlowRun:
    """Create (or find, by idempotency key) a flow run of ``flow_name``'s deployment.

    Raises:
        NotFoundError: the Prefect API has no ``<flow_name>/ctrl`` deployment.
    """
    if client is None:
        async with connect() as own:
            return await submit_call(
                own,
                flow_name,
                parameters,
                idempotency_key=idempotency_key,
                scheduled_time=scheduled_time,
            )
    return await submit_call(
        client,
        flow_name,
        parameters,
        idempotency_key=idempotency_key,
        scheduled_time=scheduled_time,
    )


def _end_watch(flow_run_id: UUID, ended: asyncio.Event) -> Coroutine[Any, Any, None]:
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    final = {state.value for state in _FINAL}
    filter = EventFilter(
        event=EventNameFilter(prefix=["prefect.flow-run."]),
        resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"]),
    )

    def on_event(event: Any) -> None:
        if event.resource.get("prefect.state-type") in final:
            ended.set()

    return watch_events(filter, on_event)


async def wait_for_result(
    flow_run_id: UUID,
    *,
    timeout: float | None = None,
    poll_interval: float = FALLBACK_POLL_SECONDS,
    client: PrefectClient | None = None,
) -> Any:
    """Wait until the run is final; return its result or raise ``FlowRunFailed``.

    The end is learnt from the server's events for the run (the subscription replays the
    last minute, so an end just before it is not missed); ``poll_interval`` is the fallback.

    Raises:
        FlowRunFailed: the run ended Failed or Cancelled (its message says why).
        TimeoutError: the run is not final after ``timeout`` seconds.
    """
    if client is None:
        async with connect() as own:
            return await wait_for_result(
                flow_run_id, timeout=timeout, poll_interval=poll_interval, client=own
            )
    ended = asyncio.Event()

    async def check() -> tuple[Any] | None:
        state = (await client.read_flow_run(flow_run_id)).state
        if state is None or state.type not in _FINAL:
            return None
        if state.is_completed():
            return (await state.aresult(),)
        raise FlowRunFailed(flow_run_id, state.name or str(state.type), state.message or "")

    (result,) = await until_signalled(
        check,
        _end_watch(flow_run_id, ended),
        ended,
        poll_seconds=lambda _stopped: poll_interval,
        timeout=timeout,
        what=f"flow run {flow_run_id}",
    )
    return result


async def trigger(
    flow_name: str,
    parameters: dict[str, Any],
    *,
    idempotency_key: str | None = None,
    wait: bool = False,
    scheduled_time: datetime | None = None,
) -> Any:
    """Start a service call; with ``wait`` return its result, else its flow run id."""
    async with connect() as client:
        flow_run = await submit(
            flow_name,
            parameters,
            idempotency_key=idempotency_key,
            scheduled_time=scheduled_time,
            client=client,
        )
        if not wait:
            return flow_run.id
        return await wait_for_result(flow_run.id, client=client)


# -- one function per service call (SPEC §2.4) --------------------------------------------------


async def next_version(
    region: str,
    *,
    idempotency_key: str | None = None,
    wait: bool = False,
    scheduled_time: datetime | None = None,
) -> Any:
    """VersioningService.NextVersion: with ``wait``, the new version (int)."""
    return await trigger(
        "next_version",
        {"region": region},
        idempotency_key=idempotency_key,
        wait=wait,
        scheduled_time=scheduled_time,
    )


async def get_version(
    region: str,
    *,
    idempotency_key: str | None = None,
    wait: bool = False,
    scheduled_time: datetime | None = None,
) -> Any:
    """VersioningService.GetVersion: with ``wait``, the current version (int)."""
    return await trigger(
        "get_version",
        {"region": region},
        idempotency_key=idempotency_key,
        wait=wait,
        scheduled_time=scheduled_time,
    )


async def schedule_desired_state_change(
    deployment_id: str,
    state: str,
    delay_millis: int = 0,
    *,
    idempotency_key: str | None = None,
    wait: bool = False,
    scheduled_time: datetime | None = None,
) -> Any:
    """DeploymentService.ScheduleDesiredStateChange (``state``: running, standby, archived)."""
    return await trigger(
        "schedule_desired_state_change",
        {"deployment_id": deployment_id, "state": state, "delay_millis": delay_millis},
        idempotency_key=idempotency_key,
        wait=wait,
        scheduled_time=scheduled_time,
    )


async def change_desired_state(
    deployment_id: str,
    nonce: str,
    state: str,
    *,
    idempotency_key: str | None = None,
    wait: bool = False,
    scheduled_time: datetime | None = None,
) -> Any:
    """DeploymentService.ChangeDesiredState (internal: applies a scheduled change by nonce)."""
    return await trigger(
        "change_desired_state",
        {"deployment_id": deployment_id, "nonce": nonce, "state": state},
        idempotency_key=idempotency_key,
        wait=wait,
        scheduled_time=scheduled_time,
    )


async def clear_scheduled_state_changes(
    deployment_id: str,
    *,
    idempotency_key: str | None = None,
    wait: bool = False,
    scheduled_time: datetime | None = None,
) -> Any:
    """DeploymentService.ClearScheduledStateChanges: drop (and cancel) the pending change."""
    return await trigger(
        "clear_scheduled_state_changes",
        {"deployment_id": deployment_id},
        idempotency_key=idempotency_key,
        wait=wait,
        scheduled_time=scheduled_time,
    )


async def assign_frontline_routes(
    project_id: str,
    deployment_id: str,
    frontline_route_ids: list[str],
    *,
    idempotency_key: str | None = None,
    wait: bool = False,
    scheduled_time: datetime | None = None,
) -> Any:
    """RoutingService.AssignFrontlineRoutes: point the routes at the deployment, atomically."""
    return await trigger(
        "assign_frontline_routes",
        {
            "project_id": project_id,
            "deployment_id": deployment_id,
            "frontline_route_ids": frontline_route_ids,
        },
        idempotency_key=idempotency_key,
        wait=wait,
        scheduled_time=scheduled_time,
    )


async def deploy(
    deployment_id: str,
    *,
    docker_image: str | None = None,
    git: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    wait: bool = False,
    scheduled_time: datetime | None = None,
) -> Any:
    """DeployService.Deploy: exactly one of ``docker_image`` or ``git`` (``installation_id``,
    ``repository``, ``commit_sha``, optional ``context_path``, ``dockerfile_path``); with
    ``wait``, the deploy's summary (regions, domains, live) once it is ``ready``."""
    parameters: dict[str, Any] = {"deployment_id": deployment_id}
    if docker_image is not None:
        parameters["docker_image"] = docker_image
    if git is not None:
        parameters["git"] = git
    return await trigger(
        "deploy",
        parameters,
        idempotency_key=idempotency_key,
        wait=wait,
        scheduled_time=scheduled_time,
    )


async def promote(
    target_deployment_id: str,
    *,
    idempotency_key: str | None = None,
    wait: bool = False,
    scheduled_time: datetime | None = None,
) -> Any:
    """DeployService.Promote: make a ready deployment live (the old live to standby in 30 min)."""
    return await trigger(
        "promote",
        {"target_deployment_id": target_deployment_id},
        idempotency_key=idempotency_key,
        wait=wait,
        scheduled_time=scheduled_time,
    )


async def rollback(
    source_deployment_id: str,
    target_deployment_id: str,
    *,
    idempotency_key: str | None = None,
    wait: bool = False,
    scheduled_time: datetime | None = None,
) -> Any:
    """DeployService.Rollback: move live traffic from the live ``source`` back to ``target``."""
    return await trigger(
        "rollback",
        {
            "source_deployment_id": source_deployment_id,
            "target_deployment_id": target_deployment_id,
        },
        idempotency_key=idempotency_key,
        wait=wait,
        scheduled_time=scheduled_time,
    )


async def scale_down_idle_preview_deployments(
    *,
    idempotency_key: str | None = None,
    wait: bool = False,
    scheduled_time: datetime | None = None,
) -> Any:
    """DeployService.ScaleDownIdlePreviewDeployments (the cron's call, on demand)."""
    return await trigger(
        "scale_down_idle_preview_deployments",
        {},
        idempotency_key=idempotency_key,
        wait=wait,
        scheduled_time=scheduled_time,
    )


async def renew_expiring_certificates(
    days_before_expiry: int | None = None,
    *,
    idempotency_key: str | None = None,
    wait: bool = False,
    scheduled_time: datetime | None = None,
) -> Any:
    """CertificateService.RenewExpiringCertificates (the cron's call, on demand; the cron's
    key is ``cert-renewal-<YYYY-MM-DD>``); with ``wait``, ``{"certificates_checked",
    "renewals_triggered", "failed_domains"}``."""
    parameters = {} if days_before_expiry is None else {"days_before_expiry": days_before_expiry}
    return await trigger(
        "renew_expiring_certificates",
        parameters,
        idempotency_key=idempotency_key,
        wait=wait,
        scheduled_time=scheduled_time,
    )


async def run_quota_check(
    billing_period: str | None = None,
    *,
    idempotency_key: str | None = None,
    wait: bool = False,
    scheduled_time: datetime | None = None,
) -> Any:
    """QuotaCheckService.RunCheck for ``billing_period`` (YYYY-MM, default: the current UTC
    month; the cron's key is ``quota-check-<YYYY-MM-DD>``); with ``wait``,
    ``{"workspaces_checked", "workspaces_exceeded", "notifications_sent"}``."""
    return await trigger(
        "run_quota_check",
        {} if billing_period is None else {"billing_period": billing_period},
        idempotency_key=idempotency_key,
        wait=wait,
        scheduled_time=scheduled_time,
    )


async def run_key_refill(
    date: str | None = None,
    *,
    idempotency_key: str | None = None,
    wait: bool = False,
    scheduled_time: datetime | None = None,
) -> Any:
    """KeyRefillService.RunRefill for ``date`` (YYYY-MM-DD, default: today UTC; the cron's
    key is ``key-refill-<YYYY-MM-DD>``); with ``wait``, ``{"keys_refilled"}``."""
    return await trigger(
        "run_key_refill",
        {} if date is None else {"date": date},
        idempotency_key=idempotency_key,
        wait=wait,
        scheduled_time=scheduled_time,
    )


async def process_challenge(
    workspace_id: str,
    domain: str,
    *,
    idempotency_key: str | None = None,
    wait: bool = False,
    scheduled_time: datetime | None = None,
) -> Any:
    """CertificateService.ProcessChallenge: obtain or renew the domain's certificate; with
    ``wait``, ``{"certificate_id", "status": "success"}``."""
    return await trigger(
        "process_challenge",
        {"workspace_id": workspace_id, "domain": domain},
        idempotency_key=idempotency_key,
        wait=wait,
        scheduled_time=scheduled_time,
    )


async def add_custom_domain(
    workspace_id: str,
    project_id: str,
    environment_id: str,
    domain: str,
    *,
    idempotency_key: str | None = None,
    wait: bool = False,
    scheduled_time: datetime | None = None,
) -> Any:
    """CustomDomainService.AddCustomDomain: add the domain and start its verification; with
    ``wait``, ``{"domain", "target_cname", "verification_token", "verification_status"}``."""
    return await trigger(
        "add_custom_domain",
        {
            "workspace_id": workspace_id,
            "project_id": project_id,
            "environment_id": environment_id,
            "domain": domain,
        },
        idempotency_key=idempotency_key,
        wait=wait,
        scheduled_time=scheduled_time,
    )


async def _domain_call(
    flow_name: str,
    domain: str,
    idempotency_key: str | None,
    wait: bool,
    scheduled_time: datetime | None,
) -> Any:
    return await trigger(
        flow_name,
        {"domain": domain},
        idempotency_key=idempotency_key,
        wait=wait,
        scheduled_time=scheduled_time,
    )


async def verify_domain(
    domain: str,
    *,
    idempotency_key: str | None = None,
    wait: bool = False,
    scheduled_time: datetime | None = None,
) -> Any:
    """CustomDomainService.VerifyDomain: check DNS until verified or the deadline."""
    return await _domain_call("verify_domain", domain, idempotency_key, wait, scheduled_time)


async def retry_verification(
    domain: str,
    *,
    idempotency_key: str | None = None,
    wait: bool = False,
    scheduled_time: datetime | None = None,
) -> Any:
    """CustomDomainService.RetryVerification: cancel, reset and verify again."""
    return await _domain_call("retry_verification", domain, idempotency_key, wait, scheduled_time)


async def delete_custom_domain(
    domain: str,
    *,
    idempotency_key: str | None = None,
    wait: bool = False,
    scheduled_time: datetime | None = None,
) -> Any:
    """CustomDomainService.DeleteCustomDomain: cancel the verification, delete route,
    challenge and domain together."""
    return await _domain_call("delete_custom_domain", domain, idempotency_key, wait, scheduled_time)


async def configure_clickhouse_user(
    workspace_id: str,
    quota_duration_seconds: int | None = None,
    max_queries_per_window: int | None = None,
    max_execution_time_per_window: int | None = None,
    max_query_execution_time: int | None = None,
    max_query_memory_bytes: int | None = None,
    max_query_result_rows: int | None = None,
    *,
    idempotency_key: str | None = None,
    wait: bool = False,
    scheduled_time: datetime | None = None,
) -> Any:
    """ClickhouseUserService.ConfigureUser: create or update the workspace's read-only
    ClickHouse user (unset or <= 0 limits take the defaults); with ``wait``,
    ``{"workspace_id", "username", "created"}`` (never the password)."""
    return await trigger(
        "configure_clickhouse_user",
        {
            "workspace_id": workspace_id,
            "quota_duration_seconds": quota_duration_seconds,
            "max_queries_per_window": max_queries_per_window,
            "max_execution_time_per_window": max_execution_time_per_window,
            "max_query_execution_time": max_query_execution_time,
            "max_query_memory_bytes": max_query_memory_bytes,
            "max_query_result_rows": max_query_result_rows,
        },
        idempotency_key=idempotency_key,
        wait=wait,
        scheduled_time=scheduled_time,
    )
