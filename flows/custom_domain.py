"""CustomDomainService (reference §7): add a custom domain, verify its ownership over DNS, retry
or delete it. Every call on one domain runs under the key ``custom-domain:{domain}``.

- ``add_custom_domain`` validates the name (at most 253 characters, DNS labels, no wildcard),
  checks the project and environment belong to the workspace, draws the verification token
  and the ``<random16>.<UNKEY_CNAME_DOMAIN>`` target (a step: a replay keeps them), starts
  ``verify_domain`` and inserts the row (``pending``) naming that run as its verification. It
  returns ``{domain, target_cname, verification_token, verification_status}`` at once.
- ``verify_domain`` claims the domain's verification (only when it has none, or it is this
  run's: ``custom_domains.invocation_id``), then checks DNS: TXT ``_unkey.<domain>`` must hold
  ``unkey-domain-verify=<token>`` and the domain must be a CNAME to the target
  (``UNKEY_DNS_NAMESERVERS``). A failed check is counted and its findings kept
  (``verification_error``), then the call waits ``UNKEY_CUSTOM_DOMAIN_CHECK_SECONDS`` durably
  (no process and no key held; a resume or a wake-up replays nothing but the claim) and checks
  again, until ``UNKEY_CUSTOM_DOMAIN_VERIFY_TIMEOUT_SECONDS`` after this verification started
  (recorded with the claim, **fix**: the original measured from the row's creation): then
  ``failed`` with what was missing and what was found. On success: ``verified``, an HTTP-01
  ``waiting`` challenge (idempotent), the issuance started (``process_challenge``, when ACME
  is enabled; else the renewal sweep issues later), and a live-sticky frontline route to the
  project's live deployment. Every check and write after the key is (re)taken reads the row
  again: a verification that was superseded or deleted meanwhile ends without writing.
- ``retry_verification`` cancels the running verification (a sleeping one is cancelled; one
  that is running finds itself superseded), resets the row and starts a new verification.
  A ``verified`` domain is refused (nothing to retry).
- ``delete_custom_domain`` cancels the verification, then deletes the frontline route, the
  challenge and the domain in one transaction.

Failure: bad parameters are terminal before anything is written. Any end of a verification
without success (the deadline, a terminal error, retries or resumptions exhausted) leaves the
domain ``failed`` with the reason (the give-up hook; also after a kill the worker gives up on).
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger
from prefect.context import FlowRunContext
from pydantic import field_validator

from flows.params import Id, Params
from tasks.custom_domain_names import (
    new_target_cname,
    new_verification_token,
    validate_custom_domain,
)
from tasks.db import custom_domains as domains_db
from tasks.db.custom_domains import CustomDomain
from tasks.db.deploys import find_environment, find_project
from tasks.db.frontline import insert_frontline_route
from tasks.dns import DomainCheck, verify_ownership
from tasks.prefect_calls import cancel_scheduled_run, send_call
from worker.kernel.clock import new_id, now, now_ms
from worker.kernel.errors import ConflictError, NotFoundError, RefusedError
from worker.kernel.service import critical_section, parse, service_flow
from worker.kernel.sleep import durable_sleep
from worker.kernel.steps import call_key, step
from worker.settings import worker_settings

__all__ = [
    "CHALLENGE_VALIDITY_MILLIS",
    "add_custom_domain",
    "delete_custom_domain",
    "retry_verification",
    "verify_domain",
]

CHALLENGE_VALIDITY_MILLIS = 30 * 86400 * 1000  # the original's expires_at = now + 30 d


def _domain_key(domain: str) -> str:
    return f"custom-domain:{domain}"


class DomainParams(Params):
    domain: str

    @field_validator("domain")
    @classmethod
    def _valid(cls, value: str) -> str:
        return validate_custom_domain(value)


class AddParams(DomainParams):
    workspace_id: Id
    project_id: Id
    environment_id: Id


def _parse_domain(domain: str) -> str:
    return parse(DomainParams, domain=domain).domain


def _this_run() -> str:
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        raise RuntimeError("custom-domain calls must run as flow runs")
    return str(ctx.flow_run.id)


def _resolve(domain: str) -> CustomDomain:
    row = domains_db.find_custom_domain(domain)
    if row is None:
        raise NotFoundError(f"custom domain '{domain}' not found")
    return row


# -- add ----------------------------------------------------------------------------------------


@step(name="draw verification values")
def draw_values() -> dict[str, str]:
    """The new domain's id, token and CNAME target (drawn once per call)."""
    return {
        "id": new_id("cd"),
        "verification_token": new_verification_token(),
        "target_cname": new_target_cname(worker_settings().cname_domain),
    }


@step(name="insert custom domain")
def insert_domain(values: dict[str, Any]) -> None:
    """The row, ``pending``, its verification the run just started (a replay is a no-op)."""
    domains_db.insert_custom_domain(values)


@service_flow("add_custom_domain", run_name="add-custom-domain-{domain}")
async def add_custom_domain(
    workspace_id: str, project_id: str, environment_id: str, domain: str
) -> dict[str, Any]:
    """Add a custom domain to a project's environment and start verifying it."""
    params = parse(
        AddParams,
        workspace_id=workspace_id,
        project_id=project_id,
        environment_id=environment_id,
        domain=domain,
    )
    async with critical_section(_domain_key(params.domain)):
        project = find_project(params.project_id)
        if project["workspace_id"] != params.workspace_id:
            raise ConflictError(
                f"project '{params.project_id}' belongs to another workspace than "
                f"'{params.workspace_id}'"
            )
        environment = find_environment(params.environment_id)
        if environment["project_id"] != params.project_id:
            raise ConflictError(
                f"environment '{params.environment_id}' belongs to another project than "
                f"'{params.project_id}'"
            )
        values = draw_values()
        existing = domains_db.find_custom_domain(params.domain)
        if existing is not None and existing.id != values["id"]:
            raise ConflictError(f"custom domain '{params.domain}' already exists")
        verification = await send_call(
            "verify_domain", {"domain": params.domain}, f"verify-domain-{values['id']}"
        )
        insert_domain(
            {
                **values,
                "workspace_id": params.workspace_id,
                "project_id": params.project_id,
                "environment_id": params.environment_id,
                "domain": params.domain,
                "invocation_id": verification,
            }
        )
        row = _resolve(params.domain)
    get_run_logger().info(
        "custom domain %s added: TXT _unkey.%s = unkey-domain-verify=<token>, CNAME -> %s",
        row.domain,
        row.domain,
        row.target_cname,
    )
    return row.public()


# -- verify -------------------------------------------------------------------------------------


@step(name="start verification")
def start_verification(domain_id: str, flow_run_id: str) -> dict[str, Any]:
    """Claim the domain's verification for this run; its start and deadline (ms), recorded
    once, so a resumed or woken run keeps them."""
    claimed = domains_db.claim_verification(domain_id, flow_run_id)
    started = now_ms()
    timeout = worker_settings().custom_domain_verify_timeout_seconds
    return {"claimed": claimed, "started_at": started, "deadline": started + int(timeout * 1000)}


@step(name="mark verified")
def mark_verified(domain_id: str, flow_run_id: str) -> bool:
    """``verified`` (a compare-and-set on the run's ownership)."""
    return domains_db.mark_verified(domain_id, flow_run_id)


@step(name="create acme challenge")
def create_challenge(domain: dict[str, Any]) -> bool:
    """The domain's HTTP-01 challenge, ``waiting`` (idempotent)."""
    row = CustomDomain(**domain)
    return domains_db.ensure_waiting_challenge(row, now_ms() + CHALLENGE_VALIDITY_MILLIS)


async def _on_verified(row: CustomDomain, me: str) -> bool:
    """Everything that follows a passed check; False when the run was superseded."""
    log = get_run_logger()
    if not mark_verified(row.id, me):
        return False
    create_challenge(row.__dict__)
    if worker_settings().acme_enabled:
        await send_call(
            "process_challenge",
            {"workspace_id": row.workspace_id, "domain": row.domain},
            f"process-challenge-{row.id}-{me}",
        )
    else:
        log.info("ACME is disabled: the certificate of %s is left to the renewal sweep", row.domain)
    project = find_project(row.project_id)
    insert_frontline_route(
        row.project_id, project["live_deployment_id"] or "", row.environment_id, row.domain, "live"
    )
    return True


def _check(row: CustomDomain) -> DomainCheck:
    return verify_ownership(row.domain, row.verification_token, row.target_cname)


def _timed_out(started_at: int, deadline: int, check: DomainCheck) -> str:
    hours = (deadline - started_at) / 3_600_000
    return f"domain verification timed out after {hours:g} h: {check.missing_message()}"


def _verification_gave_up(parameters: dict[str, Any], reason: str) -> None:
    row = domains_db.find_custom_domain(_parse_domain(parameters["domain"]))
    if row is not None and domains_db.mark_verification_failed(row.id, _this_run(), reason):
        get_run_logger().error("verification of %s failed: %s", row.domain, reason)


@service_flow("verify_domain", on_give_up=_verification_gave_up, run_name="verify-domain-{domain}")
async def verify_domain(domain: str) -> dict[str, Any]:
    """Verify a custom domain's ownership over DNS, re-checking durably until its deadline."""
    name = _parse_domain(domain)
    me = _this_run()
    interval = worker_settings().custom_domain_check_seconds
    started: dict[str, Any] | None = None
    log = get_run_logger()
    while True:
        async with critical_section(_domain_key(name)):
            row = domains_db.find_custom_domain(name)
            if started is None:
                if row is None:
                    raise NotFoundError(f"custom domain '{name}' not found")
                if row.verification_status == "verified":
                    return {**row.public(), "check_attempts": row.check_attempts}
                started = start_verification(row.id, me)
                if not started["claimed"]:
                    raise ConflictError(
                        f"custom domain '{name}' is being verified by flow run "
                        f"{row.invocation_id}; use retry_verification to start over"
                    )
                row = domains_db.find_custom_domain(name)
            if row is None or row.invocation_id != me:
                # Deleted, or a retry started another verification while the key was free.
                status = "deleted" if row is None else "superseded"
                log.info("verification of %s ends: %s", name, status)
                return {"domain": name, "verification_status": status}
            check = _check(row)
            domains_db.record_check(row.id, me, check)
            if check.verified:
                if not await _on_verified(row, me):
                    return {"domain": name, "verification_status": "superseded"}
                verified = _resolve(name)
                log.info("custom domain %s verified", name)
                return {**verified.public(), "check_attempts": verified.check_attempts}
            at = now_ms()
            if at >= started["deadline"]:
                message = _timed_out(started["started_at"], started["deadline"], check)
                domains_db.mark_verification_failed(row.id, me, message)
                raise RefusedError(message)
            log.info("%s not verified yet: %s", name, check.missing_message())
        # Sleep to the next check time of this verification (a time slot, so a wake-up or a
        # resume replays no earlier check), never past the deadline.
        slot = (at - started["started_at"]) // int(interval * 1000) + 1
        wake = min(started["started_at"] + slot * int(interval * 1000), started["deadline"])
        await durable_sleep((wake - now().timestamp() * 1000) / 1000, name=f"recheck-{slot}")


# -- retry and delete ---------------------------------------------------------------------------


@step(name="reset verification")
def reset_verification(domain_id: str) -> dict[str, Any]:
    """Reset the domain unless it is ``verified`` (recorded: a replay keeps the decision and
    the run it replaced)."""
    reset, previous = domains_db.reset_verification(domain_id)
    return {"reset": reset, "previous": previous}


@service_flow("retry_verification", run_name="retry-verification-{domain}")
async def retry_verification(domain: str) -> dict[str, Any]:
    """Cancel a custom domain's verification, reset it and verify again from now."""
    name = _parse_domain(domain)
    async with critical_section(_domain_key(name)):
        row = _resolve(name)
        outcome = reset_verification(row.id)
        if not outcome["reset"]:
            raise RefusedError(f"custom domain '{name}' is already verified")
        if outcome["previous"]:
            await cancel_scheduled_run(outcome["previous"], f"custom domain {name}: retried")
        await send_call("verify_domain", {"domain": name}, f"verify-domain-{row.id}-{call_key()}")
        row = _resolve(name)
    return row.public()


@step(name="delete custom domain")
def delete_domain(domain: dict[str, Any]) -> None:
    """Route, challenge and domain, in one transaction."""
    domains_db.delete_custom_domain(CustomDomain(**domain))


@step(name="resolve domain")
def resolve_for_delete(domain: str) -> dict[str, Any]:
    """The row to delete, recorded: a resumed delete deletes the same one."""
    return _resolve(domain).__dict__


@service_flow("delete_custom_domain", run_name="delete-custom-domain-{domain}")
async def delete_custom_domain(domain: str) -> dict[str, Any]:
    """Cancel a custom domain's verification and delete it with its route and challenge."""
    name = _parse_domain(domain)
    async with critical_section(_domain_key(name)):
        row = CustomDomain(**resolve_for_delete(name))
        if row.invocation_id:
            await cancel_scheduled_run(row.invocation_id, f"custom domain {name}: deleted")
        delete_domain(row.__dict__)
    get_run_logger().info("custom domain %s deleted", name)
    return {"domain": name, "deleted": True}
