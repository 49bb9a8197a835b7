"""DNS-01 challenge records in Route53 (the original's lego route53 provider, reference §6.4).

The client is built by prefect-aws ``AwsCredentials`` from ``UNKEY_ACME_ROUTE53_*`` (access key,
secret, region, and an endpoint URL so that a moto server can stand in for AWS in tests).

Guarantees:

- ``upsert_txt`` and ``delete_txt`` are idempotent: adding a value that is there, or removing
  one that is not, changes nothing and succeeds. They keep the name's other values: a wildcard
  and its apex (``*.example.com`` and ``example.com``) both answer at
  ``_acme-challenge.example.com``, with one value each. Values are read, then written with one
  ``UPSERT`` (or a ``DELETE`` of the last value): two writers of the same name at the same
  instant could drop each other's value; the certificate service runs one order per domain
  key, and an order's values are written one after the other.
- A change returns only once Route53 reports it ``INSYNC`` (lego's WaitForRecordSetsChanged).
- ``find_hosted_zone`` uses ``UNKEY_ACME_ROUTE53_HOSTED_ZONE_ID`` when set (no discovery, as
  lego's HostedZoneID), else the public zone with the longest name that is a suffix of the
  domain at a label boundary.

Error handling (``route53_call``): credential and signature errors (InvalidClientTokenId,
SignatureDoesNotMatch, AccessDenied, ...) are terminal, and their message names the settings and
the error code only: never the secret, nor AWS's text (a SignatureDoesNotMatch text quotes the
string-to-sign). Throttling, 5xx, and network failures are retryable; a missing zone is
``NotFoundError``; any other 4xx is terminal with AWS's code and message.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import botocore.exceptions
from prefect_aws import AwsCredentials
from prefect_aws.client_parameters import AwsClientParameters

from worker.kernel.errors import (
    ConfigError,
    NotFoundError,
    RefusedError,
    RetryableError,
    TerminalError,
)
from worker.settings import Settings, env_name, worker_settings

__all__ = [
    "CHALLENGE_TTL",
    "delete_txt",
    "find_hosted_zone",
    "route53_call",
    "route53_client",
    "txt_values",
    "upsert_txt",
]

CHALLENGE_TTL = 600  # lego's route53 TTL
_CHUNK = 255  # the longest character-string of a TXT record
_CREDENTIAL_CODES = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "AuthFailure",
        "ExpiredToken",
        "ExpiredTokenException",
        "IncompleteSignature",
        "InvalidAccessKeyId",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "MissingAuthenticationToken",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
    }
)
_THROTTLE_CODES = frozenset(
    {
        "PriorRequestNotComplete",
        "RequestLimitExceeded",
        "ServiceUnavailable",
        "Throttling",
        "ThrottlingException",
        "TooManyRequestsException",
    }
)
T = TypeVar("T")
_SETTINGS = (
    f"{env_name('acme_route53_access_key_id')} / {env_name('acme_route53_secret_access_key')}"
)


def route53_client(settings: Settings | None = None) -> Any:
    """A boto3 Route53 client from the ``UNKEY_ACME_ROUTE53_*`` settings (prefect-aws).

    Args:
        settings: the settings to use; None = this process's.

    Returns:
        The client (prefect-aws caches one per distinct credentials).
    """
    settings = settings or worker_settings()
    credentials = AwsCredentials(
        aws_access_key_id=settings.acme_route53_access_key_id,
        aws_secret_access_key=settings.acme_route53_secret_access_key,
        region_name=settings.acme_route53_region,
        aws_client_parameters=AwsClientParameters(endpoint_url=settings.acme_route53_endpoint_url),
    )
    return credentials.get_client("route53")


def _classify(exc: botocore.exceptions.ClientError, what: str) -> Exception:
    error = exc.response.get("Error", {})
    if not error.get("Code"):
        # Errors in the query protocol's shape (<Errors><Error>), as moto answers Route53's
        # authentication errors, are parsed one level down.
        error = exc.response.get("Errors", {}).get("Error", {}) or error
    code = str(error.get("Code") or "Unknown")
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    if code in _CREDENTIAL_CODES:
        return RefusedError(
            f"Route53 refused the credentials while trying to {what} ({code}): check {_SETTINGS}"
        )
    if code in _THROTTLE_CODES or status == 429 or status >= 500:
        return RetryableError(f"Route53 could not {what} for now ({code}, HTTP {status})")
    if code == "NoSuchHostedZone":
        return NotFoundError(
            f"Route53 could not {what}: hosted zone not found "
            f"(is {env_name('acme_route53_hosted_zone_id')} right?)"
        )
    if code == "InvalidChangeBatch":
        # The record set changed between our read and our write: read again.
        return RetryableError(f"Route53 could not {what}: the record set changed meanwhile")
    return TerminalError(f"Route53 could not {what} ({code}): {error.get('Message', '')}")


def route53_call(what: str, call: Callable[[], T]) -> T:
    """Run Route53 calls, translating their failures into the worker's error tree.

    Args:
        what: what the calls do, for messages (``"upsert TXT _acme-challenge.example.com"``).
        call: the calls.

    Returns:
        What ``call`` returns.

    Raises:
        RefusedError: the credentials were refused (terminal; names the settings only).
        NotFoundError: the hosted zone does not exist.
        ConfigError: no credentials are configured at all.
        RetryableError: throttling, 5xx, network failure or a concurrent change.
        TerminalError: any other error Route53 answered.
    """
    failure: Exception | None = None
    try:
        return call()
    except botocore.exceptions.ClientError as exc:
        failure = _classify(exc, what)
    except (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError):
        failure = ConfigError(f"no Route53 credentials to {what}: set {_SETTINGS}")
    except botocore.exceptions.WaiterError as exc:
        failure = RetryableError(f"Route53 change did not reach INSYNC to {what}: {exc.reason}")
    except botocore.exceptions.BotoCoreError as exc:
        # Connection and timeout errors; their text is a URL at most, but the class says enough.
        failure = RetryableError(f"Route53 unreachable to {what} ({type(exc).__name__})")
    # Raised outside the except block, so nothing is chained: a botocore exception's text
    # (SignatureDoesNotMatch quotes the string-to-sign) stays out of tracebacks and logs.
    raise failure


def _zone_name(name: str) -> str:
    return name.rstrip(".").lower()


def find_hosted_zone(domain: str, settings: Settings | None = None) -> str:
    """The id of the hosted zone that holds ``domain``'s challenge records.

    Args:
        domain: the domain (``example.com``, ``*.example.com`` or a challenge name).
        settings: the settings to use; None = this process's.

    Returns:
        The zone id without its ``/hostedzone/`` prefix.

    Raises:
        NotFoundError: no public zone is a suffix of the domain.
        RefusedError, RetryableError, TerminalError: see ``route53_call``.
    """
    settings = settings or worker_settings()
    if settings.acme_route53_hosted_zone_id:
        return settings.acme_route53_hosted_zone_id.removeprefix("/hostedzone/")
    name = _zone_name(domain.removeprefix("*."))
    client = route53_client(settings)

    def zones() -> list[dict[str, Any]]:
        pages = client.get_paginator("list_hosted_zones").paginate()
        return [zone for page in pages for zone in page["HostedZones"]]

    best: tuple[int, str] | None = None
    for zone in route53_call(f"find the hosted zone of '{name}'", zones):
        if zone.get("Config", {}).get("PrivateZone"):
            continue  # the CA resolves public DNS
        zone_name = _zone_name(zone["Name"])
        if (name == zone_name or name.endswith("." + zone_name)) and (
            best is None or len(zone_name) > best[0]
        ):
            best = (len(zone_name), zone["Id"])
    if best is None:
        raise NotFoundError(f"no Route53 hosted zone holds '{name}'")
    return best[1].removeprefix("/hostedzone/")


def _quoted(value: str) -> str:
    chunks = [value[i : i + _CHUNK] for i in range(0, len(value), _CHUNK)] or [""]
    return " ".join('"' + part.replace("\\", "\\\\").replace('"', '\\"') + '"' for part in chunks)


def _unquoted(record: str) -> str:
    """The text of a Route53 TXT value (``"a" "b"`` is ``ab``; escapes undone)."""
    out: list[str] = []
    inside = escaped = False
    for char in record:
        if escaped:
            out.append(char)
            escaped = False
        elif char == "\\" and inside:
            escaped = True
        elif char == '"':
            inside = not inside
        elif inside:
            out.append(char)
    return "".join(out)


def _rrset(client: Any, zone_id: str, fqdn: str) -> dict[str, Any] | None:
    page = client.list_resource_record_sets(
        HostedZoneId=zone_id, StartRecordName=fqdn, StartRecordType="TXT", MaxItems="1"
    )
    for rrset in page.get("ResourceRecordSets", []):
        if _zone_name(rrset["Name"]) == _zone_name(fqdn) and rrset["Type"] == "TXT":
            return dict(rrset)
    return None


def txt_values(fqdn: str, settings: Settings | None = None) -> list[str]:
    """The TXT values Route53 holds for ``fqdn`` (unquoted).

    Args:
        fqdn: the record name.
        settings: the settings to use; None = this process's.

    Returns:
        The values, empty when there is no TXT record set.

    Raises:
        NotFoundError, RefusedError, RetryableError, TerminalError: see ``route53_call``.
    """
    zone_id = find_hosted_zone(fqdn, settings)
    client = route53_client(settings)
    rrset = route53_call(f"read TXT {fqdn}", lambda: _rrset(client, zone_id, fqdn))
    return [_unquoted(r["Value"]) for r in (rrset or {}).get("ResourceRecords", [])]


def _change(client: Any, zone_id: str, action: str, rrset: dict[str, Any], comment: str) -> None:
    response = client.change_resource_record_sets(
        HostedZoneId=zone_id,
        ChangeBatch={
            "Comment": comment,
            "Changes": [{"Action": action, "ResourceRecordSet": rrset}],
        },
    )
    info = response["ChangeInfo"]
    if info["Status"] != "INSYNC":
        client.get_waiter("resource_record_sets_changed").wait(
            Id=info["Id"],
            WaiterConfig={"Delay": 4, "MaxAttempts": 75},  # lego's 5 min
        )


def _edit_txt(
    fqdn: str,
    what: str,
    edit: Callable[[list[str]], list[str]],
    ttl: int | None,
    settings: Settings | None,
) -> bool:
    zone_id = find_hosted_zone(fqdn, settings)
    client = route53_client(settings)
    return route53_call(what, lambda: _apply_edit(client, zone_id, fqdn, what, edit, ttl))


def _apply_edit(
    client: Any,
    zone_id: str,
    fqdn: str,
    what: str,
    edit: Callable[[list[str]], list[str]],
    ttl: int | None,
) -> bool:
    current = _rrset(client, zone_id, fqdn)
    values = [_unquoted(r["Value"]) for r in (current or {}).get("ResourceRecords", [])]
    wanted = edit(values)
    if wanted == values:
        return False
    name = fqdn.rstrip(".") + "."
    comment = f"ctrl-worker {what} ({uuid.uuid4().hex[:8]})"
    if wanted:
        rrset = {
            "Name": name,
            "Type": "TXT",
            "TTL": ttl if ttl is not None else int((current or {}).get("TTL", CHALLENGE_TTL)),
            "ResourceRecords": [{"Value": _quoted(v)} for v in wanted],
        }
        _change(client, zone_id, "UPSERT", rrset, comment)
    elif current is not None:
        _change(client, zone_id, "DELETE", current, comment)
    return True


def upsert_txt(
    fqdn: str, value: str, ttl: int = CHALLENGE_TTL, settings: Settings | None = None
) -> bool:
    """Add ``value`` to the TXT record set of ``fqdn``, keeping its other values.

    Args:
        fqdn: the record name (``_acme-challenge.example.com``).
        value: the TXT value (unquoted).
        ttl: the record set's TTL in seconds.
        settings: the settings to use; None = this process's.

    Returns:
        True when Route53 was changed (and the change is INSYNC), False when the value was
        already there.

    Raises:
        NotFoundError, RefusedError, RetryableError, TerminalError: see ``route53_call``.
    """
    return _edit_txt(
        fqdn,
        f"upsert TXT {fqdn}",
        lambda values: values if value in values else [*values, value],
        ttl,
        settings,
    )


def delete_txt(fqdn: str, value: str, settings: Settings | None = None) -> bool:
    """Remove ``value`` from the TXT record set of ``fqdn`` (the set goes with its last value).

    Args:
        fqdn: the record name.
        value: the TXT value (unquoted).
        settings: the settings to use; None = this process's.

    Returns:
        True when Route53 was changed (and the change is INSYNC), False when the value was not
        there.

    Raises:
        NotFoundError, RefusedError, RetryableError, TerminalError: see ``route53_call``.
    """
    return _edit_txt(
        fqdn, f"delete TXT {fqdn}", lambda values: [v for v in values if v != value], None, settings
    )
