"""Custom-domain name rules of ``add_custom_domain`` and the shapes of the values it draws."""

from __future__ import annotations

import re

import pytest

from tasks.custom_domain_names import (
    new_target_cname,
    new_verification_token,
    validate_custom_domain,
)
from worker.kernel.errors import ConfigError, InvalidParameterError, TerminalError

_LONGEST = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 characters


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("example.com", "example.com"),
        ("App.Example.COM", "app.example.com"),
        ("a-b.c-d.example", "a-b.c-d.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("1.example.com", "1.example.com"),
        ("a" * 63 + ".com", "a" * 63 + ".com"),
        (_LONGEST, _LONGEST),
    ],
)
def test_valid_names_are_accepted_lowercased(given: str, stored: str) -> None:
    """A valid name is accepted and returned lowercased (the stored form)."""
    assert validate_custom_domain(given) == stored


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ("", "non-empty"),
        ("localhost", "at least two labels"),
        ("*.example.com", "wildcard"),
        ("example.com.", "end with a dot"),
        ("a..example.com", "empty label"),
        (".example.com", "empty label"),
        ("-a.example.com", "label '-a'"),
        ("a-.example.com", "label 'a-'"),
        ("a_b.example.com", "label 'a_b'"),
        ("exa mple.com", "label 'exa mple'"),
        (" example.com", "spaces"),
        ("a" * 64 + ".com", "longer than 63"),
        (_LONGEST + "d", "at most 253"),
        ("127.0.0.1", "IP address"),
        ("::1", "IP address"),
        ("[::1]", "IP address"),
        ("10.0.0", "all digits"),
        ("bücher.example", "ASCII"),
        ("example.com/path", "label 'com/path'"),
    ],
)
def test_invalid_names_are_refused_naming_the_rule(given: str, problem: str) -> None:
    """An invalid name raises a terminal InvalidParameterError on 'domain' naming the rule."""
    with pytest.raises(InvalidParameterError) as caught:
        validate_custom_domain(given)
    assert caught.value.parameter == "domain"
    assert problem in caught.value.problem
    assert isinstance(caught.value, TerminalError)


def test_verification_tokens_are_24_url_safe_random_characters() -> None:
    """Tokens are 24 characters of [A-Za-z0-9] and never repeat."""
    tokens = {new_verification_token() for _ in range(200)}
    assert len(tokens) == 200
    assert all(re.fullmatch(r"[A-Za-z0-9]{24}", token) for token in tokens)


def test_target_cnames_are_a_random_dns_label_under_the_cname_domain() -> None:
    """Targets are '<16-char RFC 1035 label>.<cname domain>', normalized, and never repeat."""
    targets = {new_target_cname("Cname.Unkey.Example.") for _ in range(200)}
    assert len(targets) == 200
    assert all(re.fullmatch(r"[a-z][a-z0-9]{15}\.cname\.unkey\.example", t) for t in targets)


def test_a_target_needs_the_cname_domain_setting() -> None:
    """Without UNKEY_CNAME_DOMAIN a target cannot be made: a ConfigError naming the variable."""
    with pytest.raises(ConfigError, match="UNKEY_CNAME_DOMAIN"):
        new_target_cname(None)
