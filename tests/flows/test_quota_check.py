"""QuotaCheckService.RunCheck: the original's tests (reference §9.4) and the guarantees added here.

Real servers: workspaces and quotas in the session's MariaDB, usage in a real ClickHouse engine
(chdb, a fresh directory per test, the worker's billable tables), the flow on the session's
Prefect server (called in-process, so each call is a new call unless a test reuses a key). Slack
and the heartbeat are pytest-httpserver stand-ins that record what they were sent. The check
scans every workspace of the session database; tests assert on the workspaces they seeded (only
those have usage in the test's ClickHouse) and remove them after.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from pydantic import SecretStr
from werkzeug import Request, Response

from blocks.clickhouse import ClickHouseClient
from flows.quota_check import REMINDER_AFTER_MS, run_quota_check
from tasks.clickhouse.schema import BILLABLE_RATELIMITS, BILLABLE_VERIFICATIONS
from tasks.db.engine import engine_for
from tasks.db.schema import quota, quota_notifications, workspaces
from tests.support.settings import installed_settings
from worker.kernel.clock import now_ms
from worker.kernel.errors import InvalidParameterError
from worker.kernel.steps import durable_call
from worker.settings import Settings, worker_settings

pytestmark = pytest.mark.mysql

PERIOD = "2026-03"
YEAR, MONTH = 2026, 3
HOOK_PATH = "/services/T0QUOTA/B0QUOTA/hook-secret-6f1c2e9a"
COLUMNS = ["year", "month", "workspace_id", "count"]


@pytest.fixture
def clickhouse(control_db, chdb_analytics: ClickHouseClient) -> ClickHouseClient:
    """The analytics ClickHouse (chdb), installed with the control DB's settings."""
    return chdb_analytics


@pytest.fixture
def seeded(control_db) -> Iterator[list[str]]:
    """Workspace ids seeded by the test; they, their quotas and notifications go after it."""
    made: list[str] = []
    yield made
    with engine_for(control_db).begin() as connection:
        for table, column in (
            (quota_notifications, quota_notifications.c.workspace_id),
            (quota, quota.c.workspace_id),
            (workspaces, workspaces.c.id),
        ):
            connection.execute(table.delete().where(column.in_(made)))


def _workspace(
    url: str,
    seeded: list[str],
    *,
    requests_per_month: int | None,
    enabled: bool = True,
    name: str | None = None,
) -> str:
    tag = uuid.uuid4().hex[:12]
    workspace_id = f"ws_q{tag}"
    with engine_for(url).begin() as connection:
        connection.execute(
            workspaces.insert().values(
                id=workspace_id,
                org_id=f"org_q{tag}",
                name=name or f"Quota {tag}",
                slug=f"q{tag}",
                tier="Pro Max",
                stripe_customer_id=f"cus_{tag}",
                enabled=enabled,
                beta_features={},
                features={},
            )
        )
        if requests_per_month is not None:
            connection.execute(
                quota.insert().values(
                    workspace_id=workspace_id, requests_per_month=requests_per_month
                )
            )
    seeded.append(workspace_id)
    return workspace_id


def _usage(
    client: ClickHouseClient,
    workspace_id: str,
    verifications: int = 0,
    ratelimits: int = 0,
    *,
    month: int = MONTH,
) -> None:
    # Split across rows: the check must sum(count), not take one row.
    if verifications:
        half = verifications // 2
        rows = [
            (YEAR, month, workspace_id, half),
            (YEAR, month, workspace_id, verifications - half),
        ]
        client.insert(BILLABLE_VERIFICATIONS, rows, COLUMNS)
    if ratelimits:
        client.insert(BILLABLE_RATELIMITS, [(YEAR, month, workspace_id, ratelimits)], COLUMNS)


def _notifications(url: str, workspace_ids: list[str]) -> dict[str, sa.Row[Any]]:
    with engine_for(url).connect() as connection:
        rows = connection.execute(
            sa.select(quota_notifications).where(
                quota_notifications.c.billing_period == PERIOD,
                quota_notifications.c.workspace_id.in_(workspace_ids),
            )
        )
        return {row.workspace_id: row for row in rows}


def _check(period: str | None = PERIOD) -> dict[str, int]:
    return asyncio.run(run_quota_check(billing_period=period))


class SlackStandIn:
    """Records every POST to the webhook path; answers from a script, then 200 ``ok``."""

    def __init__(self, httpserver: Any) -> None:
        self.posts: list[tuple[float, dict[str, Any]]] = []
        self.script: list[tuple[int, dict[str, str]]] = []
        self.heartbeats = 0
        httpserver.expect_request(HOOK_PATH, method="POST").respond_with_handler(self._slack)
        httpserver.expect_request("/heartbeat/quota").respond_with_handler(self._heartbeat)
        self.url = httpserver.url_for(HOOK_PATH)
        self.heartbeat_url = httpserver.url_for("/heartbeat/quota")

    def _slack(self, request: Request) -> Response:
        self.posts.append((time.monotonic(), json.loads(request.get_data())))
        if self.script:
            status, headers = self.script.pop(0)
            return Response("rate_limited" if status == 429 else "error", status, headers)
        return Response("ok", 200)

    def _heartbeat(self, request: Request) -> Response:
        self.heartbeats += 1
        return Response("ok", 200)

    def messages_about(self, workspace_id: str) -> list[dict[str, Any]]:
        return [body for _, body in self.posts if workspace_id in json.dumps(body)]


@pytest.fixture
def slack(control_db, clickhouse, httpserver) -> Iterator[SlackStandIn]:
    """Slack and the heartbeat configured (secret URLs) on top of the test's settings."""
    stand_in = SlackStandIn(httpserver)
    settings = worker_settings().model_copy(
        update={
            "quota_check_slack_webhook_url": SecretStr(stand_in.url),
            "quota_check_heartbeat_url": SecretStr(stand_in.heartbeat_url),
        }
    )
    with installed_settings(settings):
        yield stand_in


# -- the original's tests (reference §9.4) --------------------------------------------------------


def test_quotas_against_usage_flag_the_two_over_their_quota(control_db, clickhouse, seeded) -> None:
    """Quotas 100k/500k/200k against usage 200k/300k/250k: the first and third are exceeded,
    all three were checked (the original's first test)."""
    first = _workspace(control_db, seeded, requests_per_month=100_000)
    second = _workspace(control_db, seeded, requests_per_month=500_000)
    third = _workspace(control_db, seeded, requests_per_month=200_000)
    _usage(clickhouse, first, 200_000)
    _usage(clickhouse, second, 300_000)
    _usage(clickhouse, third, 250_000)

    result = _check()

    assert result["workspaces_exceeded"] >= 2 and result["workspaces_checked"] >= 3
    assert set(_notifications(control_db, seeded)) == {first, third}


def test_usage_below_the_floor_is_not_flagged(control_db, clickhouse, seeded) -> None:
    """Usage of 140k against a quota of 100k is over the quota but below 150 000: not flagged."""
    workspace = _workspace(control_db, seeded, requests_per_month=100_000)
    _usage(clickhouse, workspace, 100_000, 40_000)

    _check()

    assert _notifications(control_db, [workspace]) == {}


def test_verifications_and_ratelimits_are_summed(control_db, clickhouse, seeded) -> None:
    """200k verifications + 150k ratelimits against a quota of 300k: exceeded (neither alone is)."""
    workspace = _workspace(control_db, seeded, requests_per_month=300_000)
    _usage(clickhouse, workspace, 200_000, 150_000)

    _check()

    assert set(_notifications(control_db, [workspace])) == {workspace}


def test_disabled_workspaces_are_skipped(control_db, clickhouse, seeded) -> None:
    """A disabled workspace far over its quota is not flagged."""
    workspace = _workspace(control_db, seeded, requests_per_month=100_000, enabled=False)
    _usage(clickhouse, workspace, 900_000)

    _check()

    assert _notifications(control_db, [workspace]) == {}


def test_workspaces_without_a_quota_row_are_skipped(control_db, clickhouse, seeded) -> None:
    """A workspace with no quota row is not flagged, whatever its usage."""
    workspace = _workspace(control_db, seeded, requests_per_month=None)
    _usage(clickhouse, workspace, 900_000)

    _check()

    assert _notifications(control_db, [workspace]) == {}


# -- added guarantees ------------------------------------------------------------------------------


def test_only_exceeded_workspaces_are_found_in_the_real_tables(
    control_db, clickhouse, seeded, slack: SlackStandIn
) -> None:
    """From real chdb rows, of workspaces below 150k, below their quota, disabled, without a
    quota row, with usage in another month, and over their quota, only the last is messaged."""
    over = _workspace(control_db, seeded, requests_per_month=150_000)
    cases = {
        "below floor": _workspace(control_db, seeded, requests_per_month=1_000),
        "below quota": _workspace(control_db, seeded, requests_per_month=1_000_000),
        "disabled": _workspace(control_db, seeded, requests_per_month=1_000, enabled=False),
        "no quota": _workspace(control_db, seeded, requests_per_month=None),
        "other month": _workspace(control_db, seeded, requests_per_month=1_000),
    }
    _usage(clickhouse, over, 150_000)
    _usage(clickhouse, cases["below floor"], 149_999)
    _usage(clickhouse, cases["below quota"], 999_999)
    _usage(clickhouse, cases["disabled"], 500_000)
    _usage(clickhouse, cases["no quota"], 500_000)
    _usage(clickhouse, cases["other month"], 500_000, month=MONTH - 1)

    result = _check()

    assert result["notifications_sent"] == 1 and result["workspaces_exceeded"] == 1
    assert set(_notifications(control_db, seeded)) == {over}
    assert len(slack.messages_about(over)) == 1
    assert all(slack.messages_about(ws) == [] for ws in cases.values())


def test_slack_message_has_the_originals_text_and_fields(
    control_db, clickhouse, seeded, slack: SlackStandIn
) -> None:
    """The Block Kit message: header and fallback "Quota Exceeded: <name>", then workspace id,
    name, organisation id, Stripe id, tier, quota RequestsPerMonth, limit and used in en-US."""
    workspace = _workspace(control_db, seeded, requests_per_month=1_200_000, name="Acme Corp")
    _usage(clickhouse, workspace, 1_000_000, 234_567)

    _check()

    [message] = slack.messages_about(workspace)
    tag = workspace.removeprefix("ws_q")
    assert message["text"] == "Quota Exceeded: Acme Corp"
    header, ids, tier, numbers = message["blocks"]
    assert header == {
        "type": "header",
        "text": {"type": "plain_text", "text": "Quota Exceeded: Acme Corp", "emoji": True},
    }
    assert [f["text"] for f in ids["fields"]] == [
        f"*Workspace ID:*\n`{workspace}`",
        "*Workspace Name:*\nAcme Corp",
        f"*Organisation ID:*\n`org_q{tag}`",
        f"*Stripe ID:*\n`cus_{tag}`",
    ]
    assert [f["text"] for f in tier["fields"]] == ["*Tier:*\nPro Max", "*Quota:*\nRequestsPerMonth"]
    assert [f["text"] for f in numbers["fields"]] == ["*Limit:*\n1,200,000", "*Used:*\n1,234,567"]
    assert all(f["type"] == "mrkdwn" for b in (ids, tier, numbers) for f in b["fields"])


def test_one_message_per_workspace_and_period_across_reruns(
    control_db, clickhouse, seeded, slack: SlackStandIn
) -> None:
    """Three runs of the same period (new calls each, as the daily cron makes): one message per
    exceeded workspace; the later runs notify nobody and count nobody as newly exceeded."""
    first = _workspace(control_db, seeded, requests_per_month=100_000)
    second = _workspace(control_db, seeded, requests_per_month=100_000)
    _usage(clickhouse, first, 200_000)
    _usage(clickhouse, second, 300_000)

    results = [_check() for _ in range(3)]

    assert [r["notifications_sent"] for r in results][1:] == [0, 0]
    assert results[0]["notifications_sent"] >= 2
    assert len(slack.messages_about(first)) == 1 and len(slack.messages_about(second)) == 1
    rows = _notifications(control_db, [first, second])
    assert {ws: (row.notifications, row.sending_token) for ws, row in rows.items()} == {
        first: (1, None),
        second: (1, None),
    }


def test_reminder_only_after_six_days_twenty_hours(
    control_db, clickhouse, seeded, slack: SlackStandIn
) -> None:
    """After the first message, a run 6 d 19 h later sends nothing; one 6 d 20 h later sends
    "Quota Still Exceeded (Weekly Reminder): <name>" (the last notification is backdated)."""
    workspace = _workspace(control_db, seeded, requests_per_month=100_000, name="Remind Me")
    _usage(clickhouse, workspace, 200_000)
    _check()

    def backdate(ms: int) -> None:
        with engine_for(control_db).begin() as connection:
            connection.execute(
                quota_notifications.update()
                .where(quota_notifications.c.workspace_id == workspace)
                .values(notified_at=quota_notifications.c.notified_at - ms)
            )

    backdate(REMINDER_AFTER_MS - 3_600_000)
    assert _check()["notifications_sent"] == 0
    backdate(3_600_000)
    reminder_run = _check()

    titles = [m["text"] for m in slack.messages_about(workspace)]
    assert titles == [
        "Quota Exceeded: Remind Me",
        "Quota Still Exceeded (Weekly Reminder): Remind Me",
    ]
    assert reminder_run["notifications_sent"] >= 1
    row = _notifications(control_db, [workspace])[workspace]
    assert row.notifications == 2 and now_ms() - row.notified_at < 600_000


def test_slack_429_is_waited_out_and_the_message_sent_once(
    control_db, clickhouse, seeded, slack: SlackStandIn
) -> None:
    """Slack answers 429 with Retry-After: 2, then 200: the run waits at least 2 s, posts again,
    and the message is delivered and recorded once; the run completes."""
    workspace = _workspace(control_db, seeded, requests_per_month=100_000)
    _usage(clickhouse, workspace, 200_000)
    slack.script.append((429, {"Retry-After": "2"}))

    result = _check()

    times = [at for at, body in slack.posts if workspace in json.dumps(body)]
    assert len(times) == 2 and times[1] - times[0] >= 1.9
    assert result["notifications_sent"] >= 1
    assert _notifications(control_db, [workspace])[workspace].notifications == 1
    assert slack.heartbeats == 1


def test_without_slack_the_state_is_still_recorded(
    control_db, clickhouse, seeded, httpserver
) -> None:
    """With no webhook the exceeded workspace is recorded as notified (counted, nothing sent);
    once Slack is configured the next run does not message it again within 6 d 20 h."""
    workspace = _workspace(control_db, seeded, requests_per_month=100_000)
    _usage(clickhouse, workspace, 200_000)

    result = _check()

    assert result["workspaces_exceeded"] >= 1 and result["notifications_sent"] == 0
    row = _notifications(control_db, [workspace])[workspace]
    assert row.notified_at is not None and row.notifications == 1
    stand_in = SlackStandIn(httpserver)
    with installed_settings(
        worker_settings().model_copy(
            update={"quota_check_slack_webhook_url": SecretStr(stand_in.url)}
        )
    ):
        assert _check()["notifications_sent"] == 0
    assert stand_in.messages_about(workspace) == []


def test_a_resumed_call_never_posts_twice(
    control_db, clickhouse, seeded, slack: SlackStandIn
) -> None:
    """A POST whose outcome was never learnt (the process died mid-request: its token is left in
    the row) is taken as delivered when the call resumes: no second message. A token left by
    some other run long ago is settled the same way; a fresh one (a run sending now) is left."""
    resumed = _workspace(control_db, seeded, requests_per_month=100_000)
    stale = _workspace(control_db, seeded, requests_per_month=100_000)
    busy = _workspace(control_db, seeded, requests_per_month=100_000)
    for workspace in (resumed, stale, busy):
        _usage(clickhouse, workspace, 200_000)
    key = f"quota-resume-{uuid.uuid4().hex[:8]}"
    token = hashlib.sha256(f"{key}:{resumed}".encode()).hexdigest()[:32]
    at = now_ms()
    with engine_for(control_db).begin() as connection:
        for workspace, row_token, started in (
            (resumed, token, at),
            (stale, "another-run", at - 3_600_000),
            (busy, "another-run-now", at),
        ):
            connection.execute(
                quota_notifications.insert().values(
                    billing_period=PERIOD,
                    workspace_id=workspace,
                    sending_token=row_token,
                    sending_at=started,
                    notifications=0,
                )
            )

    with durable_call(key):
        _check()

    assert slack.posts == []
    rows = _notifications(control_db, [resumed, stale, busy])
    assert (rows[resumed].notified_at, rows[resumed].sending_token) == (at, None)
    assert (rows[stale].notified_at, rows[stale].sending_token) == (at - 3_600_000, None)
    assert (rows[busy].notified_at, rows[busy].sending_token) == (None, "another-run-now")


def test_a_refused_message_fails_the_run_without_heartbeat_and_is_retried_next_run(
    control_db, clickhouse, seeded, slack: SlackStandIn
) -> None:
    """Slack refusing (404: the webhook was revoked) fails the run after the others were handled,
    sends no heartbeat and records nothing, so the next run sends the message."""
    workspace = _workspace(control_db, seeded, requests_per_month=100_000)
    _usage(clickhouse, workspace, 200_000)
    slack.script.append((404, {}))

    with pytest.raises(Exception, match="Slack did not take the notification"):
        _check()

    assert slack.heartbeats == 0
    row = _notifications(control_db, [workspace])[workspace]
    assert (row.notified_at, row.sending_token) == (None, None)
    assert _check()["notifications_sent"] >= 1
    assert len(slack.messages_about(workspace)) == 2  # the refused one and the delivered one
    assert slack.heartbeats == 1


def test_webhook_and_heartbeat_urls_never_reach_logs_artifacts_or_results(
    control_db, clickhouse, seeded, slack: SlackStandIn, prefect_api, caplog
) -> None:
    """With Slack failing once (500, retried) and rate-limiting once, no log record, artifact,
    result or persisted step record holds the webhook's secret path or the heartbeat URL."""
    workspace = _workspace(control_db, seeded, requests_per_month=100_000)
    _usage(clickhouse, workspace, 200_000)
    slack.script += [(500, {}), (429, {"Retry-After": "1"})]
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    loggers = [logging.getLogger(), logging.getLogger("prefect")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with caplog.at_level(logging.DEBUG):
            result = _check()
    finally:
        for logger in loggers:
            logger.removeHandler(handler)

    assert len(slack.messages_about(workspace)) == 3 and result["notifications_sent"] >= 1
    secrets = ["hook-secret-6f1c2e9a", slack.url, slack.heartbeat_url, "/heartbeat/quota"]
    # The stand-in's own access log (werkzeug) is the test's, not the worker's.
    ours = [r for r in records if not r.name.startswith("werkzeug")]
    texts = [r.getMessage() for r in ours] + [json.dumps(result)]

    async def artifacts() -> list[str]:
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=[f"quota-check-{PERIOD}"])
                )
            )
        return [json.dumps(a.data) + (a.description or "") for a in found]

    published = asyncio.run(artifacts())
    assert any(workspace in text for text in published)
    texts += published
    results_dir = Path(prefect_api.state_dir) / "results"
    texts += [p.read_text(errors="replace") for p in results_dir.rglob("*") if p.is_file()]
    leaks = [(s, text[:300]) for s in secrets for text in texts if s in text]
    assert leaks == []


@pytest.mark.parametrize("period", ["2026-13", "2026-00", "2026-3", "26-03", "2026/03", "", 202603])
def test_bad_billing_period_fails_at_once_changing_nothing(
    control_db, clickhouse, seeded, httpserver, period: Any
) -> None:
    """A malformed billing period is an InvalidParameterError naming it, at once (no retry, no
    query, no message), and nothing is written."""
    workspace = _workspace(control_db, seeded, requests_per_month=100_000)
    _usage(clickhouse, workspace, 200_000)
    stand_in = SlackStandIn(httpserver)
    started = time.monotonic()
    with (
        installed_settings(
            worker_settings().model_copy(
                update={"quota_check_slack_webhook_url": SecretStr(stand_in.url)}
            )
        ),
        pytest.raises(InvalidParameterError, match="billing_period"),
    ):
        _check(period)
    assert time.monotonic() - started < 30
    assert stand_in.posts == [] and _notifications(control_db, [workspace]) == {}


def test_without_clickhouse_nothing_is_checked_or_changed(control_db, seeded, httpserver) -> None:
    """ClickHouse off (the session's MariaDB settings, UNKEY_CLICKHOUSE_URL unset): the check
    reports zeros, writes nothing and sends neither a message nor a heartbeat."""
    workspace = _workspace(control_db, seeded, requests_per_month=100_000)
    stand_in = SlackStandIn(httpserver)
    settings: Settings = worker_settings().model_copy(
        update={
            "clickhouse_url": None,
            "quota_check_slack_webhook_url": SecretStr(stand_in.url),
            "quota_check_heartbeat_url": SecretStr(stand_in.heartbeat_url),
        }
    )
    with installed_settings(settings):
        assert settings.analytics_clickhouse_url() is None
        result = _check()

    assert result == {"workspaces_checked": 0, "workspaces_exceeded": 0, "notifications_sent": 0}
    assert stand_in.posts == [] and stand_in.heartbeats == 0
    assert _notifications(control_db, [workspace]) == {}


def test_heartbeat_after_a_successful_check(control_db, clickhouse, seeded, slack) -> None:
    """A completed check pings the heartbeat once, also when nobody is over quota."""
    _workspace(control_db, seeded, requests_per_month=100_000)

    _check()

    assert slack.heartbeats == 1
