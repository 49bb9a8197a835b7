"""KeyRefillService.RunRefill: the original's tests (reference §10.4) and the selection rule's
edges, in-process against the session's MariaDB and Prefect server.

The refill scans the whole ``keys`` table: each test seeds keys in workspaces of its own, picks
its own dates, and removes its keys, their audit rows and its dates' progress rows after.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import SecretStr
from pytest_httpserver import HTTPServer

from flows.key_refill import run_key_refill
from tasks.db import key_refills
from tasks.db.engine import engine_for
from tasks.db.schema import audit_log_target, key_refill_progress, keys
from tests.flows.helpers import fails_at_once
from tests.support.key_refill_seed import KeySeed
from worker.kernel.errors import InvalidParameterError, RetryableError
from worker.kernel.steps import durable_call
from worker.settings import use_settings, worker_settings

pytestmark = pytest.mark.mysql


@pytest.fixture
def seed(control_db: str) -> Iterator[KeySeed]:
    made = KeySeed(control_db)
    yield made
    made.cleanup()


def _refill(seed: KeySeed, date: str, key: str | None = None) -> int:
    """Run the refill for ``date`` in-process (under the call key ``key`` when given)."""
    seed.dates.add(date)
    if key is None:
        result = asyncio.run(run_key_refill(date=date))
    else:
        with durable_call(key):
            result = asyncio.run(run_key_refill(date=date))
    assert set(result) == {"keys_refilled"}
    return int(result["keys_refilled"])


def _refilled(seed: KeySeed, date: str, **key: Any) -> bool:
    """Seed one key that is not full, refill ``date``; tell whether the key was refilled."""
    key_id = seed.add(remaining=3, **key)
    _refill(seed, date)
    return seed.key(key_id).remaining_requests == key.get("refill_amount", 100)


# -- the original's tests (run_refill_handler_test.go) -----------------------------------------


def test_daily_key_is_refilled(seed: KeySeed) -> None:
    """A key without a refill day refills every day: remaining reset to the refill amount,
    ``last_refill_at`` and ``updated_at_m`` stamped."""
    key_id = seed.add(refill_amount=1000, remaining=12)

    refilled = _refill(seed, "2025-03-11")

    row = seed.key(key_id)
    assert refilled >= 1
    assert row.remaining_requests == 1000
    assert row.last_refill_at is not None and row.updated_at_m is not None


def test_key_on_its_refill_day_is_refilled(seed: KeySeed) -> None:
    """A key with ``refill_day`` = the date's day of the month is refilled."""
    assert _refilled(seed, "2025-03-15", refill_day=15)


def test_key_on_another_day_is_skipped(seed: KeySeed) -> None:
    """A key with another ``refill_day`` is left as it is, with no audit row."""
    key_id = seed.add(remaining=3, refill_day=16)

    _refill(seed, "2025-03-15")

    assert seed.key(key_id).remaining_requests == 3
    assert seed.key(key_id).last_refill_at is None
    assert seed.audit_logs() == []


def test_full_key_is_skipped(seed: KeySeed) -> None:
    """A key whose remaining equals its refill amount is not touched and gets no audit row."""
    key_id = seed.add(refill_amount=50, remaining=50)

    _refill(seed, "2025-03-12")

    assert seed.key(key_id).last_refill_at is None
    assert seed.audit_logs() == []


def test_refill_writes_one_audit_log_and_two_targets_per_key(seed: KeySeed) -> None:
    """Every refilled key gets one audit log (``key.update``, "Refilled key <name|id>", actor
    system/keyrefill) and two targets: the key, with ``{refill_amount, previous_remaining,
    new_remaining}``, and its workspace; all in the key's workspace bucket."""
    named = seed.add(refill_amount=100, remaining=7, name="billing key")
    unnamed = seed.add(refill_amount=20, remaining=None, name=None, workspace=1)

    assert _refill(seed, "2025-03-13") >= 2

    logs = {log.id: log for log in seed.audit_logs()}
    assert len(logs) == 2
    by_display = {log.display: log for log in logs.values()}
    assert set(by_display) == {"Refilled key billing key", f"Refilled key {unnamed}"}
    for log in logs.values():
        assert (log.event, log.bucket, log.bucket_id) == (
            "key.update",
            "unkey_mutations",
            log.workspace_id,
        )
        assert (log.actor_type, log.actor_id, log.actor_name) == (
            "system",
            "keyrefill",
            "Key Refill Service",
        )
        assert log.time == log.created_at
    targets = seed.audit_targets()
    assert len(targets) == 4
    by_key = {(t.audit_log_id, t.type): t for t in targets}
    named_log = by_display["Refilled key billing key"]
    key_target = by_key[(named_log.id, "key")]
    assert (key_target.id, key_target.name, key_target.display_name) == (
        named,
        "billing key",
        "billing key",
    )
    assert key_target.meta == {"refill_amount": 100, "previous_remaining": 7, "new_remaining": 100}
    workspace_target = by_key[(named_log.id, "workspace")]
    assert workspace_target.id == workspace_target.display_name == named_log.workspace_id
    assert workspace_target.meta == {} and workspace_target.name is None
    unnamed_log = by_display[f"Refilled key {unnamed}"]
    assert by_key[(unnamed_log.id, "key")].meta == {
        "refill_amount": 20,
        "previous_remaining": None,
        "new_remaining": 20,
    }


def test_same_date_twice_refills_zero_the_second_time(seed: KeySeed) -> None:
    """A second call for a date refills nothing and writes no audit row, even for a key that
    was used up again in between (the date's cursor says done); a call replayed under the
    first call's key returns the first result."""
    key_id = seed.add(remaining=1)
    first = _refill(seed, "2025-03-14", key="refill-twice-first")
    with engine_for(seed.url).begin() as connection:
        connection.execute(keys.update().where(keys.c.id == key_id).values(remaining_requests=0))

    second = _refill(seed, "2025-03-14")
    replayed = _refill(seed, "2025-03-14", key="refill-twice-first")

    assert first >= 1 and second == 0 and replayed == first
    assert seed.key(key_id).remaining_requests == 0
    assert len(seed.audit_logs()) == 1


def test_last_day_of_february_refills_refill_days_the_month_lacks(seed: KeySeed) -> None:
    """On 2025-02-28 (the last day) keys with refill_day 28, 29, 30 and 31 are refilled;
    refill_day 27 is not."""
    ids = {day: seed.add(remaining=1, refill_day=day) for day in (27, 28, 29, 30, 31)}

    _refill(seed, "2025-02-28")

    remaining = seed.remaining(ids.values())
    assert {day: remaining[key_id] for day, key_id in ids.items()} == {
        27: 1,
        28: 100,
        29: 100,
        30: 100,
        31: 100,
    }


def test_deleted_key_is_skipped(seed: KeySeed) -> None:
    """A deleted key is never refilled, whatever its refill day."""
    assert not _refilled(seed, "2025-03-16", deleted=True)


# -- the selection rule's edges ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("date", "refilled_days"),
    [
        ("2024-02-28", {28}),  # a leap year: the 28th is not February's last day
        ("2024-02-29", {29, 30, 31}),
        ("2025-04-30", {30, 31}),  # a 30-day month: the 30th catches up the 31st
        ("2025-05-30", {30}),  # a 31-day month: the 31st waits for its day
        ("2025-05-31", {31}),
    ],
)
def test_month_end_catch_up_follows_the_calendar(
    seed: KeySeed, date: str, refilled_days: set[int]
) -> None:
    """refill_day equal to the day refills; greater ones only on the month's last day."""
    ids = {day: seed.add(remaining=1, refill_day=day) for day in (27, 28, 29, 30, 31)}

    _refill(seed, date)

    remaining = seed.remaining(ids.values())
    assert {day for day, key_id in ids.items() if remaining[key_id] == 100} == refilled_days


def test_key_without_refill_amount_is_skipped(seed: KeySeed) -> None:
    """A key with no refill amount has no refill (remaining stays, no audit row)."""
    key_id = seed.add(refill_amount=None, remaining=4)

    _refill(seed, "2025-03-17")

    assert seed.key(key_id).remaining_requests == 4
    assert seed.audit_logs() == []


def _progress_rows(url: str) -> int:
    with engine_for(url).connect() as connection:
        return int(
            connection.execute(
                sa.select(sa.func.count()).select_from(key_refill_progress)
            ).scalar_one()
        )


@pytest.mark.parametrize("date", ["2025-02-30", "2025-2-01", "yesterday", "", 20250101])
def test_bad_date_fails_at_once_and_writes_nothing(seed: KeySeed, date: Any) -> None:
    """A date that is not a calendar day as YYYY-MM-DD fails the call at once, naming
    ``date``, before anything is written (no progress row, no key touched)."""
    key_id = seed.add(remaining=2)
    progress_rows = _progress_rows(seed.url)

    error = fails_at_once(InvalidParameterError, run_key_refill, date=date)

    assert error.parameter == "date"
    assert seed.key(key_id).remaining_requests == 2
    assert _progress_rows(seed.url) == progress_rows


def test_default_date_is_the_runs_utc_day(seed: KeySeed) -> None:
    """Without a date the call refills today's (UTC) keys under today's key."""
    today = dt.datetime.now(dt.UTC).date().isoformat()
    key_id = seed.add(remaining=5)
    seed.dates.add(today)

    assert asyncio.run(run_key_refill())["keys_refilled"] >= 1

    assert seed.key(key_id).remaining_requests == 100
    assert seed.progress(today).completed_at is not None


# -- batches, cursor and heartbeat ---------------------------------------------------------------


def test_batches_move_the_cursor_and_refill_every_key_once(
    seed: KeySeed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 5 keys per batch, 12 due keys among 18 take three batches: every due key is
    refilled with one audit log, full ones are not, and the date's cursor ends on the last
    key with 12 refilled."""
    monkeypatch.setattr(key_refills, "BATCH_SIZE", 5)
    due = [seed.add(remaining=i) for i in range(12)]
    full = [seed.add(remaining=100) for _ in range(6)]

    assert _refill(seed, "2025-03-18") == 12

    assert set(seed.remaining(due).values()) == {100}
    assert len(seed.audit_logs()) == 12
    assert {t.id for t in seed.audit_targets() if t.type == "key"} == set(due)
    progress = seed.progress("2025-03-18")
    assert progress.keys_refilled == 12 and progress.completed_at is not None
    assert progress.cursor_pk == max(seed.key(k).pk for k in due) < seed.key(full[0]).pk


def test_refill_resumes_after_the_last_committed_batch(
    seed: KeySeed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A date whose first batch committed before the call died: the next call refills only the
    keys after the cursor (none twice, one audit log each) and reports just those."""
    monkeypatch.setattr(key_refills, "BATCH_SIZE", 4)
    due = [seed.add(remaining=1) for _ in range(10)]
    seed.dates.add("2025-03-19")
    first = key_refills.refill_next_batch("2025-03-19")
    assert (first["refilled"], first["completed"]) == (4, False)

    assert _refill(seed, "2025-03-19") == 6

    assert set(seed.remaining(due).values()) == {100}
    logs = seed.audit_logs()
    assert len(logs) == 10 and len({log.id for log in logs}) == 10


def test_a_batch_is_all_or_nothing(seed: KeySeed) -> None:
    """A batch whose audit target insert fails (a conflicting row) writes nothing: no key
    reset, no audit log, no cursor; once the conflict is gone it refills them all."""
    due = [seed.add(remaining=2) for _ in range(3)]
    seed.dates.add("2025-03-20")
    victim = seed.key(due[1])
    with engine_for(seed.url).begin() as connection:
        connection.execute(
            audit_log_target.insert().values(
                workspace_id=victim.workspace_id,
                bucket_id=victim.workspace_id,
                audit_log_id=key_refills.audit_log_id("2025-03-20", victim.pk),
                display_name="in the way",
                type="key",
                id=victim.id,
                created_at=1,
            )
        )

    with pytest.raises(sa.exc.IntegrityError):
        key_refills.refill_next_batch("2025-03-20")

    assert set(seed.remaining(due).values()) == {2}
    assert seed.audit_logs() == []
    assert seed.progress("2025-03-20") is None  # created by the batch: rolled back with it
    with engine_for(seed.url).begin() as connection:
        connection.execute(
            sa.delete(audit_log_target).where(audit_log_target.c.display_name == "in the way")
        )
    assert key_refills.refill_next_batch("2025-03-20")["refilled"] == 3
    assert set(seed.remaining(due).values()) == {100}


def test_writes_that_disagree_roll_the_batch_back(
    seed: KeySeed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If a batch's statements wrote different numbers of rows the batch is rolled back
    (retryable), so a refill and its audit rows never commit apart."""
    due = seed.add(remaining=2)
    seed.dates.add("2025-03-21")
    real = key_refills._audit_inserts
    # The workspace targets' statement goes missing.
    monkeypatch.setattr(key_refills, "_audit_inserts", lambda *args: real(*args)[:2])

    with pytest.raises(RetryableError, match="rolled back"):
        key_refills.refill_next_batch("2025-03-21")

    assert seed.remaining([due]) == {due: 2}
    assert seed.audit_logs() == []


def test_heartbeat_after_a_successful_refill(seed: KeySeed, httpserver: HTTPServer) -> None:
    """A refill that completes pings ``UNKEY_KEY_REFILL_HEARTBEAT_URL`` once."""
    httpserver.expect_request("/refill-heartbeat").respond_with_data("ok")
    settings = worker_settings()
    use_settings(
        settings.model_copy(
            update={"key_refill_heartbeat_url": SecretStr(httpserver.url_for("/refill-heartbeat"))}
        )
    )
    try:
        seed.add(remaining=1)
        _refill(seed, "2025-03-22")
    finally:
        use_settings(settings)

    assert [request.path for request, _ in httpserver.log] == ["/refill-heartbeat"]
