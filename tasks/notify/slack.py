"""Slack incoming webhooks: the quota check's Block Kit message and one POST, classified.

The webhook URL is a secret (it is the credential): it is read from the settings by the caller,
passed here, and never appears in a message, log, result or exception (httpx exceptions carry
the request, so they are dropped, not chained).

What a POST's outcome means for "sent once":

- 200: delivered.
- 429: not delivered; Slack says when to come back (``Retry-After``, seconds): ``RateLimited``.
- connection refused / connect timeout: never reached Slack, not delivered
  (``SlackNotDelivered``, retryable).
- 5xx / 408: not delivered (``SlackNotDelivered``, retryable); any other status is a refusal
  (``SlackRefusedError``, terminal: a revoked webhook does not heal by retrying).
- a malformed webhook URL: ``SlackRefusedError`` (terminal, nothing sent).
- any other transport failure (read timeout, connection lost after sending): Slack may have
  the message (``SlackInDoubt``, retryable; the caller takes it as delivered rather than send a
  second one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from tasks.http import http_client, is_retryable_status, quiet_http_logs
from worker.kernel.errors import RetryableError, TerminalError

__all__ = [
    "DEFAULT_RETRY_AFTER_SECONDS",
    "MAX_RETRY_AFTER_SECONDS",
    "RateLimited",
    "SlackInDoubt",
    "SlackNotDelivered",
    "SlackRefusedError",
    "post_message",
    "quota_message",
]

SLACK_TIMEOUT_SECONDS = 10.0  # the original's
DEFAULT_RETRY_AFTER_SECONDS = 30.0
MAX_RETRY_AFTER_SECONDS = 3600.0


class SlackNotDelivered(RetryableError):
    """Slack certainly did not take the message (it may be sent again)."""


class SlackInDoubt(RetryableError):
    """Slack may have taken the message: it must not be sent again."""


class SlackRefusedError(TerminalError):
    """Slack refused the message (4xx other than 408/429): retrying cannot help."""


@dataclass(frozen=True)
class RateLimited:
    """Slack answered 429: not delivered; try again after ``retry_after`` seconds."""

    retry_after: float


def quota_message(
    *,
    reminder: bool,
    workspace_id: str,
    name: str,
    org_id: str,
    stripe_customer_id: str,
    tier: str,
    limit: int,
    used: int,
) -> dict[str, Any]:
    """The original's Block Kit message for a workspace over its quota.

    Args:
        reminder: a repeat ("Quota Still Exceeded (Weekly Reminder): <name>") rather than the
            first ("Quota Exceeded: <name>").
        workspace_id, name, org_id, stripe_customer_id, tier: the workspace's.
        limit: ``quota.requests_per_month``.
        used: the month's billable verifications + ratelimits.

    Returns:
        The JSON body: ``text`` (the notification's fallback) and ``blocks``.
    """
    title = (
        f"Quota Still Exceeded (Weekly Reminder): {name}" if reminder else f"Quota Exceeded: {name}"
    )

    def field(text: str) -> dict[str, str]:
        return {"type": "mrkdwn", "text": text}

    return {
        "text": title,
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": title, "emoji": True}},
            {
                "type": "section",
                "fields": [
                    field(f"*Workspace ID:*\n`{workspace_id}`"),
                    field(f"*Workspace Name:*\n{name}"),
                    field(f"*Organisation ID:*\n`{org_id}`"),
                    field(f"*Stripe ID:*\n`{stripe_customer_id}`"),
                ],
            },
            {
                "type": "section",
                "fields": [field(f"*Tier:*\n{tier}"), field("*Quota:*\nRequestsPerMonth")],
            },
            {
                "type": "section",
                "fields": [field(f"*Limit:*\n{limit:,}"), field(f"*Used:*\n{used:,}")],
            },
        ],
    }


def _retry_after(response: httpx.Response) -> float:
    raw = response.headers.get("Retry-After", "").strip()
    try:
        seconds = float(raw)
    except ValueError:
        return DEFAULT_RETRY_AFTER_SECONDS  # absent, or an HTTP date: Slack sends seconds
    return min(max(seconds, 1.0), MAX_RETRY_AFTER_SECONDS)


def post_message(url: str, payload: dict[str, Any], *, what: str) -> RateLimited | None:
    """POST ``payload`` to the webhook ``url`` once.

    Args:
        url: the webhook URL (a secret: never told).
        payload: the JSON body.
        what: what the message is, for errors (``"quota notification of ws_1"``).

    Returns:
        None when delivered; ``RateLimited`` on a 429.

    Raises:
        SlackNotDelivered: not delivered (connect failure, 5xx, 408).
        SlackInDoubt: the outcome is unknown (the answer never came).
        SlackRefusedError: refused (another 4xx).
    """
    failure: Exception | None = None
    with http_client(timeout=SLACK_TIMEOUT_SECONDS) as client, quiet_http_logs():
        try:
            response = client.post(url, json=payload)
        except (httpx.InvalidURL, httpx.UnsupportedProtocol):
            failure = SlackRefusedError(f"{what}: the Slack webhook URL is not an http(s) URL")
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            failure = SlackNotDelivered(
                f"{what}: could not connect to Slack ({type(exc).__name__})"
            )
        except httpx.HTTPError as exc:
            failure = SlackInDoubt(f"{what}: no answer from Slack ({type(exc).__name__})")
    if failure is not None:
        raise failure  # outside the handler: the httpx exception (and its URL) is not kept
    if response.status_code == 200:
        return None
    if response.status_code == 429:
        return RateLimited(_retry_after(response))
    detail = f"{what}: Slack answered HTTP {response.status_code}"
    if is_retryable_status(response.status_code):
        raise SlackNotDelivered(detail)
    raise SlackRefusedError(detail)
