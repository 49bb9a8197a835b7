"""CertificateService.RenewExpiringCertificates: the daily sweep that keeps certificates fresh.

Importable from ``flows.certificate`` (its deployment's entrypoint is
``flows/certificate.py:renew_expiring_certificates``); cron ``0 3 * * *`` UTC, each scheduled
run keyed ``cert-renewal-<YYYY-MM-DD>`` (the original's key), so a run started by hand with
that key replays the day's sweep instead of sweeping twice. Key: ``certificate:global``.

What is swept (``select due challenges``, one step, so a resumed sweep acts on the same set):
``waiting`` challenges (new domains, the platform wildcards); ``verified`` ones that are due
(**+**: inside the CA's RFC 9773 ARI window when the directory offers ``renewalInfo``, else
when a third of the lifetime remains; a ``days_before_expiry`` given to the sweep also makes
due whatever expires within that many days); and **(fix)** ``failed`` ones after a backoff:
1 h after the first failure, doubling per consecutive failure, at most 24 h (the original
never retried them). The rules are ``tasks.acme.renewal``'s.

Fan-out: one ``process_challenge`` call per due domain (``send call``, idempotency key
``renew-<domain>-<date>``, ``-retry<n>`` added for the n-th retry of a failed challenge so a
retry is a new call, not the failed one replayed), at most
``UNKEY_CERT_RENEWAL_CONCURRENCY`` (10) in flight, each awaited (``await renewal``, a step
per domain). A renewal carries ``replaces`` when the CA offers ARI (the issuance adds it).
A resumed sweep starts no call twice (the send steps replay their run ids) and replays the
outcome of every domain that finished.

After the sweep: a table artifact of every domain acted on (renewed, failed and why) and the
heartbeat (``UNKEY_CERT_RENEWAL_HEARTBEAT_URL``, a secret never logged; ``send heartbeat``).
Failure: a domain whose call fails is listed in ``failed_domains`` (its challenge is left
``failed`` by the call, retried by a later sweep after its backoff); the sweep itself fails
only when it cannot select or cannot send the heartbeat (the step retries first), and then
sends no heartbeat. With ACME disabled the sweep does nothing (and sends no heartbeat).
"""

from __future__ import annotations

import asyncio
import datetime
from typing import Any
from uuid import UUID

from prefect import get_run_logger

from flows.params import Params
from tasks.acme.account import ensure_account
from tasks.acme.client import ari_window, renewal_info_url
from tasks.acme.errors import classify
from tasks.acme.renewal import is_due, parse_leaf, retry_at_ms
from tasks.artifacts import publish_table
from tasks.db import renewals as renewal_db
from tasks.http import send_heartbeat
from tasks.prefect_calls import send_call
from worker.client import FlowRunFailed, wait_for_result
from worker.kernel.clock import now_ms
from worker.kernel.service import critical_section, parse, service_flow
from worker.kernel.steps import step
from worker.settings import worker_settings

__all__ = ["renew_expiring_certificates", "select_due"]


class RenewalParams(Params):
    days_before_expiry: int | None = None


def _moment(at_ms: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(at_ms / 1000, tz=datetime.UTC)


class _AriWindows:
    """The CA's ARI window starts, fetched lazily (a client is built only if one is needed)."""

    def __init__(self) -> None:
        self._client: Any = None
        self._offered: bool | None = None

    async def start_of(self, domain: str, ari_id: str | None) -> datetime.datetime | None:
        if self._offered is None:
            try:
                account = await ensure_account()
                self._client = await asyncio.to_thread(account.client)
            except Exception as exc:
                raise classify(exc) from None
            self._offered = renewal_info_url(self._client) is not None
        if not self._offered or ari_id is None:
            return None
        try:
            return (await asyncio.to_thread(ari_window, self._client, ari_id))[0]
        except Exception as exc:  # one unknown certificate must not stop the sweep
            get_run_logger().warning(
                "no ARI window for %s (%s): the lifetime rule applies", domain, classify(exc)
            )
            return None


async def _why_due(
    candidate: renewal_db.RenewalCandidate,
    at_ms: int,
    days_before_expiry: int | None,
    windows: _AriWindows,
) -> str | None:
    if candidate.status == "waiting":
        return "waiting"
    if candidate.status == "failed":
        if candidate.failed_at is None or at_ms >= retry_at_ms(
            candidate.failed_at, candidate.failures
        ):
            return f"retry {candidate.failures}"
        return None
    if candidate.chain_pem is None:
        return "no certificate"
    try:
        leaf = parse_leaf(candidate.chain_pem)
    except ValueError:
        return "unreadable certificate"
    now = _moment(at_ms)
    start = await windows.start_of(candidate.domain, leaf.ari_id)
    if is_due(leaf, now, ari_window_start=start, days_before_expiry=days_before_expiry):
        return "ARI window" if start is not None else "expiring"
    return None


async def select_due(
    days_before_expiry: int | None, at_ms: int
) -> tuple[int, list[dict[str, Any]]]:
    """The challenges considered and those due at ``at_ms`` (see the module's rules).

    Args:
        days_before_expiry: also due when NotAfter is at most this many days away; None: only
            the ARI window or the lifetime rule.
        at_ms: the sweep's instant (ms since the epoch).

    Returns:
        ``(considered, due)``; each due entry is ``{"domain", "workspace_id", "reason",
        "attempt"}`` (``attempt``: the failures so far, 0 unless it is a retry).

    Raises:
        RetryableError: the CA's directory could not be fetched (ARI check).
        TerminalError: the CA refused the account.
    """
    candidates = await asyncio.to_thread(renewal_db.list_renewal_candidates)
    windows = _AriWindows()
    due = []
    for candidate in candidates:
        reason = await _why_due(candidate, at_ms, days_before_expiry, windows)
        if reason is not None:
            due.append(
                {
                    "domain": candidate.domain,
                    "workspace_id": candidate.workspace_id,
                    "reason": reason,
                    "attempt": candidate.failures if candidate.status == "failed" else 0,
                }
            )
    return len(candidates), due


@step(name="sweep instant")
def _sweep_instant() -> int:
    # Recorded once: a resumed sweep judges dueness and names its calls by the same instant.
    return now_ms()


@step(name="select due challenges")
async def _select(days_before_expiry: int | None, at_ms: int) -> dict[str, Any]:
    considered, due = await select_due(days_before_expiry, at_ms)
    return {"considered": considered, "due": due}


@step(name="await renewal", key=("idempotency_key",))
async def _await_renewal(idempotency_key: str, flow_run_id: str) -> dict[str, Any]:
    """The outcome of one renewal call: ``{"ok": True, "error": ""}`` or
    ``{"ok": False, "error": <the run's failure>}``."""
    try:
        await wait_for_result(UUID(flow_run_id))
    except FlowRunFailed as failed:
        return {"ok": False, "error": str(failed)}
    return {"ok": True, "error": ""}


@step(name="send heartbeat")
def _heartbeat() -> bool:
    return send_heartbeat(
        worker_settings().cert_renewal_heartbeat_url, "certificate renewal heartbeat"
    )


def _idempotency_key(entry: dict[str, Any], date: str) -> str:
    key = f"renew-{entry['domain']}-{date}"
    return f"{key}-retry{entry['attempt']}" if entry["attempt"] else key


async def _renew(entry: dict[str, Any], date: str, slots: asyncio.Semaphore) -> dict[str, Any]:
    key = _idempotency_key(entry, date)
    async with slots:
        try:
            run_id = await send_call(
                "process_challenge",
                {"workspace_id": entry["workspace_id"], "domain": entry["domain"]},
                idempotency_key=key,
            )
            outcome = await _await_renewal(key, run_id)
        except Exception as exc:  # the call could not even be started: listed, not fatal
            outcome = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {**entry, **outcome}


@service_flow("renew_expiring_certificates", tick_key="cert-renewal-{tick:%Y-%m-%d}")
async def renew_expiring_certificates(days_before_expiry: int | None = None) -> dict[str, Any]:
    """Renew due certificates, issue waiting ones, retry failed ones (cron 03:00 UTC)."""
    params = parse(RenewalParams, days_before_expiry=days_before_expiry)
    log = get_run_logger()
    settings = worker_settings()
    if not settings.acme_enabled:
        log.info("ACME is disabled (UNKEY_ACME_ENABLED): no certificate to renew")
        return {"certificates_checked": 0, "renewals_triggered": 0, "failed_domains": []}
    async with critical_section("certificate:global"):
        at_ms = _sweep_instant()
        date = _moment(at_ms).strftime("%Y-%m-%d")
        selected = await _select(params.days_before_expiry, at_ms)
        slots = asyncio.Semaphore(settings.cert_renewal_concurrency)
        outcomes = await asyncio.gather(*(_renew(e, date, slots) for e in selected["due"]))
        failed = [o["domain"] for o in outcomes if not o["ok"]]
        await publish_table(
            f"cert-renewal-{date}",
            [
                {
                    "domain": o["domain"],
                    "due_because": o["reason"],
                    "outcome": "renewed" if o["ok"] else "failed",
                    "error": o["error"],
                }
                for o in outcomes
            ],
            f"{selected['considered']} challenge(s) checked, {len(outcomes)} renewal(s), "
            f"{len(failed)} failed",
        )
        _heartbeat()
    log.info(
        "checked %d challenge(s): %d renewal(s) started, %d failed",
        selected["considered"],
        len(outcomes),
        len(failed),
    )
    return {
        "certificates_checked": selected["considered"],
        "renewals_triggered": len(outcomes),
        "failed_domains": failed,
    }
