"""GitHub App installation tokens: what lets a build clone a private repository.

Guarantees: ``installation_token`` returns a token for one installation of the configured
GitHub App, fetched with an RS256 app JWT (``iss`` = app id, ``iat`` = now - 60 s against
clock drift, ``exp`` = now + 9 min, under GitHub's 10 min limit) and cached in-process for
55 minutes per installation (GitHub's tokens last 60; a token whose ``expires_at`` is sooner
is cached for less). Concurrent callers for one installation share one request. The cache
belongs to one process: a forked child starts with an empty cache (and fresh locks: a lock a
parent thread held at the fork would stay held forever in the child).

Security: the private key, the JWT and the token never appear in logs, exceptions or reprs,
and are never persisted. That is why this is a plain function and not a durable step (a
step's result is stored): the deploy flow calls it inside its build step and hands the token
to the builder through the child process's environment only (``tasks.build.cli``).

Error handling: GitHub not configured (``UNKEY_GITHUB_APP_ID`` / ``UNKEY_GITHUB_PRIVATE_KEY_PEM``)
is a ``ConfigError``, unless ``UNKEY_ALLOW_UNAUTHENTICATED_DEPLOYMENTS`` is true: then there is
no token (``None``) and the build runs without the secret (public repositories only). HTTP
401/403/404 are terminal (``RefusedError`` / ``NotFoundError`` naming the installation id); a
rate-limited 403, 408, 429, 5xx, timeouts and network failures are retryable.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime

import httpx
import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from tasks.http import http_client, is_retryable_status, send
from worker.kernel.errors import (
    ConfigError,
    InvalidParameterError,
    NotFoundError,
    RefusedError,
    RetryableError,
)
from worker.settings import Settings, env_name, worker_settings

__all__ = ["TOKEN_CACHE_SECONDS", "clear_token_cache", "installation_token"]

TOKEN_CACHE_SECONDS = 55 * 60
_JWT_BACKDATE_SECONDS = 60
_JWT_LIFETIME_SECONDS = 9 * 60
# A token GitHub says expires sooner than this is used once and not cached.
_EXPIRY_MARGIN_SECONDS = 5 * 60
_TIMEOUT_SECONDS = 30.0

logger = logging.getLogger(__name__)

_CacheKey = tuple[str, int, int]


@dataclass
class _CachedToken:
    token: str = field(repr=False)
    fresh_until: float  # time.monotonic()


class _TokenCache:
    """Tokens by (API URL, app id, installation id), and one fetch lock per key."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._entries: dict[_CacheKey, _CachedToken] = {}
        self._fetch_locks: dict[_CacheKey, threading.Lock] = {}

    def get(self, key: _CacheKey) -> str | None:
        with self._guard:
            entry = self._entries.get(key)
            if entry is None or entry.fresh_until <= time.monotonic():
                return None
            return entry.token

    def put(self, key: _CacheKey, token: str, fresh_for: float) -> None:
        with self._guard:
            self._entries[key] = _CachedToken(token, time.monotonic() + fresh_for)

    def fetch_lock(self, key: _CacheKey) -> threading.Lock:
        with self._guard:
            return self._fetch_locks.setdefault(key, threading.Lock())


_cache = _TokenCache()


def clear_token_cache() -> None:
    """Forget every cached installation token of this process (tests, key rotation)."""
    global _cache
    _cache = _TokenCache()


os.register_at_fork(after_in_child=clear_token_cache)


def installation_token(installation_id: int) -> str | None:
    """An access token for one installation of the GitHub App (cached 55 min).

    Never persist, log or return the token from a durable step.

    Args:
        installation_id: the GitHub App installation that may read the repository.

    Returns:
        The token, or ``None`` when GitHub is not configured and
        ``UNKEY_ALLOW_UNAUTHENTICATED_DEPLOYMENTS`` is true (build without the secret).

    Raises:
        ConfigError: GitHub is not configured (and unauthenticated deploys are not allowed),
            or the private key is not an RSA key in PEM format.
        InvalidParameterError: ``installation_id`` is not a positive integer.
        RefusedError: GitHub refused the app's JWT or the installation (HTTP 401/403).
        NotFoundError: GitHub does not know the installation (HTTP 404).
        RetryableError: rate limit, 5xx, timeout or network failure.
    """
    settings = worker_settings()
    if not settings.github_enabled():
        if settings.allow_unauthenticated_deployments:
            return None
        raise ConfigError(
            f"GitHub is not configured: {env_name('github_app_id')} and "
            f"{env_name('github_private_key_pem')} are required to build from git "
            f"(or set {env_name('allow_unauthenticated_deployments')}=true for public "
            "repositories)"
        )
    if isinstance(installation_id, bool) or not isinstance(installation_id, int):
        raise InvalidParameterError("installation_id", "must be an integer")
    if installation_id <= 0:
        raise InvalidParameterError("installation_id", "must be a positive integer")
    key = (settings.github_api_url.rstrip("/"), settings.github_app_id, installation_id)
    token = _cache.get(key)
    if token is not None:
        return token
    with _cache.fetch_lock(key):
        token = _cache.get(key)
        if token is not None:
            return token
        token, fresh_for = _request_token(settings, installation_id)
        if fresh_for > 0:
            _cache.put(key, token, fresh_for)
        logger.info(
            "GitHub installation %d: new access token (cached %d s)",
            installation_id,
            max(fresh_for, 0),
        )
        return token


def _request_token(settings: Settings, installation_id: int) -> tuple[str, float]:
    """POST .../access_tokens; returns the token and how long it may be cached."""
    what = f"github installation {installation_id} access token request"
    url = f"{settings.github_api_url.rstrip('/')}/app/installations/{installation_id}/access_tokens"
    headers = {
        "Accept": "application/vnd.github+json",
        "Authorization": f"Bearer {_app_jwt(settings)}",
        "X-GitHub-Api-Version": "2022-11-28",
        "User-Agent": "unkey-ctrl-worker",
    }
    with http_client(_TIMEOUT_SECONDS) as client:
        response = send(client, "POST", url, what=what, headers=headers)
    _raise_for_status(response, installation_id, what)
    try:
        body = response.json()
    except ValueError:
        body = None
    token = body.get("token") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token:
        raise RetryableError(f"{what}: HTTP {response.status_code} without a token")
    return token, _cacheable_seconds(body.get("expires_at") if isinstance(body, dict) else None)


def _raise_for_status(response: httpx.Response, installation_id: int, what: str) -> None:
    # GitHub's error bodies are not quoted: only the status, which can carry no secret.
    status = response.status_code
    if 200 <= status < 300:
        return
    if status == 403 and _rate_limited(response):
        raise RetryableError(f"{what} was rate-limited (HTTP 403)")
    if is_retryable_status(status):
        raise RetryableError(f"{what} failed: HTTP {status}")
    if status == 404:
        raise NotFoundError(
            f"github installation {installation_id} not found (HTTP 404): "
            "is the GitHub App still installed on the repository's account?"
        )
    if status == 401:
        raise RefusedError(
            f"github installation {installation_id}: GitHub rejected the app's JWT (HTTP 401); "
            f"check {env_name('github_app_id')} and {env_name('github_private_key_pem')}"
        )
    raise RefusedError(
        f"github installation {installation_id}: GitHub refused an access token (HTTP {status})"
    )


def _rate_limited(response: httpx.Response) -> bool:
    # GitHub reports (secondary) rate limits as 403 with these headers; waiting helps.
    headers = response.headers
    return headers.get("x-ratelimit-remaining") == "0" or "retry-after" in headers


def _cacheable_seconds(expires_at: object) -> float:
    """How long a token may be cached: 55 min, or less when GitHub says it expires sooner."""
    if not isinstance(expires_at, str):
        return TOKEN_CACHE_SECONDS
    try:
        expires = datetime.fromisoformat(expires_at.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return TOKEN_CACHE_SECONDS
    return min(TOKEN_CACHE_SECONDS, expires - time.time() - _EXPIRY_MARGIN_SECONDS)


def _app_jwt(settings: Settings) -> str:
    """The app's RS256 JWT (wall-clock time: GitHub's clock judges it, not the worker's)."""
    now = int(time.time())
    claims = {
        "iat": now - _JWT_BACKDATE_SECONDS,
        "exp": now + _JWT_LIFETIME_SECONDS,
        "iss": str(settings.github_app_id),
    }
    return jwt.encode(claims, _private_key(settings), algorithm="RS256")


def _private_key(settings: Settings) -> RSAPrivateKey:
    secret = settings.github_private_key_pem
    pem = secret.get_secret_value() if secret is not None else ""
    # A PEM pasted into one environment variable line often has literal "\n" escapes.
    if "\n" not in pem:
        pem = pem.replace("\\n", "\n")
    problem = f"{env_name('github_private_key_pem')} is not an RSA private key in PEM format"
    try:
        key = serialization.load_pem_private_key(pem.strip().encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The parser's error is not chained: it may quote the key material.
        key = None
    if not isinstance(key, RSAPrivateKey):
        raise ConfigError(problem)
    return key
