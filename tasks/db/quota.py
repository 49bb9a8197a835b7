"""The control-plane side of the quota check (reference §9): workspaces with their quota, paged
by primary key, and the notification state of a billing period (``quota_notifications``).

The check counts the workspaces (``count_workspaces``), reads those whose usage is over the
floor with their quota, a page of them at a time (``read_quota_workspaces``, one query per 1000
ids), the state of a page's exceeded ones in one query (``read_notifications``), and, without
Slack, records their notifications in one transaction (``record_notified_many``).

Notification state, one row per (billing period, workspace):

- ``notified_at``: when the workspace was last notified (or, without Slack, recorded as
  notified) in the period; NULL before the first.
- ``sending_token`` / ``sending_at``: set by ``begin_sending`` just before a Slack POST and
  cleared by ``finish_sending`` (delivered) or ``abort_sending`` (known not delivered). A token
  left behind means a POST whose outcome is unknown (the process died, the answer timed out):
  it is taken as delivered (``settle_in_doubt``), so a message is never sent twice.

Every write is a compare-and-set on the state the caller decided on (``seen`` = the
``notified_at`` it read): two runs of one period can never both notify.

These are plain functions: the flow's durable steps call them (``flows.quota_check``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypedDict

from sqlalchemy import and_, bindparam, func, select, update
from sqlalchemy.exc import IntegrityError

from tasks.db.schema import quota, quota_notifications, workspaces
from tasks.db.session import control_plane_transaction

__all__ = [
    "WORKSPACE_PAGE_SIZE",
    "NotificationState",
    "QuotaWorkspace",
    "abort_sending",
    "begin_sending",
    "count_workspaces",
    "finish_sending",
    "read_notification",
    "read_notifications",
    "read_quota_workspaces",
    "record_notified",
    "record_notified_many",
    "settle_in_doubt",
]

WORKSPACE_PAGE_SIZE = 5_000  # workspaces with usage over the floor per step of the check
_IN_CHUNK = 1_000  # ids per IN (...) list


class QuotaWorkspace(TypedDict):
    pk: int
    id: str
    org_id: str
    name: str
    stripe_customer_id: str
    tier: str
    enabled: bool
    requests_per_month: int | None  # None: no quota row


class NotificationState(TypedDict):
    notified_at: int | None
    sending_token: str | None
    sending_at: int | None
    notifications: int


def count_workspaces() -> int:
    """How many workspaces there are (not deleted): the ones a check looks at."""
    with control_plane_transaction() as connection:
        return int(
            connection.execute(
                select(func.count())
                .select_from(workspaces)
                .where(workspaces.c.deleted_at_m.is_(None))
            ).scalar_one()
        )


def read_quota_workspaces(workspace_ids: Sequence[str]) -> list[QuotaWorkspace]:
    """Those of ``workspace_ids`` that exist (not deleted), with their quota (None: no quota
    row), by primary key; one query per 1000 ids."""
    found: list[QuotaWorkspace] = []
    if not workspace_ids:
        return found
    with control_plane_transaction() as connection:
        for chunk in _chunks(workspace_ids):
            rows = connection.execute(
                select(
                    workspaces.c.pk,
                    workspaces.c.id,
                    workspaces.c.org_id,
                    workspaces.c.name,
                    workspaces.c.stripe_customer_id,
                    workspaces.c.tier,
                    workspaces.c.enabled,
                    quota.c.requests_per_month,
                )
                .select_from(workspaces.outerjoin(quota, quota.c.workspace_id == workspaces.c.id))
                .where(workspaces.c.id.in_(chunk), workspaces.c.deleted_at_m.is_(None))
            )
            found += [
                QuotaWorkspace(
                    pk=int(row.pk),
                    id=row.id,
                    org_id=row.org_id,
                    name=row.name,
                    stripe_customer_id=row.stripe_customer_id or "",
                    tier=row.tier or "",
                    enabled=bool(row.enabled),
                    requests_per_month=(
                        None if row.requests_per_month is None else int(row.requests_per_month)
                    ),
                )
                for row in rows
            ]
    found.sort(key=lambda workspace: workspace["pk"])
    return found


def _chunks(ids: Sequence[str]) -> Iterator[list[str]]:
    for start in range(0, len(ids), _IN_CHUNK):
        yield list(ids[start : start + _IN_CHUNK])


def _key(period: str, workspace_id: str) -> Any:
    return and_(
        quota_notifications.c.billing_period == period,
        quota_notifications.c.workspace_id == workspace_id,
    )


def _seen(seen: int | None) -> Any:
    column = quota_notifications.c.notified_at
    return column.is_(None) if seen is None else column == seen


def read_notification(period: str, workspace_id: str) -> NotificationState | None:
    """The workspace's notification state in ``period``, or None before any."""
    with control_plane_transaction() as connection:
        row = connection.execute(
            select(
                quota_notifications.c.notified_at,
                quota_notifications.c.sending_token,
                quota_notifications.c.sending_at,
                quota_notifications.c.notifications,
            ).where(_key(period, workspace_id))
        ).first()
    if row is None:
        return None
    return NotificationState(
        notified_at=row.notified_at,
        sending_token=row.sending_token,
        sending_at=row.sending_at,
        notifications=int(row.notifications),
    )


def read_notifications(period: str, workspace_ids: Sequence[str]) -> dict[str, NotificationState]:
    """The notification state in ``period`` of those of ``workspace_ids`` that have one (one
    query per 1000 ids)."""
    states: dict[str, NotificationState] = {}
    if not workspace_ids:
        return states
    with control_plane_transaction() as connection:
        for chunk in _chunks(workspace_ids):
            rows = connection.execute(
                select(
                    quota_notifications.c.workspace_id,
                    quota_notifications.c.notified_at,
                    quota_notifications.c.sending_token,
                    quota_notifications.c.sending_at,
                    quota_notifications.c.notifications,
                ).where(
                    quota_notifications.c.billing_period == period,
                    quota_notifications.c.workspace_id.in_(chunk),
                )
            )
            for row in rows:
                states[row.workspace_id] = NotificationState(
                    notified_at=row.notified_at,
                    sending_token=row.sending_token,
                    sending_at=row.sending_at,
                    notifications=int(row.notifications),
                )
    return states


def settle_in_doubt(period: str, workspace_id: str, token: str | None = None) -> bool:
    """Take an unfinished POST as delivered: ``notified_at`` = its start, token cleared.

    Args:
        period: the billing period.
        workspace_id: the workspace.
        token: settle only this token (None: whichever is left).

    Returns:
        True when a token was settled.
    """
    condition: Any = quota_notifications.c.sending_token.is_not(None)
    if token is not None:
        condition = quota_notifications.c.sending_token == token
    with control_plane_transaction() as connection:
        done = connection.execute(
            update(quota_notifications)
            .where(_key(period, workspace_id), condition)
            .values(
                notified_at=quota_notifications.c.sending_at,
                sending_token=None,
                sending_at=None,
                notifications=quota_notifications.c.notifications + 1,
            )
        )
    return done.rowcount == 1


def _claim(period: str, workspace_id: str, seen: int | None, values: dict[str, Any]) -> bool:
    """Apply ``values`` iff the row is still as decided on (or insert it when there was none)."""
    with control_plane_transaction() as connection:
        done = connection.execute(
            update(quota_notifications)
            .where(
                _key(period, workspace_id),
                _seen(seen),
                quota_notifications.c.sending_token.is_(None),
            )
            .values(**values)
        )
        if done.rowcount == 1:
            return True
        exists = connection.execute(
            select(func.count()).select_from(quota_notifications).where(_key(period, workspace_id))
        ).scalar_one()
    if exists or seen is not None:
        return False
    try:
        with control_plane_transaction() as connection:
            connection.execute(
                quota_notifications.insert().values(
                    billing_period=period, workspace_id=workspace_id, **values
                )
            )
    except IntegrityError:
        return False  # another run inserted it first
    return True


def begin_sending(period: str, workspace_id: str, seen: int | None, token: str, at_ms: int) -> bool:
    """Mark a Slack POST as starting, iff nobody notified or started one since ``seen``.

    Returns:
        True when this caller may send now.
    """
    values: dict[str, Any] = {"sending_token": token, "sending_at": at_ms}
    if seen is None:
        values["notifications"] = 0
    return _claim(period, workspace_id, seen, values)


def finish_sending(period: str, workspace_id: str, token: str, at_ms: int) -> bool:
    """The POST of ``token`` was delivered at ``at_ms``: record the notification."""
    with control_plane_transaction() as connection:
        done = connection.execute(
            update(quota_notifications)
            .where(_key(period, workspace_id), quota_notifications.c.sending_token == token)
            .values(
                notified_at=at_ms,
                sending_token=None,
                sending_at=None,
                notifications=quota_notifications.c.notifications + 1,
            )
        )
    return done.rowcount == 1


def abort_sending(period: str, workspace_id: str, token: str) -> None:
    """The POST of ``token`` was certainly not delivered: forget it (a retry may send)."""
    with control_plane_transaction() as connection:
        connection.execute(
            update(quota_notifications)
            .where(_key(period, workspace_id), quota_notifications.c.sending_token == token)
            .values(sending_token=None, sending_at=None)
        )


def record_notified(period: str, workspace_id: str, seen: int | None, at_ms: int) -> bool:
    """Record a notification without sending one (no Slack webhook), iff still as ``seen``."""
    values: dict[str, Any] = {"notified_at": at_ms}
    if seen is None:
        values["notifications"] = 1
    else:
        values["notifications"] = quota_notifications.c.notifications + 1
    return _claim(period, workspace_id, seen, values)


def record_notified_many(
    period: str, seen_by_workspace: Mapping[str, int | None], at_ms: int
) -> set[str]:
    """``record_notified`` for many workspaces in one transaction: each row is recorded as
    notified at ``at_ms`` iff it is still as its ``seen`` (and no POST is in flight).

    Idempotent: run again (a step retried after its transaction committed) it changes nothing
    and returns the same set, because a row recorded by this call holds ``notified_at ==
    at_ms`` (the check's instant, unique to the call).

    Args:
        period: the billing period.
        seen_by_workspace: workspace id -> the ``notified_at`` the caller decided on (None:
            never notified in the period).
        at_ms: this call's instant.

    Returns:
        The workspaces whose row now says they were notified at ``at_ms``.
    """
    ids = list(seen_by_workspace)
    if not ids:
        return set()
    t = quota_notifications
    key = and_(
        t.c.billing_period == bindparam("b_period"), t.c.workspace_id == bindparam("b_workspace")
    )
    free = t.c.sending_token.is_(None)
    reminders = [
        {"b_period": period, "b_workspace": ws, "b_seen": seen, "b_at": at_ms}
        for ws, seen in seen_by_workspace.items()
        if seen is not None
    ]
    firsts = [ws for ws, seen in seen_by_workspace.items() if seen is None]
    for _attempt in range(3):
        try:
            with control_plane_transaction() as connection:
                if reminders:
                    connection.execute(
                        update(t)
                        .where(key, t.c.notified_at == bindparam("b_seen"), free)
                        .values(notified_at=bindparam("b_at"), notifications=t.c.notifications + 1),
                        reminders,
                    )
                if firsts:
                    # A row without a notification (a first POST that was not delivered).
                    connection.execute(
                        update(t)
                        .where(key, t.c.notified_at.is_(None), free)
                        .values(notified_at=bindparam("b_at"), notifications=1),
                        [{"b_period": period, "b_workspace": ws, "b_at": at_ms} for ws in firsts],
                    )
                    existing: set[str] = set()
                    for chunk in _chunks(firsts):
                        existing.update(
                            connection.execute(
                                select(t.c.workspace_id).where(
                                    t.c.billing_period == period, t.c.workspace_id.in_(chunk)
                                )
                            ).scalars()
                        )
                    missing = [ws for ws in firsts if ws not in existing]
                    if missing:
                        connection.execute(
                            t.insert(),
                            [
                                {
                                    "billing_period": period,
                                    "workspace_id": ws,
                                    "notified_at": at_ms,
                                    "notifications": 1,
                                }
                                for ws in missing
                            ],
                        )
        except IntegrityError:
            continue  # another run inserted one of them first: its row is now compared
        break
    else:
        raise RuntimeError("quota notifications kept conflicting with another run")
    states = read_notifications(period, ids)
    return {ws for ws, state in states.items() if state["notified_at"] == at_ms}
