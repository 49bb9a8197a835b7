"""HTTP to external APIs (GitHub, Depot): one client factory and one way to classify failures.

Guarantees: every client has bounded connect/read/write/pool timeouts, so no step hangs on a
silent peer. ``send`` turns every transport failure into a ``RetryableError`` whose message
names the call and the kind of failure, and never carries the request: httpx exceptions hold
the request with its headers (a bearer token, an app JWT), so they are dropped, not chained
(the error is raised outside the ``except`` block, leaving neither ``__cause__`` nor
``__context__``).

Error handling: ``is_retryable_status`` is the one rule for statuses (408, 429 and 5xx are
worth retrying; any other 4xx is not); each caller decides which terminal error a 4xx is.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any

import httpx
from pydantic import SecretStr

from worker.kernel.errors import RetryableError

__all__ = [
    "connect_error_code",
    "http_client",
    "is_retryable_status",
    "quiet_http_logs",
    "redact",
    "send",
    "send_heartbeat",
]

_CONNECT_CODE = re.compile(r"[a-z_]{1,40}")
_REDACTED = "[redacted]"

# httpx logs every request's full URL at INFO ("HTTP Request: POST <url>"): for a secret URL
# (the webhook, a heartbeat) those records are dropped while the request runs.
_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("ctrl_quiet_http", default=False)


class _DropWhileQuiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _QUIET.get()


logging.getLogger("httpx").addFilter(_DropWhileQuiet())


@contextlib.contextmanager
def quiet_http_logs() -> Iterator[None]:
    """Drop httpx's request log records (they hold the URL) inside the block (this context)."""
    token = _QUIET.set(True)
    try:
        yield
    finally:
        _QUIET.reset(token)


def http_client(timeout: float = 30.0) -> httpx.Client:
    """A new HTTP client with sane timeouts (close it, or use it as a context manager).

    Args:
        timeout: seconds allowed for reading, writing and waiting for a pooled connection;
            connecting gets at most 10 s of it.

    Returns:
        An ``httpx.Client`` that does not follow redirects (an API that redirects is
        misconfigured, and a redirect would carry the ``Authorization`` header elsewhere).
    """
    return httpx.Client(
        timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        follow_redirects=False,
    )


def send(
    client: httpx.Client, method: str, url: str, *, what: str, **kwargs: Any
) -> httpx.Response:
    """Send one request; a transport failure becomes a ``RetryableError`` naming ``what``.

    Args:
        client: the client to send with (from ``http_client``).
        method: the HTTP method.
        url: the absolute URL.
        what: what the call is, for messages (``"github installation 42 access token"``).
        **kwargs: passed to ``httpx.Client.request`` (``json``, ``headers``).

    Returns:
        The response, whatever its status.

    Raises:
        RetryableError: the request timed out or the connection failed.
    """
    try:
        return client.request(method, url, **kwargs)
    except httpx.TimeoutException as exc:
        failure = f"timed out ({type(exc).__name__})"
    except httpx.ConnectError as exc:
        # A connect error's text is the OS's ("Connection refused"), never a header.
        failure = f"could not connect: {exc}"
    except httpx.HTTPError as exc:
        # Other transport errors may quote the request (its headers): only the class is told.
        failure = f"failed: {type(exc).__name__}"
    # Raised outside the handlers, so the httpx exception (and its request) is not kept.
    raise RetryableError(f"{what} {failure}")


def is_retryable_status(status: int) -> bool:
    """Tell whether an HTTP status is worth retrying: 408, 429 and every 5xx.

    Args:
        status: the HTTP status code.

    Returns:
        True for 408, 429 and 500-599.
    """
    return status in (408, 429) or status >= 500


def connect_error_code(response: httpx.Response) -> str:
    """The Connect error code of a response (``" (unauthenticated)"``), or ``""``.

    Only the code is told, never the error's message: a message may quote the request.

    Args:
        response: a non-2xx response of a Connect (JSON) endpoint.

    Returns:
        ``" (<code>)"`` when the body is a Connect error with a well-formed code, else ``""``.
    """
    try:
        body = response.json()
    except ValueError:
        return ""
    code = body.get("code") if isinstance(body, dict) else None
    return f" ({code})" if isinstance(code, str) and _CONNECT_CODE.fullmatch(code) else ""


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with every occurrence of each (non-empty) secret replaced by ``[redacted]``.

    Args:
        text: text from an external system (a build log, an error body).
        secrets: the values that must not appear; ``None`` and short values are skipped
            (a 1-3 character "secret" would redact half the text and protect nothing).

    Returns:
        The redacted text.
    """
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, _REDACTED)
    return text


def send_heartbeat(url: SecretStr | None, what: str) -> bool:
    """Ping a dead-man's-switch heartbeat (Checkly): one GET, 10 s timeout.

    The URL is a secret (it carries the check's token): it never appears in a message.

    Args:
        url: the heartbeat URL, or None when none is configured (nothing is sent).
        what: what the heartbeat is for, for messages (``"certificate renewal heartbeat"``).

    Returns:
        True when a heartbeat was sent, False when no URL is configured.

    Raises:
        RetryableError: the request failed or answered a non-2xx status (the original
            treats a failed heartbeat as an error of the run, which is retried).
    """
    if url is None or not url.get_secret_value():
        return False
    with http_client(timeout=10.0) as client, quiet_http_logs():
        response = send(client, "GET", url.get_secret_value(), what=what)
    if not response.is_success:
        raise RetryableError(f"{what} answered HTTP {response.status_code}")
    return True
