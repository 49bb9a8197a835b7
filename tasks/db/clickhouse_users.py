"""The SQL of ClickhouseUserService (reference §8.1): ``clickhouse_workspace_settings`` and the
workspace's ``quota.logs_retention_days``.

Guarantees:

- ``insert_workspace_settings`` is the crash-safe insert: the row is unique per workspace (and
  per username), so a second insert (a replay after a crash between the insert and the step's
  record) returns False and the caller keeps the stored row, whose password it never replaces.
- ``update_limits`` changes only the limits (and ``updated_at``), never the password.
- Nothing here returns or logs a plaintext password: the row carries the vault's ciphertext.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from tasks.clickhouse.users import UserLimits
from tasks.db.schema import clickhouse_workspace_settings, quota
from tasks.db.session import control_plane_transaction
from worker.kernel.clock import now_ms

__all__ = [
    "StoredUser",
    "find_logs_retention_days",
    "find_workspace_settings",
    "insert_workspace_settings",
    "update_limits",
]

_LIMIT_COLUMNS = tuple(UserLimits.__dataclass_fields__)


@dataclass(frozen=True)
class StoredUser:
    """A workspace's ClickHouse settings row, with its quota's retention (None: no quota row)."""

    workspace_id: str
    username: str
    password_encrypted: str
    limits: UserLimits
    logs_retention_days: int | None

    def __repr__(self) -> str:  # the ciphertext is not for logs either
        return f"StoredUser(workspace_id={self.workspace_id!r}, username={self.username!r})"


def find_workspace_settings(workspace_id: str) -> StoredUser | None:
    """The workspace's settings row joined with its quota (the original's
    FindClickhouseWorkspaceSettingsByWorkspaceID), or None."""
    s = clickhouse_workspace_settings.c
    query = (
        select(
            s.workspace_id,
            s.username,
            s.password_encrypted,
            *(s[name] for name in _LIMIT_COLUMNS),
            quota.c.logs_retention_days,
        )
        .select_from(
            clickhouse_workspace_settings.outerjoin(
                quota, quota.c.workspace_id == clickhouse_workspace_settings.c.workspace_id
            )
        )
        .where(s.workspace_id == workspace_id)
    )
    with control_plane_transaction() as connection:
        row = connection.execute(query).mappings().first()
    if row is None:
        return None
    return StoredUser(
        workspace_id=row["workspace_id"],
        username=row["username"],
        password_encrypted=row["password_encrypted"],
        limits=UserLimits(**{name: int(row[name]) for name in _LIMIT_COLUMNS}),
        logs_retention_days=row["logs_retention_days"],
    )


def find_logs_retention_days(workspace_id: str) -> int | None:
    """``quota.logs_retention_days`` of the workspace, or None without a quota row."""
    with control_plane_transaction() as connection:
        days = connection.execute(
            select(quota.c.logs_retention_days).where(quota.c.workspace_id == workspace_id)
        ).scalar_one_or_none()
    return None if days is None else int(days)


def insert_workspace_settings(
    workspace_id: str, username: str, password_encrypted: str, limits: UserLimits
) -> bool:
    """Insert the workspace's row; False when it (or its username) exists already.

    Raises:
        sqlalchemy.exc.DBAPIError: the database failed (retryable).
    """
    try:
        with control_plane_transaction() as connection:
            connection.execute(
                insert(clickhouse_workspace_settings).values(
                    workspace_id=workspace_id,
                    username=username,
                    password_encrypted=password_encrypted,
                    created_at=now_ms(),
                    **limits.as_row(),
                )
            )
    except IntegrityError:
        return False
    return True


def update_limits(workspace_id: str, limits: UserLimits) -> None:
    """Set the workspace's limits (its password is left as it is)."""
    with control_plane_transaction() as connection:
        connection.execute(
            update(clickhouse_workspace_settings)
            .where(clickhouse_workspace_settings.c.workspace_id == workspace_id)
            .values(updated_at=now_ms(), **limits.as_row())
        )
