"""Missed cron ticks, made visible: a metric and one Prefect automation per cron.

The original only knew of a missed tick when an external heartbeat (Checkly) stopped hearing
from it. Here, for every deployment of the catalogue with a schedule:

- ``ctrl_cron_last_success_timestamp_seconds{flow=...}``: when a run of it last completed.
  Set by the kernel in the flow-run process at the end of a successful cron call
  (``worker.kernel.metrics.CRON_LAST_SUCCESS``, a multiprocess gauge taking the max over
  processes) and seeded by the worker at start from the server's last Completed run, so a
  restarted worker does not forget it. Alert on ``time() - metric > period + grace``.
- A Prefect automation ``ctrl: <flow> missed its schedule`` (proactive: it fires when no
  ``prefect.flow-run.Completed`` event of that deployment arrived within the cron's period
  plus ``UNKEY_CRON_MISSED_GRACE_SECONDS``). Its firing is an event in the UI's event feed and
  on the automation's page; attach a notification action in the UI to be paged. The worker
  creates it at start, replaces it when the period or grace changed, and leaves it alone
  otherwise (one trigger bucket per cron: cheap, unlike one per flow run).
"""

from __future__ import annotations

import itertools
import logging
from datetime import UTC, datetime, timedelta
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.events.actions import DoNothing
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

from deployments import DeploymentSpec

__all__ = ["AUTOMATION_PREFIX", "cron_period", "ensure_cron_watch", "missed_tick_automation"]

log = logging.getLogger("ctrl.worker.cron_watch")

AUTOMATION_PREFIX = "ctrl: "


async def cron_period(cron: str, at: datetime | None = None) -> timedelta:
    """The longest gap between two consecutive ticks of ``cron`` (UTC) among its next 33
    ticks (a monthly cron's longest month; for regular crons simply the period)."""
    from prefect.server.schemas.schedules import CronSchedule

    start = at or datetime(2026, 1, 1, tzinfo=UTC)
    ticks = await CronSchedule(cron=cron, timezone="UTC").get_dates(n=33, start=start)
    return max(later - earlier for earlier, later in itertools.pairwise(ticks))


def _name(spec: DeploymentSpec) -> str:
    return f"{AUTOMATION_PREFIX}{spec.flow_name} missed its schedule"


async def missed_tick_automation(
    spec: DeploymentSpec, deployment_id: UUID, grace_seconds: float
) -> AutomationCore:
    """The automation that fires when no run of the cron ``spec`` completed in time."""
    assert spec.cron is not None
    within = await cron_period(spec.cron) + timedelta(seconds=grace_seconds)
    return AutomationCore(
        name=_name(spec),
        description=(
            f"No run of {spec.full_name} (cron '{spec.cron}' UTC) completed within "
            f"{within}: a tick was missed or failed. Created by ctrl-worker run."
        ),
        enabled=True,
        trigger=EventTrigger(
            posture=Posture.Proactive,
            expect={"prefect.flow-run.Completed"},
            match_related={
                "prefect.resource.id": f"prefect.deployment.{deployment_id}",
                "prefect.resource.role": "deployment",
            },
            threshold=1,
            within=within,
        ),
        actions=[DoNothing()],
    )


def _same(existing: AutomationCore, wanted: AutomationCore) -> bool:
    return (
        existing.trigger.model_dump(exclude={"id"}) == wanted.trigger.model_dump(exclude={"id"})
        and existing.description == wanted.description
    )


async def _last_success(client: PrefectClient, deployment_id: UUID) -> datetime | None:
    runs = await client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED]))
        ),
        sort=FlowRunSort.END_TIME_DESC,
        limit=1,
    )
    return runs[0].end_time if runs else None


async def ensure_cron_watch(
    client: PrefectClient, registered: dict[UUID, DeploymentSpec], grace_seconds: float
) -> int:
    """Create (or update) the missed-tick automation of every cron and seed its metric.

    Returns:
        How many automations were created or replaced now.
    """
    from worker.kernel.metrics import CRON_LAST_SUCCESS

    changed = 0
    for deployment_id, spec in registered.items():
        if not spec.cron:
            continue
        wanted = await missed_tick_automation(spec, deployment_id, grace_seconds)
        existing = await client.read_automations_by_name(wanted.name)
        if len(existing) == 1 and _same(existing[0], wanted):
            pass
        else:
            for automation in existing:
                await client.delete_automation(automation.id)
            await client.create_automation(wanted)
            changed += 1
            log.info("automation %r installed", wanted.name)
        last = await _last_success(client, deployment_id)
        if last is not None:
            CRON_LAST_SUCCESS.labels(flow=spec.flow_name).set(last.timestamp())
    return changed
