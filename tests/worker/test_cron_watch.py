"""Missed cron ticks (worker/cron_watch.py): one automation per cron on the real Prefect server,
installed idempotently, firing when no run completed in time; the last-success metric."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import timedelta

import pytest
from prefect.client.orchestration import get_client
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

from deployments import CATALOGUE, DeploymentSpec
from worker.cron_watch import AUTOMATION_PREFIX, cron_period, ensure_cron_watch
from worker.kernel import metrics
from worker.registration import register_deployments


def test_the_period_of_a_cron_is_its_longest_gap() -> None:
    """Every 15 minutes, daily, monthly (31 days, the longest month)."""
    assert asyncio.run(cron_period("*/15 * * * *")) == timedelta(minutes=15)
    assert asyncio.run(cron_period("0 3 * * *")) == timedelta(days=1)
    assert asyncio.run(cron_period("0 0 1 * *")) == timedelta(days=31)


async def _ours(client) -> dict[str, object]:
    automations = await client.read_automations()
    return {a.name: a for a in automations if a.name.startswith(AUTOMATION_PREFIX)}


def test_one_automation_per_cron_installed_once_and_replaced_when_the_grace_changes(
    prefect_api,
) -> None:
    """Every cron of the catalogue gets exactly one automation (proactive, expecting a
    Completed run of its deployment within period + grace); installing again changes
    nothing; another grace replaces each one (never a duplicate); non-crons get none."""
    crons = [spec for spec in CATALOGUE if spec.cron]
    assert crons, "the catalogue has crons"

    async def scenario() -> None:
        async with get_client() as client:
            registered = await register_deployments(client, CATALOGUE)
            await ensure_cron_watch(client, registered, 600)
            assert await ensure_cron_watch(client, registered, 600) == 0
            ours = await _ours(client)
            assert sorted(ours) == sorted(
                f"{AUTOMATION_PREFIX}{spec.flow_name} missed its schedule" for spec in crons
            )
            ids = {spec.flow_name: dep for dep, spec in registered.items()}
            for spec in crons:
                automation = ours[f"{AUTOMATION_PREFIX}{spec.flow_name} missed its schedule"]
                trigger = automation.trigger
                assert trigger.posture == "Proactive"
                assert trigger.expect == {"prefect.flow-run.Completed"}
                assert trigger.within == await cron_period(spec.cron) + timedelta(seconds=600)
                related = trigger.match_related
                related = related[0] if isinstance(related, list) else related
                assert related["prefect.resource.id"] == [
                    f"prefect.deployment.{ids[spec.flow_name]}"
                ]

            assert await ensure_cron_watch(client, registered, 900) == len(crons)
            ours = await _ours(client)
            assert len(ours) == len(crons)
            for automation in ours.values():
                assert automation.trigger.within.total_seconds() % 60 == 0
                assert automation.trigger.within > timedelta(seconds=900)

    asyncio.run(scenario())


@pytest.mark.slow
def test_the_automation_fires_when_no_run_completed_within_the_period(prefect_api) -> None:
    """A cron ticking every minute with no grace whose deployment completes no run: its
    automation is triggered after about a minute (an event of it, in the UI's feed)."""
    plain = DeploymentSpec("tests/support/kernel_flows.py:kernel_three_steps")
    every_minute = dataclasses.replace(plain, cron="* * * * *")

    async def scenario() -> None:
        async with get_client() as client:
            (deployment_id,) = await register_deployments(client, [plain])  # no schedule
            await ensure_cron_watch(client, {deployment_id: every_minute}, 0)
            (automation,) = await client.read_automations_by_name(
                f"{AUTOMATION_PREFIX}{every_minute.flow_name} missed its schedule"
            )
            try:
                deadline = time.monotonic() + 150
                while time.monotonic() < deadline:
                    page = await client.read_events(
                        EventFilter(
                            event=EventNameFilter(prefix=["prefect.automation.triggered"]),
                            resource=EventResourceFilter(
                                id=[f"prefect.automation.{automation.id}"]
                            ),
                        ),
                        limit=10,
                    )
                    if page.events:
                        return
                    await asyncio.sleep(3)
                pytest.fail("the missed-tick automation did not fire within 150 s")
            finally:
                await client.delete_automation(automation.id)

    asyncio.run(scenario())


def test_a_completed_cron_call_sets_its_last_success_metric(control_db) -> None:
    """A cron call that completes (the scale-down, ClickHouse unset) records when, on
    `ctrl_cron_last_success_timestamp_seconds{flow=...}`."""
    from flows.deploy import scale_down_idle_preview_deployments

    before = time.time()
    asyncio.run(scale_down_idle_preview_deployments())
    (family,) = metrics.CRON_LAST_SUCCESS.collect()
    values = [
        sample.value
        for sample in family.samples
        if sample.labels.get("flow") == "scale_down_idle_preview_deployments"
    ]
    assert values and values[0] >= before
