"""How ACME failures map onto the worker's error tree (reference §6.1.4, SPEC §4).

- ``TerminalError``: the CA refuses the request for a reason retrying cannot change: the
  problem types ``unauthorized``, ``rejectedIdentifier``, ``unsupportedIdentifier``,
  ``badCSR``, ``accountDoesNotExist``, ``malformed``, ``caa`` (and the like, see
  ``TERMINAL_PROBLEMS``), any other 4xx answer that is not a rate limit, and an order the CA
  declared ``invalid``.
- ``AuthorizationInvalid`` (terminal): the CA tried to validate a challenge and declared the
  authorization invalid (unreachable responder, wrong key authorization, missing TXT). It
  carries the CA's problem detail, which the flow stores on the challenge; the sweep retries
  it later, never the call itself.
- ``RateLimited`` (retryable): ``rateLimited`` (or a 429); ``retry_after`` is the seconds from
  the answer's Retry-After header (seconds or an HTTP date), else from a "retry after <time>"
  in the detail, else ``DEFAULT_RETRY_AFTER``. The flow waits durably, clamped to 1 min - 2 h.
- ``RetryableError``: everything else: 5xx and ``serverInternal``, ``badNonce`` that survived
  the library's one retry, connection errors and timeouts.

Security: messages carry the CA's problem type and detail and the HTTP status, never a
request (the JWS body is signed, and exceptions of ``requests`` can hold it).
"""

from __future__ import annotations

import datetime
import email.utils
import re

import requests
from acme import errors as acme_errors
from acme import messages

from worker.kernel.errors import RetryableError, TerminalError

__all__ = [
    "DEFAULT_RETRY_AFTER",
    "TERMINAL_PROBLEMS",
    "AcmeRefused",
    "AuthorizationInvalid",
    "RateLimited",
    "classify",
    "describe_problem",
    "parse_retry_after",
]

DEFAULT_RETRY_AFTER = 60.0
"""Seconds to wait on a rate limit whose answer says nothing about when to retry."""

TERMINAL_PROBLEMS = frozenset(
    {
        "unauthorized",
        "rejectedIdentifier",
        "unsupportedIdentifier",
        "badCSR",
        "accountDoesNotExist",
        "malformed",
        "caa",
        "invalidContact",
        "unsupportedContact",
        "externalAccountRequired",
        "badPublicKey",
        "badSignatureAlgorithm",
        "badRevocationReason",
        "userActionRequired",
        "alreadyRevoked",
    }
)
"""ACME problem types (RFC 8555 §6.7, without the ``urn:ietf:params:acme:error:`` prefix)
that no retry can fix."""

CtrlErrorT = TerminalError | RetryableError
"""What ``classify`` returns: one of the worker's two kinds of error."""

_RETRY_AFTER_TEXT = re.compile(r"retry after (?P<when>[^,;]+?)(?:[.:]\s|$|[,;])", re.IGNORECASE)


class AcmeRefused(TerminalError):
    """The CA refused the request for good (its problem type and detail are in the message).

    Args:
        message: what was refused and why.
        problem_type: the ACME problem type (short form, e.g. ``rejectedIdentifier``), if any.
    """

    def __init__(self, message: str, problem_type: str | None = None) -> None:
        self.problem_type = problem_type
        super().__init__(message)

    def __reduce__(self) -> tuple[type[AcmeRefused], tuple[str, str | None]]:
        return (type(self), (str(self), self.problem_type))


class AuthorizationInvalid(TerminalError):
    """The CA declared an authorization invalid; ``detail`` is its problem, for the challenge row.

    Args:
        identifier: the domain the authorization was for.
        detail: the CA's problem type and detail (e.g. ``unauthorized: ... did not match``).
    """

    def __init__(self, identifier: str, detail: str) -> None:
        self.identifier = identifier
        self.detail = detail
        super().__init__(f"authorization for '{identifier}' is invalid: {detail}")

    def __reduce__(self) -> tuple[type[AuthorizationInvalid], tuple[str, str]]:
        return (type(self), (self.identifier, self.detail))


class RateLimited(RetryableError):
    """The CA rate-limited the request: try again after ``retry_after`` seconds.

    Args:
        retry_after: seconds to wait (>= 0), from the CA's answer or ``DEFAULT_RETRY_AFTER``.
        detail: the CA's problem detail.
    """

    def __init__(self, retry_after: float, detail: str = "") -> None:
        self.retry_after = max(0.0, float(retry_after))
        self.detail = detail
        super().__init__(
            f"rate limited by the ACME server (retry after {self.retry_after:.0f} s)"
            + (f": {detail}" if detail else "")
        )

    def __reduce__(self) -> tuple[type[RateLimited], tuple[float, str]]:
        return (type(self), (self.retry_after, self.detail))


def parse_retry_after(value: str | None, now: datetime.datetime | None = None) -> float | None:
    """Seconds from now until a Retry-After value (delta-seconds or an HTTP/RFC 1123 date).

    Args:
        value: the header's value (or a time taken from a problem's text).
        now: the current time (timezone-aware); default the clock.

    Returns:
        The seconds (0 for a time in the past), or None when ``value`` is empty or unparsable.
    """
    if not value or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        try:
            when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    now = now or datetime.datetime.now(datetime.UTC)
    return max(0.0, (when - now).total_seconds())


def describe_problem(problem: messages.Error) -> str:
    """``<problem type>: <detail>`` of an ACME problem document (short type when standard).

    Args:
        problem: the problem.

    Returns:
        The description (no secret: the CA wrote it).
    """
    code = problem.code or problem.typ
    return f"{code}: {problem.detail}" if problem.detail else str(code)


def _problem_status(problem: messages.Error) -> int | None:
    # Set by tasks.acme.client's network (the library drops the HTTP status and headers).
    status = getattr(problem, "http_status", None)
    return status if isinstance(status, int) else None


def _classify_problem(problem: messages.Error) -> CtrlErrorT:
    status = _problem_status(problem)
    description = describe_problem(problem)
    if problem.code == "rateLimited" or status == 429:
        seconds = parse_retry_after(getattr(problem, "retry_after_header", None))
        if seconds is None:
            match = _RETRY_AFTER_TEXT.search(problem.detail or "")
            seconds = parse_retry_after(match.group("when")) if match else None
        return RateLimited(DEFAULT_RETRY_AFTER if seconds is None else seconds, description)
    if problem.code in TERMINAL_PROBLEMS:
        return AcmeRefused(f"ACME server refused the request: {description}", problem.code)
    if status is not None and 400 <= status < 500 and problem.code not in {"badNonce"}:
        return AcmeRefused(
            f"ACME server refused the request ({status}): {description}", problem.code
        )
    return RetryableError(f"ACME server error{f' ({status})' if status else ''}: {description}")


def _classify_response(response: requests.Response) -> CtrlErrorT:
    status = response.status_code
    if status == 429:
        seconds = parse_retry_after(response.headers.get("Retry-After"))
        return RateLimited(DEFAULT_RETRY_AFTER if seconds is None else seconds)
    if status in (408,) or status >= 500:
        return RetryableError(f"ACME server answered {status}")
    return AcmeRefused(f"ACME server answered {status} without a problem document")


def _classify_validation(error: acme_errors.ValidationError) -> CtrlErrorT:
    if not error.failed_authzrs:
        return AuthorizationInvalid("?", "no detail given")
    authzr = error.failed_authzrs[0]  # an order here has one identifier
    problems = [describe_problem(c.error) for c in authzr.body.challenges if c.error is not None]
    return AuthorizationInvalid(authzr.body.identifier.value, "; ".join(problems) or "no detail")


def classify(exc: BaseException) -> CtrlErrorT:
    """The worker error for an exception from the ACME client or the CA.

    Args:
        exc: what an ACME call raised.

    Returns:
        A ``TerminalError`` (``AcmeRefused``, ``AuthorizationInvalid``, or ``exc`` itself if it
        already is one), a ``RateLimited``, or another ``RetryableError``.
    """
    if isinstance(exc, TerminalError | RetryableError):
        return exc
    if isinstance(exc, messages.Error):
        return _classify_problem(exc)
    if isinstance(exc, acme_errors.ValidationError):
        return _classify_validation(exc)
    if isinstance(exc, acme_errors.IssuanceError):
        return AcmeRefused(
            f"ACME server declared the order invalid: {describe_problem(exc.error)}", exc.error.code
        )
    if isinstance(exc, acme_errors.TimeoutError):
        return RetryableError("timed out waiting for the ACME server")
    if isinstance(exc, acme_errors.ClientError) and exc.args:
        first = exc.args[0]
        response = first[0] if isinstance(first, tuple) and first else first
        if isinstance(response, requests.Response):
            return _classify_response(response)
    if isinstance(exc, requests.exceptions.Timeout):
        return RetryableError("timed out talking to the ACME server")
    if isinstance(exc, requests.exceptions.RequestException):
        return RetryableError(f"could not reach the ACME server ({type(exc).__name__})")
    return RetryableError(f"ACME request failed ({type(exc).__name__})")
