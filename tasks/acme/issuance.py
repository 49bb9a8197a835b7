"""The durable steps of one issuance (``flows.certificate.process_challenge``).

Each step is one exchange with the CA (or one write), named like the original's journal, so a
call killed anywhere resumes without repeating finished work: ``create order`` (one order per
attempt; its URL, CSR and the **encrypted** private key are recorded), ``present challenge``,
``answer challenge``, ``wait for authorization``, ``finalize order`` (the chain PEM),
``clean up challenge`` (DNS-01), ``persist certificate``, ``mark verified``. The later steps
resume the recorded order with ``fetch_order``; none places a second one.

The ACME client (the account key inside) is rebuilt in each step from ``ensure_account`` and
never leaves it: step results hold only public values (order URL, CSR, token, chain) and
vault ciphertext.

Errors: ACME failures are classified (``tasks.acme.errors.classify``). ``create order``
records a rate limit as its result (``{"retry_after": s, "detail": ...}``) instead of raising
it, so the flow can wait durably and try a new attempt; anywhere else a rate limit is retried
by the step like any retryable error.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

from acme import client as acme_client
from acme import messages

from blocks.vault import vault_from_settings
from tasks.acme.account import AcmeAccount, ensure_account
from tasks.acme.client import (
    answer,
    dns01_challenge,
    fetch_order,
    finalize,
    http01_challenge,
    new_order,
    new_private_key_and_csr,
    renewal_info_url,
    wait_valid,
)
from tasks.acme.errors import RateLimited, classify
from tasks.acme.renewal import parse_leaf
from tasks.db import acme as acme_db
from tasks.db import certificates as cert_db
from tasks.db import renewals as renewal_db
from tasks.dns_propagation import wait_for_txt_propagation
from tasks.route53 import delete_txt, upsert_txt
from worker.kernel.errors import NotFoundError, RetryableError
from worker.kernel.steps import step
from worker.settings import worker_settings

__all__ = [
    "AUTHORIZATION_TIMEOUT",
    "FINALIZE_TIMEOUT",
    "account_step",
    "answer_challenge",
    "clean_up_challenge",
    "create_order",
    "finalize_order",
    "is_wildcard",
    "mark_verified",
    "persist_certificate",
    "present_challenge",
    "wait_for_authorization",
]

AUTHORIZATION_TIMEOUT = 90.0  # lego's HTTP-01 timeout
AUTHORIZATION_POLL = 1.0
FINALIZE_TIMEOUT = 90.0
T = TypeVar("T")


def is_wildcard(domain: str) -> bool:
    """A ``*.`` domain: DNS-01 through Route53; anything else HTTP-01."""
    return domain.startswith("*.")


async def _acme(call: Callable[..., T], *args: Any) -> T:
    """Run a blocking ACME exchange off the event loop; its failure in the worker's tree."""
    try:
        return await asyncio.to_thread(call, *args)
    except Exception as exc:
        raise classify(exc) from None


async def _session() -> tuple[AcmeAccount, acme_client.ClientV2]:
    account = await ensure_account()
    client = await asyncio.to_thread(account.client)
    return account, client


def _replaces(client: acme_client.ClientV2, domain: str) -> str | None:
    """The ARI id of the certificate a renewal replaces (RFC 9773), when the CA offers ARI and
    the domain has a stored certificate; otherwise None (a first issuance, or no ARI)."""
    if renewal_info_url(client) is None:
        return None
    chain = renewal_db.certificate_chain(domain)
    if chain is None:
        return None
    try:
        return parse_leaf(chain).ari_id
    except ValueError:
        return None  # an unreadable stored chain: renew without naming it


async def _order(client: acme_client.ClientV2, order: dict[str, Any]) -> messages.OrderResource:
    return await _acme(fetch_order, client, order["order_uri"], order["csr_pem"])


@step(name="acme account")
async def account_step() -> dict[str, str]:
    """The global ACME account (created and registered once); only its public identity."""
    account = await ensure_account()
    return {"id": account.id, "registration_uri": account.registration_uri}


@step(name="create order", key=("attempt",))
async def create_order(workspace_id: str, domain: str, attempt: int) -> dict[str, Any]:
    """A new key, CSR and order for ``domain``; the key encrypted with ``workspace_id``'s keyring.
    A renewal at a CA offering ARI names the certificate it replaces (``replaces``).

    Returns:
        ``{"order_uri", "csr_pem", "encrypted_key"}``, or ``{"retry_after", "detail"}`` when
        the CA rate-limited the order (recorded: the flow waits, then tries ``attempt + 1``).
    """
    _, client = await _session()
    key_pem, csr_pem = new_private_key_and_csr(domain)
    replaces = await asyncio.to_thread(_replaces, client, domain)
    try:
        order = await _acme(new_order, client, domain, csr_pem, replaces)
    except RateLimited as limited:
        return {"retry_after": limited.retry_after, "detail": str(limited)}
    if not order.uri:
        raise RetryableError(f"the ACME server gave the order of '{domain}' no URL")
    vault = vault_from_settings(worker_settings())
    encrypted = await asyncio.to_thread(vault.encrypt, workspace_id, key_pem)
    return {"order_uri": order.uri, "csr_pem": csr_pem, "encrypted_key": encrypted.encrypted}


@step(name="present challenge")
async def present_challenge(domain_id: str, domain: str, order: dict[str, Any]) -> dict[str, Any]:
    """Publish what the CA will check: HTTP-01's key authorization in ``acme_challenges``, or
    DNS-01's TXT record in Route53 (propagated to the authoritative servers) and the row.

    Returns:
        ``{"token", "record_name", "txt_value"}`` (the last two None for HTTP-01).

    Raises:
        NotFoundError: the domain has no ``acme_challenges`` row.
    """
    account, client = await _session()
    current = await _order(client, order)
    record_name = txt_value = None
    if is_wildcard(domain):
        token, record_name, txt_value, challenge = dns01_challenge(current, account.key)
        key_authorization = challenge.chall.key_authorization(account.key)
        await asyncio.to_thread(upsert_txt, record_name, txt_value)
    else:
        token, key_authorization, _ = http01_challenge(current, account.key)
    try:
        if record_name and txt_value:
            await asyncio.to_thread(wait_for_txt_propagation, record_name, txt_value)
        stored = await asyncio.to_thread(
            acme_db.set_challenge_pending, domain_id, token, key_authorization
        )
        if not stored:
            raise NotFoundError(f"custom domain '{domain}' has no ACME challenge")
    except BaseException:
        # The caller's clean-up only covers a presented challenge: an attempt that fails
        # here removes its own TXT value (a retry publishes it again).
        if record_name and txt_value:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(delete_txt, record_name, txt_value)
        raise
    return {"token": token, "record_name": record_name, "txt_value": txt_value}


@step(name="answer challenge")
async def answer_challenge(domain: str, order: dict[str, Any]) -> None:
    """Tell the CA the challenge is ready (skipped when it is no longer pending: a resume)."""
    account, client = await _session()
    current = await _order(client, order)
    if is_wildcard(domain):
        challenge = dns01_challenge(current, account.key)[3]
    else:
        challenge = http01_challenge(current, account.key)[2]
    if challenge.status in (None, messages.STATUS_PENDING):
        await _acme(answer, client, challenge)


@step(name="wait for authorization")
async def wait_for_authorization(order: dict[str, Any]) -> None:
    """Until the CA declares the authorization valid.

    Raises:
        AuthorizationInvalid: the CA declared it invalid (terminal, with its problem detail).
    """
    _, client = await _session()
    current = await _order(client, order)
    await _acme(wait_valid, client, current, AUTHORIZATION_TIMEOUT, AUTHORIZATION_POLL)


@step(name="finalize order")
async def finalize_order(order: dict[str, Any]) -> str:
    """Finalize with the recorded CSR and download the chain (public: leaf, intermediates)."""
    _, client = await _session()
    current = await _order(client, order)
    return await _acme(finalize, client, current, FINALIZE_TIMEOUT)


@step(name="clean up challenge")
def clean_up_challenge(record_name: str, txt_value: str) -> bool:
    """Remove the DNS-01 TXT value from Route53 (idempotent)."""
    return delete_txt(record_name, txt_value)


@step(name="persist certificate")
def persist_certificate(
    workspace_id: str, hostname: str, chain_pem: str, encrypted_key: str
) -> str:
    """Upsert the certificate by hostname (a renewal keeps its id); return the id."""
    return cert_db.upsert_certificate(workspace_id, hostname, chain_pem, encrypted_key)


@step(name="mark verified")
def mark_verified(domain_id: str, expires_at_ms: int) -> None:
    """The challenge is ``verified`` until the certificate's NotAfter."""
    cert_db.mark_challenge_verified(domain_id, expires_at_ms)
