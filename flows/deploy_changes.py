"""DeployService's other handlers: promote, rollback, and the idle-preview scale-down cron.

Importable from ``flows.deploy`` (their deployments' entrypoints are ``flows/deploy.py:...``).
Promote and rollback take ``deploy:project:{project_id}`` like deploy, check everything the
original checks before writing anything (terminal errors naming the id), then move the live and
environment routes through RoutingService and set the project's live deployment. **(fix)** A
rollback also sets the target's desired state to ``running``. The scale-down takes
``deploy:global``; its reads are one step per page of 100 preview environments (the original
read deployments one environment at a time) and its standby changes go through
DeploymentService under the page's deployment keys, taken at once (one lease, all or none).
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger
from pydantic import ValidationInfo, field_validator

from flows.deployment import (
    change_desired_state_now,
    change_desired_states_now,
    clear_scheduled_state_changes,
)
from flows.params import Id, Params
from flows.rollout import STANDBY_DELAY_MILLIS
from flows.routing import assign_frontline_routes
from tasks.clickhouse.requests import fetch_request_counts
from tasks.db.deploys import (
    DeploymentRow,
    find_deployment_project,
    find_project,
    find_source_deployment,
    find_target_deployment,
)
from tasks.db.frontline import (
    find_routes_for_promotion,
    find_routes_for_rollback,
    update_project_live,
)
from tasks.db.previews import find_idle_deployments, list_preview_environments
from tasks.prefect_calls import send_call
from worker.kernel.clock import now_ms
from worker.kernel.errors import ConflictError, RefusedError
from worker.kernel.service import critical_section, parse, service_flow
from worker.kernel.steps import call_key, call_subflow, step
from worker.settings import worker_settings

__all__ = ["promote", "rollback", "scale_down_idle_preview_deployments"]

IDLE_MILLIS = 6 * 3600 * 1000


class PromoteParams(Params):
    target_deployment_id: Id


class RollbackParams(Params):
    source_deployment_id: Id
    target_deployment_id: Id

    @field_validator("target_deployment_id")
    @classmethod
    def _different(cls, target: str, info: ValidationInfo) -> str:
        if info.data.get("source_deployment_id") == target:
            raise ValueError(
                f"'source_deployment_id' and 'target_deployment_id' are both '{target}': "
                "a rollback needs two deployments"
            )
        return target


async def _move_routes(project_id: str, deployment_id: str, route_ids: list[str]) -> None:
    await call_subflow(
        assign_frontline_routes,
        "routing",
        project_id=project_id,
        deployment_id=deployment_id,
        frontline_route_ids=route_ids,
    )


@service_flow("promote", run_name="promote-{target_deployment_id}")
async def promote(target_deployment_id: str) -> dict[str, Any]:
    """Make a ready deployment the project's live one (not rolled back)."""
    params = parse(PromoteParams, target_deployment_id=target_deployment_id)
    target_id = params.target_deployment_id
    project_id = find_deployment_project(target_id)
    async with critical_section(f"deploy:project:{project_id}"):
        target = find_target_deployment(target_id)
        project = find_project(project_id)
        if target["status"] != "ready":
            raise RefusedError(
                f"deployment '{target_id}' is not ready (status '{target['status']}')"
            )
        old_live = project["live_deployment_id"]
        if not old_live:
            raise RefusedError(f"project '{project_id}' has no live deployment to promote over")
        if old_live == target_id:
            raise RefusedError(f"deployment '{target_id}' is already live")
        routes = find_routes_for_promotion(target["environment_id"])
        if not routes:
            raise RefusedError(
                f"environment '{target['environment_id']}' has no live or environment routes "
                f"to promote deployment '{target_id}' on"
            )
        await _move_routes(project_id, target_id, routes)
        update_project_live(project_id, target_id, False)
        await call_subflow(clear_scheduled_state_changes, "clear-target", deployment_id=target_id)
        # Restate sent this without waiting; here too (a run of its own, replay-safe key).
        await send_call(
            "schedule_desired_state_change",
            {"deployment_id": old_live, "state": "standby", "delay_millis": STANDBY_DELAY_MILLIS},
            idempotency_key=f"promote-standby-{call_key()}",
        )
    return {"live_deployment_id": target_id, "previous_live": old_live, "routes": len(routes)}


def _check_rollback(source: DeploymentRow, target: DeploymentRow) -> None:
    for what in ("project_id", "environment_id"):
        if source[what] != target[what]:
            noun = what.removesuffix("_id")
            raise ConflictError(
                f"deployments '{source['id']}' and '{target['id']}' are in different {noun}s "
                f"('{source[what]}' and '{target[what]}')"
            )


@service_flow("rollback", run_name="rollback-{source_deployment_id}-to-{target_deployment_id}")
async def rollback(source_deployment_id: str, target_deployment_id: str) -> dict[str, Any]:
    """Move live traffic from the live deployment back to an earlier one (rolled back)."""
    params = parse(
        RollbackParams,
        source_deployment_id=source_deployment_id,
        target_deployment_id=target_deployment_id,
    )
    source_id, target_id = params.source_deployment_id, params.target_deployment_id
    project_id = find_deployment_project(source_id)
    async with critical_section(f"deploy:project:{project_id}"):
        source = find_source_deployment(source_id)
        target = find_target_deployment(target_id)
        _check_rollback(source, target)
        project = find_project(project_id)
        if project["live_deployment_id"] != source_id:
            raise RefusedError(
                f"deployment '{source_id}' is not the live deployment of project '{project_id}'"
            )
        routes = find_routes_for_rollback(target["environment_id"])
        if not routes:
            raise RefusedError(
                f"environment '{target['environment_id']}' has no live or environment routes "
                f"to roll back to deployment '{target_id}'"
            )
        await call_subflow(clear_scheduled_state_changes, "clear-target", deployment_id=target_id)
        await change_desired_state_now(target_id, "running", "rollback-target")
        await _move_routes(project_id, target_id, routes)
        update_project_live(project_id, target_id, True)
    return {"live_deployment_id": target_id, "rolled_back_from": source_id, "routes": len(routes)}


@step(name="scale-down cutoff")
def _cutoff() -> int:
    # Recorded once: a resumed sweep judges idleness against the same instant.
    return now_ms() - IDLE_MILLIS


async def _standby(deployment_ids: list[str], page: int) -> list[str]:
    """Standby through DeploymentService: its keys for the whole page at once."""
    if not deployment_ids:
        return []
    outcomes = await change_desired_states_now(deployment_ids, "standby", f"after-{page}")
    log = get_run_logger()
    for deployment_id, outcome in outcomes.items():
        if outcome == "refused":
            log.warning("left %s running: it is its project's live deployment", deployment_id)
    return [d for d, outcome in outcomes.items() if outcome == "applied"]


@service_flow(
    "scale_down_idle_preview_deployments", tick_key="scale-down-idle-{tick:%Y-%m-%dT%H:%M}"
)
async def scale_down_idle_preview_deployments() -> dict[str, Any]:
    """Put preview deployments with no requests in 6 h on standby (cron every 15 min)."""
    log = get_run_logger()
    if worker_settings().analytics_clickhouse_url() is None:
        log.info("ClickHouse is off (UNKEY_CLICKHOUSE_URL): no request counts, nothing changed")
        return {"deployments_checked": 0, "idle": 0, "scaled_down": []}
    async with critical_section("deploy:global"):
        cutoff = _cutoff()
        checked, idle, after = 0, 0, 0
        scaled: list[str] = []
        while page := list_preview_environments(after):
            candidates = find_idle_deployments(after, [env["id"] for env in page], cutoff)
            counts = fetch_request_counts(after, candidates, cutoff)
            quiet = [c["id"] for c in candidates if counts.get(c["id"], 0) == 0]
            checked, idle = checked + len(candidates), idle + len(quiet)
            scaled += await _standby(quiet, after)
            after = page[-1]["pk"]
    log.info(
        "checked %d preview deployment(s): %d idle, %d scaled down", checked, idle, len(scaled)
    )
    return {"deployments_checked": checked, "idle": idle, "scaled_down": scaled}
