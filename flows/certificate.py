"""CertificateService: obtain (or renew) the TLS certificate of one custom domain over ACME.

Guarantees: calls on one domain run one at a time (key ``certificate:domain:{domain}``). The
domain's ``custom_domains`` row is read after the key is taken (again after every resume or
durable wait); its challenge is claimed (``waiting`` -> ``pending``; a ``verified`` renewal
stays as it is). Issuance is split into durable steps, so a call killed anywhere resumes
without repeating finished work (at most one extra order per kill): the account, the order
(its URL, CSR and the private key **encrypted with the domain's workspace keyring** are
recorded: no plaintext key in any step result, log or error), the challenge presented
(HTTP-01: token and key authorization in ``acme_challenges``, served by the edge or
``ctrl-worker acme-responder``; DNS-01 for ``*.`` domains: a Route53 TXT record, checked on the
authoritative servers before answering, removed afterwards), answered, the authorization
awaited, the order finalized (the full chain PEM). The certificate is upserted by hostname
(a renewal keeps its id and replaces the PEM and key) and the challenge ends ``verified`` with
``expires_at`` = the leaf's NotAfter (ms). Result: ``{"certificate_id", "status": "success"}``.
Side-effect steps: ``claim challenge``, ``acme account``, ``create order`` (one per attempt),
``present challenge``, ``answer challenge``, ``finalize order``, ``clean up challenge``,
``persist certificate``, ``mark verified``; ``resolve domain`` is a fresh read.
Failure: bad parameters (empty ids, a bad host name, ``*.`` other than as the first label) are
terminal before anything is written. An authorization the CA declares invalid ends the call
at once with the CA's detail (the renewal sweep retries it later); the CA refusing the request
and refused credentials (ACME or Route53) are terminal; a rate limit is waited out durably
(Retry-After + 1 min, clamped to 1 min - 2 h, at most ``MAX_RATE_LIMIT_WAITS`` times, each
attempt recorded so the count survives a resume), then terminal with the CA's message; 5xx
and timeouts are retried by the steps. Every way a call with accepted parameters ends without
a certificate leaves the challenge ``failed``, the reason in
``acme_challenge_failures.message`` and in the run's failure (the kernel's give-up hook, also
after a kill the worker gives up resuming).
"""

from __future__ import annotations

from typing import Annotated, Any

from prefect import get_run_logger
from pydantic import StringConstraints

from flows.certificate_renewal import renew_expiring_certificates
from flows.params import Id, Params
from tasks.acme.client import certificate_not_after
from tasks.acme.issuance import (
    account_step,
    answer_challenge,
    clean_up_challenge,
    create_order,
    finalize_order,
    is_wildcard,
    mark_verified,
    persist_certificate,
    present_challenge,
    wait_for_authorization,
)
from tasks.custom_domain_names import MAX_DOMAIN_LENGTH, validate_custom_domain
from tasks.db import certificates as cert_db
from tasks.db.custom_domains import find_custom_domain
from worker.kernel.errors import (
    ConfigError,
    ConflictError,
    InvalidParameterError,
    NotFoundError,
    RefusedError,
)
from worker.kernel.service import critical_section, parse, service_flow
from worker.kernel.sleep import durable_sleep
from worker.kernel.steps import step
from worker.settings import env_name, worker_settings

__all__ = [
    "MAX_RATE_LIMIT_WAITS",
    "process_challenge",
    "rate_limit_wait",
    "renew_expiring_certificates",
]

MAX_RATE_LIMIT_WAITS = 3
MIN_RATE_LIMIT_WAIT = 60.0
MAX_RATE_LIMIT_WAIT = 7200.0
RATE_LIMIT_MARGIN = 60.0  # the original's Retry-After + 1 min


class ChallengeParams(Params):
    workspace_id: Id
    domain: Annotated[str, StringConstraints(min_length=1)]


def _hostname(domain: str) -> str:
    """The domain lowercased; ``*.`` is allowed only as its first label.

    Raises:
        InvalidParameterError: not a host name (parameter ``domain``).
    """
    base = domain.removeprefix("*.")
    if len(domain) > MAX_DOMAIN_LENGTH:
        raise InvalidParameterError("domain", f"longer than {MAX_DOMAIN_LENGTH} characters")
    if "*" in base:
        raise InvalidParameterError("domain", "a wildcard '*.' is only allowed as the first label")
    name = validate_custom_domain(base)
    return f"*.{name}" if base != domain else name


def _parse(workspace_id: str, domain: str) -> ChallengeParams:
    params = parse(ChallengeParams, workspace_id=workspace_id, domain=domain)
    return ChallengeParams(workspace_id=params.workspace_id, domain=_hostname(params.domain))


def rate_limit_wait(retry_after: float) -> float:
    """Seconds to wait on a rate limit: Retry-After + 1 min, clamped to 1 min - 2 h."""
    return min(MAX_RATE_LIMIT_WAIT, max(MIN_RATE_LIMIT_WAIT, retry_after + RATE_LIMIT_MARGIN))


@step(name="resolve domain", fresh=True)
def resolve_domain(domain: str) -> dict[str, str]:
    """The domain's ``custom_domains`` row (read again after every re-take of the key).

    Raises:
        NotFoundError: no custom domain has that name.
    """
    row = find_custom_domain(domain)
    if row is None:
        raise NotFoundError(f"custom domain '{domain}' not found")
    return {"id": row.id, "workspace_id": row.workspace_id, "domain": row.domain}


@step(name="claim challenge")
def claim_challenge(domain_id: str) -> bool:
    """``waiting`` -> ``pending``; a ``verified`` renewal is left as it is."""
    return cert_db.claim_challenge(domain_id)


def _challenge_gave_up(parameters: dict[str, Any], reason: str) -> None:
    """Whatever ended the call without a certificate: the challenge is ``failed``, with why."""
    params = _parse(**parameters)
    row = find_custom_domain(params.domain)
    if row is None or row.workspace_id != params.workspace_id:
        return  # not this workspace's domain: nothing of it was touched
    if cert_db.mark_challenge_failed(row.id, reason):
        get_run_logger().error("challenge of %s failed: %s", params.domain, reason)


def _check(domain: dict[str, str], params: ChallengeParams) -> None:
    if domain["workspace_id"] != params.workspace_id:
        raise ConflictError(
            f"custom domain '{params.domain}' belongs to another workspace than "
            f"'{params.workspace_id}'"
        )
    settings = worker_settings()
    if not settings.acme_enabled:
        raise ConfigError(f"ACME is disabled: set {env_name('acme_enabled')}=true to issue")
    if is_wildcard(params.domain) and not settings.acme_route53_enabled:
        raise ConfigError(
            f"'{params.domain}' needs DNS-01: set {env_name('acme_route53_enabled')}=true"
        )


async def _place_order(workspace_id: str, domain: str) -> dict[str, Any]:
    """The order, after waiting out at most ``MAX_RATE_LIMIT_WAITS`` rate limits durably."""
    for attempt in range(MAX_RATE_LIMIT_WAITS + 1):
        order = await create_order(workspace_id, domain, attempt)
        if "retry_after" not in order:
            return order
        if attempt == MAX_RATE_LIMIT_WAITS:
            raise RefusedError(
                f"still rate limited after {MAX_RATE_LIMIT_WAITS} waits: {order['detail']}"
            )
        seconds = rate_limit_wait(float(order["retry_after"]))
        get_run_logger().warning("%s: %s; waiting %.0f s", domain, order["detail"], seconds)
        await durable_sleep(seconds, name=f"rate-limit-{attempt + 1}")
    raise AssertionError("unreachable")


async def _obtain(domain_id: str, domain: str, order: dict[str, Any]) -> str:
    """Present, answer, await and finalize the order; the chain PEM."""
    presented = await present_challenge(domain_id, domain, order)
    try:
        await answer_challenge(domain, order)
        await wait_for_authorization(order)
        return await finalize_order(order)
    finally:
        if is_wildcard(domain) and presented["record_name"]:
            try:
                clean_up_challenge(presented["record_name"], presented["txt_value"])
            except Exception as exc:  # the original only logs a failed clean-up
                get_run_logger().warning("TXT clean-up of %s failed: %s", domain, exc)


@service_flow(
    "process_challenge", on_give_up=_challenge_gave_up, run_name="process-challenge-{domain}"
)
async def process_challenge(workspace_id: str, domain: str) -> dict[str, str]:
    """Obtain or renew the certificate of a custom domain (HTTP-01, or DNS-01 for ``*.``)."""
    params = _parse(workspace_id, domain)
    async with critical_section(f"certificate:domain:{params.domain}"):
        row = resolve_domain(params.domain)
        _check(row, params)
        claim_challenge(row["id"])
        await account_step()
        order = await _place_order(row["workspace_id"], params.domain)
        chain = await _obtain(row["id"], params.domain, order)
        certificate_id = persist_certificate(
            row["workspace_id"], params.domain, chain, order["encrypted_key"]
        )
        expires_at = int(certificate_not_after(chain).timestamp() * 1000)
        mark_verified(row["id"], expires_at)
    return {"certificate_id": certificate_id, "status": "success"}
