"""KeyRefillService.RunRefill: the daily reset of API keys' usage limits to their refill amount.

Cron ``0 0 * * *`` UTC; each scheduled run is keyed ``key-refill-<YYYY-MM-DD>`` (the
original's idempotency key), so a run started by hand with that key replays the day's refill
instead of refilling twice. Key: ``key-refill:{date}``, one refill of a date at a time.

What is refilled: the original's rule (reference §10.3; ``tasks.db.key_refills.due_keys``):
daily keys, keys whose ``refill_day`` is the date's day of the month, and on the month's last
day those whose ``refill_day`` the month does not have; full and deleted keys are skipped.
Each refilled key gets ``remaining_requests = refill_amount``, ``last_refill_at`` and
``updated_at_m``, one ``audit_log`` row and two ``audit_log_target`` rows (the key, the
workspace), committed in one transaction with the key.

Why this is durable **(fix)**: the date's progress is an O(1) cursor (the last key pk done) in
``key_refill_progress``, moved in the same transaction as each batch of up to 5000 keys
(bulk SQL, not 100 keys per round trip), not a set of key ids. A run killed anywhere resumes
after the last committed batch; no key is refilled twice and none gets a second audit row for
the date. The batch that reaches the end marks the date complete, so a second call for the
same date refills 0 and writes no audit row.

Steps: ``refill date`` (only without a ``date``: the UTC date of the run's intended start, so a
scheduled run is the tick's day however late it starts), ``read refill progress`` (where the
date stood when this call started, recorded once: the call's ``keys_refilled`` is the
difference), ``refill batches`` (one per ~5 s of batches, each batch its own transaction: a
step's own cost, ~0.1-0.4 s of Prefect API calls, is paid once per several batches instead of
per batch), ``send heartbeat`` (``UNKEY_KEY_REFILL_HEARTBEAT_URL``, a secret never logged)
after success.

Failure: a bad date fails the call at once (``InvalidParameterError`` naming ``date``),
before anything is written. Database errors are retried by the batches step (a batch is all or
nothing; the step's earlier batches stay committed and its retry continues after them), then
fail the call; a new call for the date continues from the cursor. A failed heartbeat fails the
call after its retries (as the original); the refill stays done.
"""

from __future__ import annotations

import datetime as dt
import re
import time

from prefect import get_run_logger
from prefect.context import FlowRunContext
from pydantic import field_validator

from flows.params import Params
from tasks.artifacts import Progress
from tasks.db.key_refills import BatchOutcome, RefillStart, read_refill_start, refill_batches
from tasks.http import send_heartbeat
from worker.kernel.clock import now
from worker.kernel.service import critical_section, parse, service_flow
from worker.kernel.steps import step
from worker.settings import worker_settings

__all__ = ["run_key_refill"]

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
# The progress artifact is updated at most this often (each update is an API call).
_REPORT_EVERY_SECONDS = 2.0
# One "refill batches" step starts no further batch after this long (bench/key_refill: at 5000
# keys per batch, one step per batch spent ~40 % of a 1M-key refill's wall in step overhead).
_STEP_SECONDS = 5.0


class RefillParams(Params):
    date: str | None = None

    @field_validator("date")
    @classmethod
    def _calendar_date(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not _DATE.fullmatch(value):
            raise ValueError(f"'{value}' is not a date of the form YYYY-MM-DD")
        try:
            dt.date.fromisoformat(value)
        except ValueError:
            raise ValueError(f"'{value}' is not a day of the calendar") from None
        return value


@step(name="refill date")
def _refill_date() -> str:
    # The day the run was meant for: a scheduled run's tick (a worker may start it a little
    # early or late), a manual run's creation; recorded, so a resume keeps the same day.
    ctx = FlowRunContext.get()
    run = ctx.flow_run if ctx is not None else None
    at = run.expected_start_time if run is not None and run.expected_start_time else now()
    return at.astimezone(dt.UTC).date().isoformat()


@step(name="read refill progress", key=("refill_date",))
def _read_progress(refill_date: str) -> RefillStart:
    return read_refill_start(refill_date)


@step(name="refill batches", key=("after_pk",), run_name="refill keys after pk {after_pk}")
def _refill_batches(refill_date: str, after_pk: int) -> BatchOutcome:
    """Batches for up to ``_STEP_SECONDS``, one transaction each; ``after_pk`` (the cursor this
    call last saw) names the step: each batch starts at the date's cursor in the database, so
    a batch committed just before a kill (the step's record lost) is never done again."""
    return refill_batches(refill_date, _STEP_SECONDS)


@step(name="send heartbeat")
def _heartbeat() -> bool:
    return send_heartbeat(worker_settings().key_refill_heartbeat_url, "key refill heartbeat")


class _Report:
    """The progress artifact: keys scanned and refilled, keys/s, share of the key table."""

    def __init__(self, refill_date: str, start: RefillStart) -> None:
        self.progress = Progress(f"key refill {refill_date}", [])
        self.start = start
        self.scanned = self.refilled = 0
        self.began = time.monotonic()
        self.reported = 0.0

    async def batch(self, outcome: BatchOutcome) -> None:
        self.scanned += outcome["scanned"]
        self.refilled += outcome["refilled"]
        if not outcome["completed"] and time.monotonic() - self.reported < _REPORT_EVERY_SECONDS:
            return
        self.reported = time.monotonic()
        rate = self.refilled / max(self.reported - self.began, 1e-3)
        note = f"{self.scanned} keys scanned, {self.refilled} refilled, {rate:.0f} keys/s"
        share = 100.0 * outcome["cursor_pk"] / max(self.start["last_pk"], 1)
        await self.progress.report(100.0 if outcome["completed"] else share, note)
        get_run_logger().info("key refill: %s (cursor at pk %d)", note, outcome["cursor_pk"])


@service_flow("run_key_refill", tick_key="key-refill-{tick:%Y-%m-%d}")
async def run_key_refill(date: str | None = None) -> dict[str, int]:
    """Refill the usage limits of the keys due on ``date`` (YYYY-MM-DD, default today UTC)."""
    params = parse(RefillParams, date=date)
    refill_date = params.date or _refill_date()
    async with critical_section(f"key-refill:{refill_date}"):
        start = _read_progress(refill_date)
        report = _Report(refill_date, start)
        await report.progress.start()
        if start["completed"]:
            await report.progress.report(100.0, "already refilled by an earlier call, 0 keys")
        cursor, total, completed = start["cursor_pk"], start["keys_refilled"], start["completed"]
        while not completed:
            outcome = _refill_batches(refill_date, cursor)
            cursor, total, completed = (
                outcome["cursor_pk"],
                outcome["keys_refilled"],
                outcome["completed"],
            )
            await report.batch(outcome)
    _heartbeat()
    refilled = total - start["keys_refilled"]
    get_run_logger().info("key refill %s: %d key(s) refilled", refill_date, refilled)
    return {"keys_refilled": refilled}
