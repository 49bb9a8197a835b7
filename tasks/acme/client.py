"""The ACME protocol side of issuance: a client for the configured CA and the primitives the
certificate flow wraps in durable steps.

Each primitive is one protocol exchange, so a flow can journal its result and resume after a
kill without repeating it: ``new_order`` (one order per call: the flow must record the order
URL and resume with ``fetch_order``), ``http01_challenge``/``dns01_challenge`` (pure: derive
what to publish), ``answer``, ``wait_valid``, ``finalize``; ``new_private_key_and_csr`` makes
the certificate's key (never the account key).

Trust: the CA is ``UNKEY_ACME_DIRECTORY_URL``; its TLS certificate is checked against the
system's CAs, or ``UNKEY_ACME_CA_BUNDLE`` when set (a private CA, pebble in tests).

Error handling: the primitives raise what the acme library raises; callers turn it into the
worker's error tree with ``tasks.acme.errors.classify`` (the network here records each problem
answer's HTTP status and Retry-After, which the library would drop). ``wait_valid`` raises
``AuthorizationInvalid`` itself, with the CA's problem detail, when an authorization ends
``invalid``.

Security: the private key PEM ``new_private_key_and_csr`` returns must be encrypted before it
is persisted or returned from a step; nothing here logs or puts a key into an exception.
"""

from __future__ import annotations

import datetime
import time
from typing import Any, cast

import josepy as jose
import requests
from acme import challenges, crypto_util, messages
from acme import client as acme_client
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tasks.acme.errors import AuthorizationInvalid, describe_problem
from worker.settings import Settings

__all__ = [
    "USER_AGENT",
    "answer",
    "ari_window",
    "build_client",
    "certificate_not_after",
    "dns01_challenge",
    "fetch_order",
    "finalize",
    "http01_challenge",
    "new_order",
    "new_private_key_and_csr",
    "renewal_info_url",
    "wait_valid",
]

USER_AGENT = "unkey-ctrl-worker (python-acme)"
_NETWORK_TIMEOUT = 30


class _Network(acme_client.ClientNetwork):
    """``ClientNetwork`` that keeps, on each problem it raises, the answer's HTTP status and
    Retry-After header (``http_status``, ``retry_after_header``) for ``classify``."""

    @classmethod
    def _check_response(
        cls, response: requests.Response, content_type: str | None = None
    ) -> requests.Response:
        try:
            return super()._check_response(response, content_type)
        except messages.Error as problem:
            # messages.Error is immutable by declaration only; these two extra attributes
            # are read back with getattr by tasks.acme.errors.
            object.__setattr__(problem, "http_status", response.status_code)
            object.__setattr__(problem, "retry_after_header", response.headers.get("Retry-After"))
            raise


class _NewOrderWithReplaces(messages.NewOrder):
    """newOrder with RFC 9773's ``replaces`` (acme 5.9's ``NewOrder`` lacks the field)."""

    replaces: str | None = jose.field("replaces", omitempty=True)


def build_client(
    settings: Settings, key: jose.JWKEC, registration_uri: str | None = None
) -> acme_client.ClientV2:
    """A client for ``settings.acme_directory_url`` signing with the account key ``key``.

    Args:
        settings: the worker settings (directory URL, CA bundle).
        key: the ACME account key (P-256, signs with ES256).
        registration_uri: the account URL, when the account is registered (requests are then
            signed with it as ``kid``); None to register with ``new_account``.

    Returns:
        The client (it fetched the directory).

    Raises:
        requests.exceptions.RequestException: the directory could not be fetched.
        acme.messages.Error: the CA answered the directory request with a problem.
    """
    verify: bool | str = str(settings.acme_ca_bundle) if settings.acme_ca_bundle else True
    account = None
    if registration_uri:
        account = messages.RegistrationResource(body=messages.Registration(), uri=registration_uri)
    net = _Network(
        key,
        account=account,
        alg=jose.ES256,
        # requests takes a CA bundle path in `verify`; the library only types it bool.
        verify_ssl=cast(bool, verify),
        user_agent=USER_AGENT,
        timeout=_NETWORK_TIMEOUT,
    )
    directory = acme_client.ClientV2.get_directory(settings.acme_directory_url, net)
    return acme_client.ClientV2(directory, net=net)


def new_private_key_and_csr(domain: str) -> tuple[str, str]:
    """A new P-256 private key and a CSR for ``domain`` (its only SAN).

    Args:
        domain: the certificate's domain (``*.example.com`` for a wildcard).

    Returns:
        ``(key_pem, csr_pem)``: the private key (PKCS#8 PEM, secret: encrypt it before storing
        it) and the CSR (PEM).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    csr_pem = crypto_util.make_csr(key_pem, [domain])
    return key_pem.decode(), csr_pem.decode()


def _order_resource(
    client: acme_client.ClientV2, response: requests.Response, uri: str | None, csr_pem: str
) -> messages.OrderResource:
    body = messages.Order.from_json(response.json())
    # The library's own new_order fetches authorizations this way; its helper is private.
    authorizations = [
        client._authzr_from_response(client._post_as_get(url), uri=url)
        for url in body.authorizations
    ]
    return messages.OrderResource(
        body=body, uri=uri, authorizations=authorizations, csr_pem=csr_pem.encode()
    )


def new_order(
    client: acme_client.ClientV2, domain: str, csr_pem: str, replaces: str | None = None
) -> messages.OrderResource:
    """Place a new order for ``domain`` (each call is a new order at the CA).

    Args:
        client: a client of a registered account.
        domain: the one identifier of the order (the CSR's SAN).
        csr_pem: the CSR the order will be finalized with.
        replaces: the ARI certificate id of the certificate this one renews (RFC 9773), or
            None.

    Returns:
        The order with its authorizations (``order.uri`` is the order URL to record).

    Raises:
        acme.messages.Error: the CA refused the order (e.g. ``rejectedIdentifier``).
        requests.exceptions.RequestException: the CA could not be reached.
    """
    identifier = messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=domain)
    payload: dict[str, Any] = {"identifiers": [identifier]}
    if replaces:
        payload["replaces"] = replaces
    # acme 5.9's ClientV2.new_order cannot send `replaces`: the order is posted with the
    # library's own signed POST. The acme library's private names used by the worker are all
    # in this module: `_post`, `_post_as_get`, `_authzr_from_response`.
    response = client._post(client.directory["newOrder"], _NewOrderWithReplaces(**payload))
    return _order_resource(client, response, response.headers.get("Location"), csr_pem)


def fetch_order(
    client: acme_client.ClientV2, order_uri: str, csr_pem: str
) -> messages.OrderResource:
    """The current state of an order placed earlier (to resume without a second order).

    Args:
        client: a client of the account that placed the order.
        order_uri: the order URL ``new_order`` returned.
        csr_pem: the CSR the order was placed with.

    Returns:
        The order with its authorizations, as the CA sees them now.

    Raises:
        acme.messages.Error: the CA answered with a problem (an unknown order: ``malformed``).
        requests.exceptions.RequestException: the CA could not be reached.
    """
    return _order_resource(client, client._post_as_get(order_uri), order_uri, csr_pem)


def _challenge(
    authzr: messages.AuthorizationResource, kind: type[challenges.Challenge]
) -> messages.ChallengeBody:
    for challenge in authzr.body.challenges:
        if isinstance(challenge.chall, kind):
            return challenge
    raise AuthorizationInvalid(
        authzr.body.identifier.value, f"the CA offers no {kind.typ} challenge"
    )


def _pending(order: messages.OrderResource) -> messages.AuthorizationResource:
    """The order's one authorization (an order here has one identifier)."""
    return order.authorizations[0]


def http01_challenge(
    order: messages.OrderResource, key: jose.JWK
) -> tuple[str, str, messages.ChallengeBody]:
    """The HTTP-01 challenge of the order's authorization, and what to serve for it.

    Args:
        order: an order of one identifier.
        key: the account key (the key authorization binds its thumbprint).

    Returns:
        ``(token, key_authorization, challenge)``: serve ``key_authorization`` as text/plain at
        ``/.well-known/acme-challenge/<token>``, then ``answer(client, challenge)``.

    Raises:
        AuthorizationInvalid: the CA offers no HTTP-01 challenge (a wildcard only has DNS-01).
    """
    challenge = _challenge(_pending(order), challenges.HTTP01)
    http01 = cast(challenges.HTTP01, challenge.chall)
    return http01.encode("token"), http01.key_authorization(key), challenge


def dns01_challenge(
    order: messages.OrderResource, key: jose.JWK
) -> tuple[str, str, str, messages.ChallengeBody]:
    """The DNS-01 challenge of the order's authorization, and the TXT record to publish.

    Args:
        order: an order of one identifier (a ``*.`` wildcard's identifier is its base name).
        key: the account key.

    Returns:
        ``(token, record_name, txt_value, challenge)``: publish TXT ``txt_value`` at
        ``record_name`` (``_acme-challenge.<base domain>``, no trailing dot), then
        ``answer``. ``token`` and the key authorization are what ``acme_challenges`` keeps.

    Raises:
        AuthorizationInvalid: the CA offers no DNS-01 challenge.
    """
    authzr = _pending(order)
    challenge = _challenge(authzr, challenges.DNS01)
    dns01 = cast(challenges.DNS01, challenge.chall)
    name = dns01.validation_domain_name(authzr.body.identifier.value)
    return dns01.encode("token"), name, dns01.validation(key), challenge


def answer(client: acme_client.ClientV2, challenge: messages.ChallengeBody) -> None:
    """Tell the CA the challenge is ready to be validated (idempotent at the CA).

    Args:
        client: a client of the account that placed the order.
        challenge: from ``http01_challenge`` or ``dns01_challenge``.

    Raises:
        acme.messages.Error: the CA refused the answer.
        requests.exceptions.RequestException: the CA could not be reached.
    """
    response = challenge.chall.response(client.net.key)
    client.answer_challenge(challenge, response)


def wait_valid(
    client: acme_client.ClientV2,
    order: messages.OrderResource,
    timeout: float,
    poll_seconds: float = 1.0,
) -> messages.OrderResource:
    """Poll the order's authorizations until each is valid.

    Args:
        client: a client of the account that placed the order.
        order: the order.
        timeout: seconds to wait in all.
        poll_seconds: the pause between polls of a pending authorization.

    Returns:
        The order with its authorizations updated (all valid).

    Raises:
        AuthorizationInvalid: the CA declared an authorization invalid (its problem detail).
        acme.errors.TimeoutError: an authorization was still pending after ``timeout``.
        acme.messages.Error: the CA answered a poll with a problem.
        requests.exceptions.RequestException: the CA could not be reached.
    """
    deadline = time.monotonic() + timeout
    updated = []
    for authzr in order.authorizations:
        while True:
            authzr, _ = client.poll(authzr)
            if authzr.body.status != messages.STATUS_PENDING:
                break
            if time.monotonic() >= deadline:
                raise acme_client.errors.TimeoutError()
            time.sleep(poll_seconds)
        if authzr.body.status != messages.STATUS_VALID:
            problems = [
                describe_problem(c.error) for c in authzr.body.challenges if c.error is not None
            ]
            detail = "; ".join(problems) or f"status {authzr.body.status}"
            raise AuthorizationInvalid(authzr.body.identifier.value, detail)
        updated.append(authzr)
    return order.update(authorizations=updated)


def finalize(client: acme_client.ClientV2, order: messages.OrderResource, timeout: float) -> str:
    """Finalize the order with its CSR and download the certificate (idempotent at the CA:
    an order already finalized is only polled and downloaded).

    Args:
        client: a client of the account that placed the order.
        order: the order, its authorizations valid.
        timeout: seconds to wait for the certificate.

    Returns:
        The full chain PEM (the leaf, then the intermediates).

    Raises:
        acme.errors.IssuanceError: the CA declared the order invalid.
        acme.errors.TimeoutError: no certificate within ``timeout``.
        acme.messages.Error: the CA refused the finalization (e.g. ``badCSR``).
        requests.exceptions.RequestException: the CA could not be reached.
    """
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    if order.body.status == messages.STATUS_VALID:  # finalized before a kill: download only
        finalized = client.poll_finalization(order, deadline)
    else:  # finalize_order tolerates orderNotReady (finalization already under way)
        finalized = client.finalize_order(order, deadline)
    return str(finalized.fullchain_pem)


def renewal_info_url(client: acme_client.ClientV2) -> str | None:
    """The CA's RFC 9773 ``renewalInfo`` base URL, or None when it offers no ARI.

    Args:
        client: a client (its directory is already fetched).

    Returns:
        The URL from the directory, or None.
    """
    try:
        url = client.directory["renewalInfo"]
    except KeyError:
        return None
    return str(url) if url else None


def ari_window(
    client: acme_client.ClientV2, ari_id: str
) -> tuple[datetime.datetime, datetime.datetime]:
    """The CA's suggested renewal window of one certificate (an unauthenticated GET).

    Args:
        client: a client of a CA that offers ARI (``renewal_info_url`` is not None).
        ari_id: the certificate's ARI identifier (``tasks.acme.renewal.ari_certificate_id``).

    Returns:
        ``(start, end)``, timezone-aware.

    Raises:
        KeyError: the CA offers no ARI.
        acme.messages.Error: the CA answered with a problem (an unknown certificate).
        requests.exceptions.RequestException: the CA could not be reached.
    """
    url = f"{client.directory['renewalInfo'].rstrip('/')}/{ari_id}"
    response = client.net.get(url, content_type="application/json")
    window = messages.RenewalInfo.from_json(response.json()).suggested_window
    start, end = window.start, window.end
    return _aware(start), _aware(end)


def _aware(moment: datetime.datetime) -> datetime.datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


def certificate_not_after(fullchain_pem: str) -> datetime.datetime:
    """The NotAfter of the chain's leaf (the first certificate), timezone-aware UTC.

    Args:
        fullchain_pem: the PEM ``finalize`` returned.

    Returns:
        The leaf's expiry.
    """
    leaf = x509.load_pem_x509_certificate(fullchain_pem.encode())
    return leaf.not_valid_after_utc
