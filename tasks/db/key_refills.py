"""KeyRefillService's SQL (reference §10): which keys are due on a date, and one batch's refill
committed together with its audit rows and the date's cursor.

Selection (the original's ``ListKeysForRefill``): a key is due on a date when its
``refill_amount`` is set, it is not deleted, it is not full (``remaining_requests`` NULL or
below ``refill_amount``), and it refills daily (``refill_day`` NULL), on this day of the month,
or on a later day than this month has (the month's last day catches up ``refill_day`` 29-31).

Exactly once: ``key_refill_progress`` holds one row per date with an O(1) cursor (the last
``keys.pk`` done). One batch is one transaction: it locks the date's row, locks the next due
keys after the cursor, writes one ``audit_log`` row and two ``audit_log_target`` rows (the key,
the workspace) per key, resets the keys and moves the cursor, so a batch is committed entirely
or not at all, and a kill anywhere resumes after the last committed batch. The batch that
reaches the end of the table marks the date complete: a later call for the date refills
nothing. Audit log ids are derived from the date and the key (``log_refill_<YYYYMMDD>_<pk>``),
so the audit table's unique id would refuse a second audit row for one key and date, too.

Throughput: set-based SQL, no key row travels through Python. A batch locks the next due keys
(``SELECT pk ... ORDER BY pk LIMIT n FOR UPDATE``; under InnoDB's default REPEATABLE READ this
locks every row of the pk range it scans, so the range cannot change under the batch), then
writes with three ``INSERT ... SELECT`` (the audit rows, computed by the database from the
keys' rows before their reset) and one ``UPDATE`` over that pk range. A range scan of the
clustered index measured ~1.7x faster than an ``IN`` list of the same pks, and ~4x faster than
building the rows in Python. API writes to keys of the range wait for the batch (tens of
milliseconds per thousand keys), no longer. ``refill_batches`` runs batch after batch (each
its own transaction) for a few seconds, so that a caller that records each call (a durable
step) pays its per-call cost once per several batches, not per batch.
"""

from __future__ import annotations

import calendar
import datetime as dt
import time
from typing import Any, TypedDict

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Insert,
    String,
    and_,
    cast,
    func,
    literal,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import mysql, sqlite

from tasks.db.engine import is_mysql
from tasks.db.schema import audit_log, audit_log_target, key_refill_progress, keys
from tasks.db.session import control_plane_transaction
from worker.kernel.clock import now_ms
from worker.kernel.errors import RetryableError

__all__ = [
    "BATCH_SIZE",
    "BatchOutcome",
    "RefillStart",
    "audit_log_id",
    "due_keys",
    "read_refill_start",
    "refill_batches",
    "refill_next_batch",
]

# Keys per transaction. Measured on MariaDB 10.11, 150k keys, 50k due: 1000 → 10k keys/s,
# 2000 → 15k, 5000 → 19-21k, 10000 → 26k; 5000 keeps a batch's range locks to ~0.25 s.
BATCH_SIZE = 5000

_ACTOR = ("system", "keyrefill", "Key Refill Service")  # actor type, id, name
_TARGET_COLUMNS = ["workspace_id", "bucket_id", "bucket", "audit_log_id"]
_TARGET_COLUMNS += ["display_name", "type", "id", "name", "meta", "created_at"]


class RefillStart(TypedDict):
    """Where a date's refill stands when a call starts."""

    cursor_pk: int
    keys_refilled: int
    completed: bool
    last_pk: int  # the highest keys.pk at the start (for the progress percentage)


class BatchOutcome(TypedDict):
    """What one batch did (``scanned``/``refilled``: by this batch; ``keys_refilled``: the
    date's total so far)."""

    cursor_pk: int
    scanned: int
    refilled: int
    keys_refilled: int
    completed: bool


def due_keys(day: dt.date) -> ColumnElement[bool]:
    """The selection rule for ``day`` (reference §10.3) as a WHERE clause on ``keys``."""
    last_day = calendar.monthrange(day.year, day.month)[1] == day.day
    refill_day = or_(keys.c.refill_day.is_(None), keys.c.refill_day == day.day)
    if last_day:
        refill_day = or_(refill_day, keys.c.refill_day > day.day)
    return and_(
        keys.c.refill_amount.is_not(None),
        keys.c.deleted_at_m.is_(None),
        or_(
            keys.c.remaining_requests.is_(None),
            keys.c.refill_amount > keys.c.remaining_requests,
        ),
        refill_day,
    )


def _audit_log_prefix(refill_date: str) -> str:
    return f"log_refill_{refill_date.replace('-', '')}_"


def audit_log_id(refill_date: str, key_pk: int) -> str:
    """The audit log id of one key's refill on one date: ``log_refill_<YYYYMMDD>_<key pk>``."""
    return f"{_audit_log_prefix(refill_date)}{key_pk}"


def _audit_log_id_sql(refill_date: str) -> ColumnElement[str]:
    # audit_log_id, computed by the database (INSERT ... SELECT).
    return literal(_audit_log_prefix(refill_date), String) + cast(keys.c.pk, String)


def _lock_progress(connection: Connection, refill_date: str, at: int) -> Any:
    """The date's progress row, created if missing, locked for the transaction (MariaDB: an
    exclusive row lock; SQLite: the write lock, both taken by the upsert)."""
    values = {"refill_date": refill_date, "cursor_pk": 0, "keys_refilled": 0, "updated_at": at}
    if is_mysql(connection):
        upsert: Any = mysql.insert(key_refill_progress).values(**values)
        upsert = upsert.on_duplicate_key_update(updated_at=upsert.inserted.updated_at)
    else:
        upsert = (
            sqlite.insert(key_refill_progress)
            .values(**values)
            .on_conflict_do_update(
                index_elements=[key_refill_progress.c.refill_date], set_={"updated_at": at}
            )
        )
    connection.execute(upsert)
    return connection.execute(
        select(key_refill_progress).where(key_refill_progress.c.refill_date == refill_date)
    ).one()


def read_refill_start(refill_date: str) -> RefillStart:
    """The date's progress (its row created at cursor 0 if missing) and the highest key pk."""
    with control_plane_transaction() as connection:
        row = _lock_progress(connection, refill_date, now_ms())
        last_pk = connection.execute(select(func.max(keys.c.pk))).scalar_one_or_none()
    return RefillStart(
        cursor_pk=int(row.cursor_pk),
        keys_refilled=int(row.keys_refilled),
        completed=row.completed_at is not None,
        last_pk=int(last_pk or 0),
    )


def _lock_batch(connection: Connection, day: dt.date, cursor: int, limit: int) -> list[int]:
    """The pks of the next due keys after ``cursor``; their pk range is locked until the
    transaction ends."""
    return [
        int(pk)
        for pk in connection.execute(
            select(keys.c.pk)
            .where(keys.c.pk > cursor, due_keys(day))
            .order_by(keys.c.pk)
            .limit(limit)
            .with_for_update()
        ).scalars()
    ]


def _count_scanned(connection: Connection, cursor: int, through: int | None) -> int:
    """How many keys lie after ``cursor`` up to ``through`` (None: to the end)."""
    query = select(func.count()).select_from(keys).where(keys.c.pk > cursor)
    if through is not None:
        query = query.where(keys.c.pk <= through)
    return int(connection.execute(query).scalar_one())


def _audit_inserts(refill_date: str, batch: ColumnElement[bool], at: int) -> list[Insert]:
    """One audit log and two targets (the key, the workspace) per key of ``batch``, as the
    original's ``buildAuditLogs``: event ``key.update``, actor system ``keyrefill``, the key
    target's meta ``{refill_amount, previous_remaining, new_remaining}``."""
    log_id = _audit_log_id_sql(refill_date)
    shown = func.coalesce(func.nullif(keys.c.name, ""), keys.c.id)
    at_ = literal(at, BigInteger)
    ids = [keys.c.workspace_id, keys.c.workspace_id, literal("unkey_mutations", String)]
    log_columns = ["workspace_id", "bucket_id", "bucket", "id", "event", "time", "display"]
    log_columns += ["actor_type", "actor_id", "actor_name", "actor_meta", "created_at"]
    key_meta = func.json_object(
        "refill_amount",
        keys.c.refill_amount,
        "previous_remaining",
        keys.c.remaining_requests,
        "new_remaining",
        keys.c.refill_amount,
    )
    return [
        audit_log.insert().from_select(
            log_columns,
            select(
                *ids,
                log_id,
                literal("key.update", String),
                at_,
                func.substr(literal("Refilled key ", String) + shown, 1, 256),
                *(literal(value, String) for value in _ACTOR),
                literal("{}", String),
                at_,
            ).where(batch),
        ),
        audit_log_target.insert().from_select(
            _TARGET_COLUMNS,
            select(
                *ids, log_id, shown, literal("key", String), keys.c.id, keys.c.name, key_meta, at_
            ).where(batch),
        ),
        audit_log_target.insert().from_select(
            _TARGET_COLUMNS,
            select(
                *ids,
                log_id,
                keys.c.workspace_id,
                literal("workspace", String),
                keys.c.workspace_id,
                null(),
                literal("{}", String),
                at_,
            ).where(batch),
        ),
    ]


def _refill(
    connection: Connection, refill_date: str, day: dt.date, pks: list[int], at: int
) -> None:
    """Write the audit rows of the locked due keys ``pks`` (ascending), then reset them (the
    original's RefillKeysByIDs; its ``last_refill_at`` is ``NOW(3)``, here the batch's instant
    in UTC).

    Raises:
        RetryableError: a statement wrote another number of rows than the batch has keys (the
            transaction is rolled back: nothing of the batch is written).
    """
    batch = and_(keys.c.pk >= pks[0], keys.c.pk <= pks[-1], due_keys(day))
    counts = [connection.execute(s).rowcount for s in _audit_inserts(refill_date, batch, at)]
    refilled_at = dt.datetime.fromtimestamp(at / 1000, tz=dt.UTC).replace(tzinfo=None)
    reset = update(keys).where(batch)
    reset = reset.values(
        remaining_requests=keys.c.refill_amount, last_refill_at=refilled_at, updated_at_m=at
    )
    counts.append(connection.execute(reset).rowcount)
    if counts != [len(pks)] * 4:
        raise RetryableError(
            f"key refill {refill_date}: a batch of {len(pks)} keys wrote {counts} rows "
            "(audit logs, key targets, workspace targets, keys); rolled back"
        )


def refill_next_batch(refill_date: str, limit: int | None = None) -> BatchOutcome:
    """Refill the next ``limit`` due keys after the date's cursor, in one transaction.

    Args:
        refill_date: the date, ``YYYY-MM-DD`` (already validated).
        limit: the most keys one transaction refills (default ``BATCH_SIZE``).

    Returns:
        What the batch did; ``completed`` once the date's last due key is refilled (the batch
        of a completed date does nothing).

    Raises:
        RetryableError: the batch's writes disagreed (rolled back; see ``_refill``).
    """
    day = dt.date.fromisoformat(refill_date)
    limit = limit or BATCH_SIZE
    at = now_ms()
    with control_plane_transaction() as connection:
        progress = _lock_progress(connection, refill_date, at)
        cursor, total = int(progress.cursor_pk), int(progress.keys_refilled)
        if progress.completed_at is not None:
            return BatchOutcome(
                cursor_pk=cursor, scanned=0, refilled=0, keys_refilled=total, completed=True
            )
        pks = _lock_batch(connection, day, cursor, limit)
        # A short batch reached the end of the table: this transaction completes the date.
        completed = len(pks) < limit
        scanned = _count_scanned(connection, cursor, None if completed else pks[-1])
        if pks:
            _refill(connection, refill_date, day, pks, at)
            cursor, total = pks[-1], total + len(pks)
        connection.execute(
            update(key_refill_progress)
            .where(key_refill_progress.c.refill_date == refill_date)
            .values(
                cursor_pk=cursor,
                keys_refilled=total,
                completed_at=at if completed else None,
                updated_at=at,
            )
        )
    return BatchOutcome(
        cursor_pk=cursor,
        scanned=scanned,
        refilled=len(pks),
        keys_refilled=total,
        completed=completed,
    )


def refill_batches(refill_date: str, seconds: float, limit: int | None = None) -> BatchOutcome:
    """Refill batch after batch (``refill_next_batch``, each its own transaction) until the date
    is complete or ``seconds`` have passed since the first batch began (at least one batch).

    Each batch starts at the date's cursor in the database, so stopping (or dying) between two
    batches loses nothing and repeats nothing: a later call continues after the last commit.

    Args:
        refill_date: the date, ``YYYY-MM-DD`` (already validated).
        seconds: no further batch starts once this much time has passed.
        limit: the most keys one transaction refills (default ``BATCH_SIZE``).

    Returns:
        What the batches did together (``scanned``/``refilled``: summed; ``cursor_pk``,
        ``keys_refilled``, ``completed``: after the last of them).

    Raises:
        RetryableError: a batch's writes disagreed (that batch rolled back; the ones before
            it stay committed).
    """
    began = time.monotonic()
    scanned = refilled = 0
    while True:
        outcome = refill_next_batch(refill_date, limit)
        scanned += outcome["scanned"]
        refilled += outcome["refilled"]
        if outcome["completed"] or time.monotonic() - began >= seconds:
            return BatchOutcome(
                cursor_pk=outcome["cursor_pk"],
                scanned=scanned,
                refilled=refilled,
                keys_refilled=outcome["keys_refilled"],
                completed=outcome["completed"],
            )
