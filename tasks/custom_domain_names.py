"""Names of custom domains: the validation of ``add_custom_domain`` and the values it draws.

(The domains a deploy creates under the platform's apex are ``tasks.domains``.)

Guarantees:

- ``validate_custom_domain`` accepts exactly a lowercase-able DNS host name the edge can serve
  a certificate for over HTTP-01: at most 253 characters, at least two labels, each label 1-63
  of ``[a-z0-9-]`` not starting or ending with ``-``, no wildcard, no trailing dot, no IP
  address, ASCII only (an internationalized name is given in its ``xn--`` form). It returns
  the name lowercased, the form stored in ``custom_domains.domain``; anything else raises
  ``InvalidParameterError("domain", ...)`` (terminal) saying which rule was broken.
- ``new_verification_token`` is 24 random characters of ``[A-Za-z0-9]`` (~143 bits, as the
  original's ``uid.Secure(24)``), safe in a URL and in a TXT record.
- ``new_target_cname`` is ``<random RFC 1035 label of 16>.<UNKEY_CNAME_DOMAIN>``.

These are pure functions; the random values are drawn by the caller inside a durable step, so
a replay keeps them.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import string

from worker.kernel.clock import new_dns_label
from worker.kernel.errors import ConfigError, InvalidParameterError

__all__ = [
    "MAX_DOMAIN_LENGTH",
    "TOKEN_LENGTH",
    "new_target_cname",
    "new_verification_token",
    "validate_custom_domain",
]

MAX_DOMAIN_LENGTH = 253
TOKEN_LENGTH = 24
TARGET_LABEL_LENGTH = 16
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_TOKEN_ALPHABET = string.ascii_letters + string.digits


def _invalid(problem: str) -> InvalidParameterError:
    return InvalidParameterError("domain", problem)


def validate_custom_domain(domain: str) -> str:
    """Check a custom domain name and return it lowercased.

    Args:
        domain: the name as the user gave it (``App.Example.com``).

    Returns:
        The name lowercased (``app.example.com``).

    Raises:
        InvalidParameterError: the name breaks a rule (parameter ``domain``; the message
            names the rule and the offending label).
    """
    if not isinstance(domain, str) or not domain:
        raise _invalid("must be a non-empty domain name")
    if not domain.isascii():
        raise _invalid("must be ASCII (give an internationalized name in its xn-- form)")
    name = domain.lower()
    if name != name.strip():
        raise _invalid("must not contain spaces")
    if len(name) > MAX_DOMAIN_LENGTH:
        raise _invalid(f"must be at most {MAX_DOMAIN_LENGTH} characters (got {len(name)})")
    if name.endswith("."):
        raise _invalid("must not end with a dot")
    if "*" in name:
        raise _invalid("must not be a wildcard")
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        pass
    else:
        raise _invalid("must be a domain name, not an IP address")
    labels = name.split(".")
    if len(labels) < 2:
        raise _invalid("must have at least two labels (like example.com)")
    for label in labels:
        if not label:
            raise _invalid("must not have an empty label (two dots in a row or a leading dot)")
        if len(label) > 63:
            raise _invalid(f"label '{label[:20]}...' is longer than 63 characters")
        if not _LABEL.fullmatch(label):
            raise _invalid(
                f"label '{label}' must be letters, digits and '-', not starting or ending with '-'"
            )
    if labels[-1].isdigit():
        # A numeric top-level label is how an IPv4 address looks; no public TLD is numeric.
        raise _invalid(f"top-level label '{labels[-1]}' must not be all digits")
    return name


def new_verification_token() -> str:
    """A new verification token (the original's ``uid.Secure(24)``).

    Returns:
        24 random characters of ``[A-Za-z0-9]``.
    """
    return "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(TOKEN_LENGTH))


def new_target_cname(cname_domain: str | None) -> str:
    """A new CNAME target for a custom domain: ``<random16>.<cname_domain>``.

    Args:
        cname_domain: ``UNKEY_CNAME_DOMAIN`` (a trailing dot and case are normalized).

    Returns:
        The target, lowercase, without a trailing dot.

    Raises:
        ConfigError: ``cname_domain`` is empty (custom domains need ``UNKEY_CNAME_DOMAIN``).
    """
    apex = (cname_domain or "").strip().rstrip(".").lower()
    if not apex:
        raise ConfigError("UNKEY_CNAME_DOMAIN is required for custom domains")
    return f"{new_dns_label(TARGET_LABEL_LENGTH)}.{apex}"
