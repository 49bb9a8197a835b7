"""Per-region version counters (VersioningService): SQL and durable steps.

One counter per region, shared by deployment_topology, sentinels and cilium_network_policies
(each has UNIQUE(region, version)). Incrementing is one atomic statement: MySQL's
``LAST_INSERT_ID(version + 1)`` upsert, SQLite's upsert with ``RETURNING``.
"""

from __future__ import annotations

from sqlalchemy import Connection, func, select
from sqlalchemy.dialects import mysql, sqlite

from tasks.db.engine import is_mysql
from tasks.db.schema import region_versions
from tasks.db.session import control_plane_transaction
from worker.kernel.clock import now_ms
from worker.kernel.steps import step

__all__ = ["increment_region_version", "read_region_version", "read_version", "take_version"]


def increment_region_version(connection: Connection, region: str) -> int:
    """Atomically add one to ``region``'s counter (creating it at 1) and return the new value."""
    at = now_ms()
    if is_mysql(connection):
        stmt = mysql.insert(region_versions).values(
            region=region, version=func.last_insert_id(1), updated_at=at
        )
        stmt = stmt.on_duplicate_key_update(
            version=func.last_insert_id(region_versions.c.version + 1), updated_at=at
        )
        result = connection.execute(stmt)
        # PyMySQL reports LAST_INSERT_ID(expr) as the cursor's lastrowid: no second round trip.
        return int(result.lastrowid)
    upsert = (
        sqlite.insert(region_versions)
        .values(region=region, version=1, updated_at=at)
        .on_conflict_do_update(
            index_elements=[region_versions.c.region],
            set_={"version": region_versions.c.version + 1, "updated_at": at},
        )
        .returning(region_versions.c.version)
    )
    return int(connection.execute(upsert).scalar_one())


def read_region_version(connection: Connection, region: str) -> int:
    """The current value of ``region``'s counter (0 before its first version)."""
    value = connection.execute(
        select(region_versions.c.version).where(region_versions.c.region == region)
    ).scalar_one_or_none()
    return int(value or 0)


@step(key=("region", "purpose"))
def take_version(region: str, purpose: str = "version") -> int:
    """Take the next version of ``region``; replays return the version taken the first time.

    ``purpose`` distinguishes several versions taken for one region within one call
    (``topology``, ``sentinel``, ``policy:<name>``).
    """
    with control_plane_transaction() as connection:
        return increment_region_version(connection, region)


@step(key=("region",))
def read_version(region: str) -> int:
    """Read ``region``'s current version without incrementing it."""
    with control_plane_transaction() as connection:
        return read_region_version(connection, region)
