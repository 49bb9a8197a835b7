"""QuotaCheckService.RunCheck: tell the team (Slack) about workspaces over their monthly quota.

``run_quota_check(billing_period="YYYY-MM")`` (default: the current UTC month, recorded once),
cron ``0 15 * * *`` UTC, each scheduled run keyed ``quota-check-<YYYY-MM-DD>`` (the original's
idempotency key), holding ``quota-check:<billing period>`` for its whole critical section.

Steps (reference §9): the check's instant (``check instant``, recorded); the billable usage of
the month of every workspace at or above the floor, one ClickHouse query for the whole check
(``get billable usage``: verifications + ratelimits, as the original asked); the number of
workspaces (``count workspaces``: all of them are checked, only those over the floor can be
exceeded); then, page by page of 5 000 of the workspaces over the floor (by id), their quota and
details from MariaDB (``fetch workspaces``, one query per 1000). A workspace is **exceeded** when
it is enabled, has a quota row, and its usage is ≥ ``requests_per_month`` and ≥ 150 000.

Notification, per exceeded workspace (the page's state read in one query, ``check
notifications``, then ``notify``): the first of the period is "Quota Exceeded: <name>"; a
repeat only when 6 d 20 h have passed since the last one, "Quota Still Exceeded (Weekly
Reminder): <name>"; the original's Block Kit fields (workspace id, name, organisation id,
Stripe id, tier, quota ``RequestsPerMonth``, limit and used in en-US digits). The state lives in
``quota_notifications`` (``tasks.db.quota``), also without a Slack webhook (then the page's
notifications are recorded, not sent, in one step and one transaction, ``record
notifications``), so neither a re-run nor a resume after a kill ever notifies twice: the POST is
bracketed by a token in the row, and a POST whose outcome is unknown is taken as delivered.
Slack answering 429 is waited out for its ``Retry-After`` (a durable sleep: a long one frees the
process and the key), at most ``SLACK_ATTEMPTS`` times; then, or after a refusal, the workspace
is left for the next run and the run fails after the others were handled.

Result ``{"workspaces_checked", "workspaces_exceeded", "notifications_sent"}``: workspaces
looked at; exceeded workspaces notified (or recorded) in this run (as the original, an exceeded
workspace notified less than 6 d 20 h ago is not counted again); Slack messages sent. After
success: a table artifact of every exceeded workspace and the heartbeat
(``UNKEY_QUOTA_CHECK_HEARTBEAT_URL``). Both URLs are secrets: never logged, never a parameter,
result or artifact.

ClickHouse off (``UNKEY_CLICKHOUSE_URL=`` empty, or unset with a configured database): the check
logs that usage is unknown and returns zeros, changing nothing and sending no heartbeat
(ClickHouse is optional, SPEC §2.3; the original required it).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Literal, TypedDict

from prefect import get_run_logger
from pydantic import field_validator

from flows.params import Params
from tasks.artifacts import publish_table
from tasks.clickhouse.usage import USAGE_FLOOR, fetch_billable_usage
from tasks.db import quota as quota_db
from tasks.db.quota import NotificationState, QuotaWorkspace
from tasks.http import send_heartbeat
from tasks.notify.slack import RateLimited, SlackInDoubt, post_message
from tasks.notify.slack import quota_message as slack_quota_message
from worker.kernel.clock import now, now_ms
from worker.kernel.errors import RetryableError
from worker.kernel.service import critical_section, parse, service_flow
from worker.kernel.sleep import durable_sleep
from worker.kernel.steps import call_key, step
from worker.settings import env_name, worker_settings

__all__ = [
    "IN_DOUBT_AFTER_MS",
    "REMINDER_AFTER_MS",
    "SLACK_ATTEMPTS",
    "exceeds_quota",
    "run_quota_check",
]

REMINDER_AFTER_MS = (6 * 24 + 20) * 3_600_000  # 6 d 20 h, the original's reminder interval
SLACK_ATTEMPTS = 5  # POSTs per workspace and run while Slack answers 429
# A sending token older than this belongs to a POST that can no longer be running (10 s
# timeout, a few step retries): taken as delivered.
IN_DOUBT_AFTER_MS = 10 * 60_000
_PERIOD = re.compile(r"\d{4}-(0[1-9]|1[0-2])")

Decision = Literal["first", "reminder", "none", "busy"]
_STATUS = {
    "none": "already notified less than 6 d 20 h ago",
    "busy": "being notified by another run",
}


class QuotaCheckParams(Params):
    billing_period: str | None = None

    @field_validator("billing_period")
    @classmethod
    def _period(cls, value: str | None) -> str | None:
        if value is not None and not _PERIOD.fullmatch(value):
            raise ValueError("must be a year and month as YYYY-MM (month 01-12)")
        return value


class NotifyOutcome(TypedDict):
    outcome: Literal["sent", "recorded", "in-doubt", "superseded", "rate-limited"]
    retry_after: float


def exceeds_quota(workspace: QuotaWorkspace, usage: int) -> bool:
    """The original's rule: enabled, has a quota row, usage ≥ its requests_per_month and ≥
    150 000."""
    limit = workspace["requests_per_month"]
    return bool(workspace["enabled"]) and limit is not None and usage >= max(limit, USAGE_FLOOR)


class _Usage:
    """The month's usage (workspace id -> usage ≥ the floor), handed to every page step as one
    opaque value: Prefect walks every container in a task's parameters (looking for upstream
    futures), ~0.3 s per step for a dict of 14 000 workspaces; an object it does not know is
    one leaf. Nothing new to record: it is the recorded ``get billable usage`` value."""

    __slots__ = ("by_workspace",)

    def __init__(self, by_workspace: dict[str, int]) -> None:
        self.by_workspace = by_workspace


@step(name="billing period")
def _current_period() -> str:
    # Recorded: a call resumed after midnight of the month's last day checks the same month.
    return now().strftime("%Y-%m")


@step(name="check instant")
def _check_instant() -> int:
    return now_ms()


def _decision(state: NotificationState | None, at_ms: int) -> dict[str, Any]:
    """``{"decision", "seen"}`` from the workspace's state (after any stale token was settled)."""
    seen = state["notified_at"] if state is not None else None
    decision: Decision
    if seen is None:
        decision = "first"
    elif at_ms - seen >= REMINDER_AFTER_MS:
        decision = "reminder"
    else:
        decision = "none"
    return {"decision": decision, "seen": seen}


@step(
    name="check notifications",
    key=("page",),
    run_name="check notifications, page {page}",
)
def _decide(
    billing_period: str, page: int, workspace_ids: list[str], at_ms: int
) -> dict[str, dict[str, Any]]:
    """Whether this call notifies each of a page's exceeded workspaces: workspace id ->
    ``{"decision", "seen"}`` (recorded, so a resumed call decides the same; ``seen`` is the
    ``notified_at`` the decision was made on). One query for the page's states."""
    states = quota_db.read_notifications(billing_period, workspace_ids)
    decided: dict[str, dict[str, Any]] = {}
    for workspace_id in workspace_ids:
        state = states.get(workspace_id)
        if state is not None and state["sending_token"] not in (None, _token(workspace_id)):
            started = state["sending_at"] or 0
            if now_ms() - started < IN_DOUBT_AFTER_MS:  # another run is sending
                decided[workspace_id] = {"decision": "busy", "seen": state["notified_at"]}
                continue
            quota_db.settle_in_doubt(billing_period, workspace_id)
            state = quota_db.read_notification(billing_period, workspace_id)
        decided[workspace_id] = _decision(state, at_ms)
    return decided


@step(
    name="record notifications",
    key=("page",),
    run_name="record notifications, page {page}",
)
def _record(billing_period: str, page: int, seen: dict[str, int | None], at_ms: int) -> list[str]:
    """Without a Slack webhook: record a page's notifications (workspace id -> the
    ``notified_at`` decided on) at the call's instant, in one transaction; the workspaces
    recorded by this call (an earlier execution of this very step that died after its commit
    left exactly ``at_ms``)."""
    return sorted(quota_db.record_notified_many(billing_period, seen, at_ms))


@step(name="count workspaces")
def _count_workspaces() -> int:
    return quota_db.count_workspaces()


@step(name="fetch workspaces", key=("page",), run_name="fetch workspaces, page {page}")
def _scan_page(page: int, usage: _Usage) -> list[dict[str, Any]]:
    """The exceeded workspaces among page ``page`` of the month's usage (the workspaces over the
    floor, by id, ``WORKSPACE_PAGE_SIZE`` a page), with their details and ``used``; only those
    are recorded. One query per 1000 workspaces."""
    size = quota_db.WORKSPACE_PAGE_SIZE
    ids = sorted(usage.by_workspace)[page * size : (page + 1) * size]
    return [
        {**workspace, "used": usage.by_workspace[workspace["id"]]}
        for workspace in quota_db.read_quota_workspaces(ids)
        if exceeds_quota(workspace, usage.by_workspace[workspace["id"]])
    ]


@step(name="notify", key=("workspace_id", "attempt"), run_name="notify {workspace_id}")
def _notify(
    billing_period: str,
    workspace_id: str,
    seen: int | None,
    token: str,
    message: dict[str, Any],
    attempt: int,
    at_ms: int,
) -> NotifyOutcome:
    """Send (or, without a webhook, record) one notification, at most once (see the module
    docstring); ``token`` names this call's notification of the workspace."""
    webhook = worker_settings().quota_check_slack_webhook_url
    url = webhook.get_secret_value() if webhook is not None else ""
    if not url:
        # Recorded at the call's instant: an earlier execution of this very step that died
        # before its record left exactly that value.
        if quota_db.record_notified(billing_period, workspace_id, seen, at_ms):
            return NotifyOutcome(outcome="recorded", retry_after=0.0)
        state = quota_db.read_notification(billing_period, workspace_id)
        mine = state is not None and state["notified_at"] == at_ms
        return NotifyOutcome(outcome="recorded" if mine else "superseded", retry_after=0.0)
    state = quota_db.read_notification(billing_period, workspace_id)
    if state is not None and state["sending_token"] == token:
        # An earlier execution started this POST and never learnt its outcome: delivered.
        quota_db.settle_in_doubt(billing_period, workspace_id, token)
        return NotifyOutcome(outcome="in-doubt", retry_after=0.0)
    if not quota_db.begin_sending(billing_period, workspace_id, seen, token, now_ms()):
        return NotifyOutcome(outcome="superseded", retry_after=0.0)
    what = f"quota notification of {workspace_id}"
    try:
        answer = post_message(url, message, what=what)
    except SlackInDoubt:
        raise  # the token stays: the retry of this step takes it as delivered
    except Exception:
        quota_db.abort_sending(billing_period, workspace_id, token)
        raise
    if isinstance(answer, RateLimited):
        quota_db.abort_sending(billing_period, workspace_id, token)
        return NotifyOutcome(outcome="rate-limited", retry_after=answer.retry_after)
    quota_db.finish_sending(billing_period, workspace_id, token, now_ms())
    return NotifyOutcome(outcome="sent", retry_after=0.0)


@step(name="send heartbeat")
def _heartbeat() -> bool:
    return send_heartbeat(worker_settings().quota_check_heartbeat_url, "quota check heartbeat")


def _token(workspace_id: str) -> str:
    raw = f"{call_key()}:{workspace_id}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


async def _notify_until_taken(
    period: str, workspace_id: str, seen: int | None, message: dict[str, Any], at_ms: int
) -> NotifyOutcome:
    """One notification, waiting out Slack's 429s (at most ``SLACK_ATTEMPTS`` POSTs)."""
    token = _token(workspace_id)
    outcome = NotifyOutcome(outcome="rate-limited", retry_after=0.0)
    for attempt in range(1, SLACK_ATTEMPTS + 1):
        outcome = _notify(period, workspace_id, seen, token, message, attempt, at_ms)
        if outcome["outcome"] != "rate-limited" or attempt == SLACK_ATTEMPTS:
            break
        get_run_logger().info(
            "Slack rate-limited the notification of %s: waiting %g s (Retry-After)",
            workspace_id,
            outcome["retry_after"],
        )
        await durable_sleep(outcome["retry_after"], name=f"slack-{workspace_id}-{attempt}")
    return outcome


@service_flow("run_quota_check", tick_key="quota-check-{tick:%Y-%m-%d}")
async def run_quota_check(billing_period: str | None = None) -> dict[str, Any]:
    """Notify Slack of workspaces over their monthly quota (cron 15:00 UTC)."""
    params = parse(QuotaCheckParams, billing_period=billing_period)
    log = get_run_logger()
    if worker_settings().analytics_clickhouse_url() is None:
        log.info(
            "ClickHouse is off (%s): usage is unknown, no workspace checked, nothing changed",
            env_name("clickhouse_url"),
        )
        return {"workspaces_checked": 0, "workspaces_exceeded": 0, "notifications_sent": 0}
    period = params.billing_period or _current_period()
    year, month = int(period[:4]), int(period[5:])
    async with critical_section(f"quota-check:{period}"):
        at_ms = _check_instant()
        usage = _Usage(fetch_billable_usage(year, month))
        webhook = worker_settings().quota_check_slack_webhook_url
        slack_on = webhook is not None and bool(webhook.get_secret_value())
        checked, notified, sent = _count_workspaces(), 0, 0
        report: list[dict[str, Any]] = []
        failed: list[str] = []
        pages = -(-len(usage.by_workspace) // quota_db.WORKSPACE_PAGE_SIZE)
        for page in range(pages):
            exceeded = _scan_page(page, usage)
            if not exceeded:
                continue
            decisions = _decide(period, page, [w["id"] for w in exceeded], at_ms)
            due = {
                w["id"]: decisions[w["id"]]["seen"]
                for w in exceeded
                if decisions[w["id"]]["decision"] in ("first", "reminder")
            }
            recorded = set(_record(period, page, due, at_ms)) if due and not slack_on else set()
            for workspace in exceeded:
                used = int(workspace["used"])
                decided = decisions[workspace["id"]]
                status = _STATUS.get(str(decided["decision"]), str(decided["decision"]))
                if workspace["id"] in due and not slack_on:
                    mine = workspace["id"] in recorded
                    status = f"{decided['decision']}: {'recorded' if mine else 'superseded'}"
                    notified += mine
                elif workspace["id"] in due:
                    message = slack_quota_message(
                        reminder=decided["decision"] == "reminder",
                        workspace_id=workspace["id"],
                        name=workspace["name"],
                        org_id=workspace["org_id"],
                        stripe_customer_id=workspace["stripe_customer_id"],
                        tier=workspace["tier"],
                        limit=int(workspace["requests_per_month"] or 0),
                        used=used,
                    )
                    try:
                        outcome = await _notify_until_taken(
                            period, workspace["id"], decided["seen"], message, at_ms
                        )
                    except Exception as exc:  # the step's retries are spent: the next run
                        log.warning("could not notify about %s: %s", workspace["id"], exc)
                        failed.append(workspace["id"])
                        status = f"failed: {type(exc).__name__}"
                    else:
                        status = f"{decided['decision']}: {outcome['outcome']}"
                        if outcome["outcome"] == "rate-limited":
                            failed.append(workspace["id"])
                        elif outcome["outcome"] in ("sent", "in-doubt", "recorded"):
                            notified += 1
                            sent += outcome["outcome"] in ("sent", "in-doubt")
                report.append(
                    {
                        "workspace_id": workspace["id"],
                        "name": workspace["name"],
                        "tier": workspace["tier"],
                        "limit": workspace["requests_per_month"],
                        "used": used,
                        "notification": status,
                    }
                )
        await publish_table(
            f"quota-check-{period}",
            report,
            f"Quota check of {period}: {len(report)} workspace(s) over their quota, "
            f"{notified} notified in this run, {sent} Slack message(s) sent",
        )
        if failed:
            raise RetryableError(
                f"Slack did not take the notification of {len(failed)} workspace(s) "
                f"({', '.join(failed[:10])}); the next run tries again"
            )
        _heartbeat()
    log.info(
        "quota check of %s: %d workspace(s) checked, %d exceeded and notified, %d message(s) sent",
        period,
        checked,
        notified,
        sent,
    )
    return {
        "workspaces_checked": checked,
        "workspaces_exceeded": notified,
        "notifications_sent": sent,
    }
