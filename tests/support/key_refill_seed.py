"""Seed API keys for the key-refill tests, read them back, and remove exactly what was seeded.

The refill scans the whole ``keys`` table, so each seeder has its own workspace ids (uuid
based) and ``cleanup`` deletes its keys, their audit rows and the progress rows of the dates
its test refilled, nothing else.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from tasks.db.engine import engine_for
from tasks.db.schema import audit_log, audit_log_target, key_refill_progress, keys

__all__ = ["KeySeed"]

_UNSET: Any = object()


@dataclass
class KeySeed:
    """Keys of one test, in workspaces of its own."""

    url: str
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    dates: set[str] = field(default_factory=set)
    workspaces: set[str] = field(default_factory=set)

    def workspace(self, n: int = 0) -> str:
        workspace_id = f"ws_refill_{self.tag}_{n}"
        self.workspaces.add(workspace_id)
        return workspace_id

    def add(
        self,
        *,
        refill_amount: int | None = 100,
        remaining: int | None = 10,
        refill_day: int | None = None,
        deleted: bool = False,
        name: str | None = _UNSET,
        workspace: int = 0,
    ) -> str:
        """One key; returns its id."""
        key_id = f"key_{self.tag}_{uuid.uuid4().hex[:12]}"
        row = self._row(key_id, self.workspace(workspace), refill_amount, remaining, refill_day)
        row["deleted_at_m"] = 1 if deleted else None
        row["name"] = f"name of {key_id}" if name is _UNSET else name
        with engine_for(self.url).begin() as connection:
            connection.execute(keys.insert().values(**row))
        return key_id

    def bulk(self, count: int, *, full_every: int = 0, chunk: int = 20_000) -> int:
        """``count`` daily keys in 10 workspaces (bulk inserts), due (remaining 7 of 100)
        except every ``full_every``-th one (full; 0: none). Returns how many are due."""
        workspaces = [self.workspace(n) for n in range(10)]
        due = 0
        with engine_for(self.url).begin() as connection:
            for first in range(0, count, chunk):
                rows = []
                for i in range(first, min(first + chunk, count)):
                    full = full_every > 0 and i % full_every == 0
                    due += not full
                    row = self._row(
                        f"key_{self.tag}_{i}", workspaces[i % 10], 100, 100 if full else 7, None
                    )
                    rows.append(row | {"name": None if i % 2 else f"bulk {i}"})
                connection.execute(keys.insert(), rows)
        return due

    def _row(
        self,
        key_id: str,
        workspace_id: str,
        refill_amount: int | None,
        remaining: int | None,
        refill_day: int | None,
    ) -> dict[str, Any]:
        return {
            "id": key_id,
            "key_auth_id": f"ks_{self.tag}",
            "hash": f"hash_{key_id}",
            "start": key_id[:8],
            "workspace_id": workspace_id,
            "refill_amount": refill_amount,
            "remaining_requests": remaining,
            "refill_day": refill_day,
            "created_at_m": 1,
        }

    def key(self, key_id: str) -> Any:
        """The key's row now."""
        with engine_for(self.url).connect() as connection:
            return connection.execute(sa.select(keys).where(keys.c.id == key_id)).one()

    def remaining(self, key_ids: Iterable[str]) -> dict[str, int | None]:
        ids = list(key_ids)
        with engine_for(self.url).connect() as connection:
            rows = connection.execute(
                sa.select(keys.c.id, keys.c.remaining_requests).where(keys.c.id.in_(ids))
            )
            return {row.id: row.remaining_requests for row in rows}

    def audit_logs(self) -> list[Any]:
        """The audit logs of this seed's workspaces."""
        with engine_for(self.url).connect() as connection:
            return list(
                connection.execute(
                    sa.select(audit_log)
                    .where(audit_log.c.workspace_id.in_(self.workspaces))
                    .order_by(audit_log.c.pk)
                )
            )

    def audit_targets(self) -> list[Any]:
        """The audit log targets of this seed's workspaces."""
        with engine_for(self.url).connect() as connection:
            return list(
                connection.execute(
                    sa.select(audit_log_target)
                    .where(audit_log_target.c.workspace_id.in_(self.workspaces))
                    .order_by(audit_log_target.c.pk)
                )
            )

    def progress(self, refill_date: str) -> Any:
        """The date's ``key_refill_progress`` row, or None."""
        with engine_for(self.url).connect() as connection:
            return connection.execute(
                sa.select(key_refill_progress).where(
                    key_refill_progress.c.refill_date == refill_date
                )
            ).one_or_none()

    def cleanup(self) -> None:
        """Delete this seed's keys, their audit rows and its dates' progress rows."""
        with engine_for(self.url).begin() as connection:
            workspaces = list(self.workspaces)
            connection.execute(
                sa.delete(audit_log_target).where(audit_log_target.c.workspace_id.in_(workspaces))
            )
            connection.execute(sa.delete(audit_log).where(audit_log.c.workspace_id.in_(workspaces)))
            connection.execute(sa.delete(keys).where(keys.c.workspace_id.in_(workspaces)))
            connection.execute(
                sa.delete(key_refill_progress).where(
                    key_refill_progress.c.refill_date.in_(list(self.dates))
                )
            )
