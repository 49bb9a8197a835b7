"""GitHub App installation tokens (tasks/github.py) against a stand-in GitHub API.

These protect SPEC §4 DeployService "git via GitHub App installation token" and §3 (secrets):
the app JWT is a valid RS256 token of the app, tokens are cached 55 min per installation,
refusals are terminal and transient failures retryable, and no message carries the private
key, the JWT or the token.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tasks import github
from tasks.github import clear_token_cache, installation_token
from worker.kernel.errors import (
    ConfigError,
    InvalidParameterError,
    NotFoundError,
    RefusedError,
    RetryableError,
    TerminalError,
)
from worker.settings import Settings, use_settings

APP_ID = 123456
TOKEN = "ghs_installationTokenValue0123456789"


@pytest.fixture(scope="module")
def app_key() -> rsa.RSAPrivateKey:
    """The GitHub App's RSA key (one per module: generating it is slow)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def pem(app_key: rsa.RSAPrivateKey) -> str:
    return app_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    """Every test starts and ends with an empty token cache."""
    clear_token_cache()
    yield
    clear_token_cache()


def configure(api_url: str, pem: str | None, **extra: Any) -> None:
    use_settings(
        Settings(
            _env_file=None,
            github_app_id=APP_ID if pem else 0,
            github_private_key_pem=pem,
            github_api_url=api_url,
            **extra,
        )
    )


class TokenEndpoint:
    """The stand-in ``POST /app/installations/{id}/access_tokens``: records each request."""

    def __init__(self, status: int = 201, expires_in: float = 3600, headers=None) -> None:
        self.status = status
        self.expires_in = expires_in
        self.headers = headers or {}
        self.requests: list[Request] = []
        self.lock = threading.Lock()

    def __call__(self, request: Request) -> Response:
        with self.lock:
            self.requests.append(request)
        if self.status >= 300:
            body = {"message": "Bad credentials", "documentation_url": "https://docs.github.com"}
        else:
            expires = datetime.now(UTC) + timedelta(seconds=self.expires_in)
            body = {"token": TOKEN, "expires_at": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}
        return Response(
            json.dumps(body), self.status, self.headers, content_type="application/json"
        )

    def jwt_of(self, index: int = 0) -> str:
        return self.requests[index].headers["Authorization"].removeprefix("Bearer ")


def serve(httpserver: HTTPServer, endpoint: TokenEndpoint, installation_id: int = 42) -> None:
    httpserver.expect_request(
        f"/app/installations/{installation_id}/access_tokens", method="POST"
    ).respond_with_handler(endpoint)


def test_token_is_fetched_with_a_verifiable_rs256_app_jwt(httpserver, pem, app_key) -> None:
    """The app JWT verifies with the app's public key (RS256), names the app as issuer,
    is back-dated 60 s and expires within GitHub's 10 minutes; the Accept header is GitHub's."""
    endpoint = TokenEndpoint()
    serve(httpserver, endpoint)
    configure(httpserver.url_for(""), pem)

    before = int(time.time())
    assert installation_token(42) == TOKEN
    after = int(time.time())

    request = endpoint.requests[0]
    assert request.headers["Accept"] == "application/vnd.github+json"
    claims = jwt.decode(
        endpoint.jwt_of(),
        app_key.public_key(),
        algorithms=["RS256"],
        issuer=str(APP_ID),
        options={"require": ["iat", "exp", "iss"]},
    )
    assert jwt.get_unverified_header(endpoint.jwt_of())["alg"] == "RS256"
    assert before - 60 <= claims["iat"] <= after - 60
    assert before + 540 <= claims["exp"] <= after + 540


def test_token_is_cached_per_installation(httpserver, pem) -> None:
    """A second call for the same installation makes no HTTP request; another
    installation gets its own token request."""
    endpoint = TokenEndpoint()
    serve(httpserver, endpoint, 42)
    serve(httpserver, endpoint, 43)
    configure(httpserver.url_for(""), pem)

    assert installation_token(42) == TOKEN
    assert installation_token(42) == TOKEN
    assert len(endpoint.requests) == 1
    assert installation_token(43) == TOKEN
    assert [r.path for r in endpoint.requests] == [
        "/app/installations/42/access_tokens",
        "/app/installations/43/access_tokens",
    ]


def test_token_expiring_soon_is_not_kept(httpserver, pem) -> None:
    """A token GitHub says expires within the safety margin is used once, not cached for
    55 minutes: the next call fetches a new one."""
    endpoint = TokenEndpoint(expires_in=120)
    serve(httpserver, endpoint)
    configure(httpserver.url_for(""), pem)

    installation_token(42)
    installation_token(42)
    assert len(endpoint.requests) == 2


def test_concurrent_callers_share_one_token_request(httpserver, pem) -> None:
    """Threads asking for the same installation at once cause one request (thread-safe
    cache with a fetch lock per installation)."""
    endpoint = TokenEndpoint()

    def slow(request: Request) -> Response:
        time.sleep(0.2)  # widens the race; the assertion holds for any timing
        return endpoint(request)

    httpserver.expect_request(
        "/app/installations/42/access_tokens", method="POST"
    ).respond_with_handler(slow)
    configure(httpserver.url_for(""), pem)
    barrier = threading.Barrier(8)
    results: list[str | None] = []

    def call() -> None:
        barrier.wait()
        results.append(installation_token(42))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == [TOKEN] * 8
    assert len(endpoint.requests) == 1


def test_forked_child_starts_with_an_empty_cache(httpserver, pem) -> None:
    """A forked child never reuses the parent's cached token (nor its locks)."""
    serve(httpserver, TokenEndpoint())
    configure(httpserver.url_for(""), pem)
    installation_token(42)
    key = (httpserver.url_for("").rstrip("/"), APP_ID, 42)
    assert github._cache.get(key) == TOKEN

    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        os._exit(0 if github._cache.get(key) is None else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize(
    ("status", "error", "words"),
    [
        (401, RefusedError, "rejected the app's JWT"),
        (403, RefusedError, "refused"),
        (404, NotFoundError, "not found"),
    ],
)
def test_refusal_is_terminal_and_names_installation_without_secrets(
    httpserver, pem, status, error, words
) -> None:
    """401/403/404 fail at once (terminal), naming the installation id; the message and
    the exception chain carry neither the JWT, the private key nor GitHub's body."""
    endpoint = TokenEndpoint(status=status)
    serve(httpserver, endpoint)
    configure(httpserver.url_for(""), pem)

    with pytest.raises(error) as caught:
        installation_token(42)

    assert isinstance(caught.value, TerminalError)
    message = str(caught.value)
    assert "42" in message and words in message
    for secret in (endpoint.jwt_of(), pem, "Bad credentials", TOKEN):
        assert secret not in message
        assert secret not in repr(caught.value)
    assert caught.value.__cause__ is None and caught.value.__context__ is None


@pytest.mark.parametrize(
    ("status", "headers"),
    [(500, {}), (502, {}), (429, {}), (403, {"x-ratelimit-remaining": "0"})],
)
def test_server_errors_and_rate_limits_are_retryable(httpserver, pem, status, headers) -> None:
    """5xx, 429 and a rate-limited 403 are retryable, and nothing is cached."""
    endpoint = TokenEndpoint(status=status, headers=headers)
    serve(httpserver, endpoint)
    configure(httpserver.url_for(""), pem)

    with pytest.raises(RetryableError, match=f"HTTP {status}"):
        installation_token(42)
    with pytest.raises(RetryableError):
        installation_token(42)
    assert len(endpoint.requests) == 2


def test_network_failure_is_retryable_without_the_request(pem) -> None:
    """A connection failure is retryable, and the httpx exception (whose request holds the
    JWT in its headers) is not chained to the error."""
    configure("http://127.0.0.1:1", pem)

    with pytest.raises(RetryableError, match="installation 42") as caught:
        installation_token(42)
    assert caught.value.__cause__ is None and caught.value.__context__ is None


def test_unconfigured_github_allowed_unauthenticated_builds_without_token() -> None:
    """With no GitHub App and UNKEY_ALLOW_UNAUTHENTICATED_DEPLOYMENTS=true, there is no
    token: the build runs without the secret."""
    configure("http://127.0.0.1:1", None, allow_unauthenticated_deployments=True)
    assert installation_token(42) is None


def test_unconfigured_github_is_a_config_error_naming_the_variables() -> None:
    """With no GitHub App and unauthenticated deploys not allowed, the call fails
    terminally naming UNKEY_GITHUB_APP_ID and UNKEY_GITHUB_PRIVATE_KEY_PEM."""
    configure("http://127.0.0.1:1", None)
    with pytest.raises(ConfigError) as caught:
        installation_token(42)
    assert "UNKEY_GITHUB_APP_ID" in str(caught.value)
    assert "UNKEY_GITHUB_PRIVATE_KEY_PEM" in str(caught.value)


def test_invalid_private_key_is_a_config_error_without_key_material() -> None:
    """A private key that is not RSA PEM is a ConfigError naming the variable, not quoting
    the value, and not chaining the parser's error."""
    bogus = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n-----END PRIVATE KEY-----"
    configure("http://127.0.0.1:1", bogus)
    with pytest.raises(ConfigError, match="UNKEY_GITHUB_PRIVATE_KEY_PEM") as caught:
        installation_token(42)
    assert "c2VjcmV0" not in str(caught.value)
    assert caught.value.__context__ is None


def test_private_key_with_escaped_newlines_is_accepted(httpserver, pem, app_key) -> None:
    """A PEM pasted into one environment line with literal \\n escapes still signs."""
    endpoint = TokenEndpoint()
    serve(httpserver, endpoint)
    configure(httpserver.url_for(""), pem.replace("\n", "\\n"))

    assert installation_token(42) == TOKEN
    jwt.decode(endpoint.jwt_of(), app_key.public_key(), algorithms=["RS256"])


@pytest.mark.parametrize("bad", [0, -1, True])
def test_bad_installation_id_is_refused(pem, bad) -> None:
    """An installation id that is not a positive integer is an invalid parameter."""
    configure("http://127.0.0.1:1", pem)
    with pytest.raises(InvalidParameterError, match="installation_id"):
        installation_token(bad)


def test_cached_token_repr_hides_the_token() -> None:
    """The cache entry's repr never shows the token."""
    assert TOKEN not in repr(github._CachedToken(TOKEN, 0.0))
