"""DNS lookups (dnspython) and the custom-domain check.

Every lookup goes to ``UNKEY_DNS_NAMESERVERS`` (comma-separated ``host[:port]``) or, when it is
empty, to the system resolver (``/etc/resolv.conf``). Nothing is cached here: every check sees
what DNS says now.

Guarantees:

- ``verify_ownership`` is the custom-domain check of the original (reference §7.1 step 4): TXT
  ``_unkey.<domain>`` must hold ``unkey-domain-verify=<token>`` (case-insensitive) and the
  domain's CNAME must equal the target (lowercased, without the trailing dot). Both lookups run
  in parallel; the result says what was found, so a failed verification can tell the user
  what is missing.
- The DNS-01 propagation check is in ``tasks.dns_propagation``.

Error handling: a name that does not exist (NXDOMAIN) or has no record of the type (NoAnswer)
is an empty answer, not an error. A timeout, SERVFAIL or an unreachable server raises
``DnsLookupError`` (retryable). ``verify_ownership`` never raises for a lookup: as the original,
a failed lookup counts as "not found", and the failure is kept in the result's message.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver

from worker.kernel.errors import RetryableError
from worker.settings import nameserver_address, worker_settings

__all__ = [
    "TXT_PREFIX",
    "TXT_VALUE_PREFIX",
    "DnsLookupError",
    "DomainCheck",
    "Nameserver",
    "cname_target",
    "configured_nameservers",
    "lookup",
    "make_resolver",
    "txt_text",
    "txt_values",
    "verify_ownership",
]

TXT_PREFIX = "_unkey"
TXT_VALUE_PREFIX = "unkey-domain-verify="
LOOKUP_TIMEOUT = 10.0  # the original's resolver timeout (pkg/dns/dns.go)
_MESSAGE_LIMIT = 512  # custom_domains.verification_error is varchar(512)
_SHOWN_VALUES = 3
_SHOWN_CHARS = 80

Nameserver = tuple[str, int]
"""An IP address and a port."""


class DnsLookupError(RetryableError):
    """A DNS lookup failed (timeout, SERVFAIL, no server reachable): worth retrying."""


def _addresses(host: str) -> list[str]:
    # A configured name (ns1.example.net) is looked up once per resolver, by the system.
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise DnsLookupError(f"DNS server '{host}' could not be resolved: {exc}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def configured_nameservers() -> list[Nameserver]:
    """The servers of ``UNKEY_DNS_NAMESERVERS``, names resolved to addresses (empty: unset).

    Returns:
        One ``(ip, port)`` per address of every configured entry, in order.

    Raises:
        DnsLookupError: a configured host name does not resolve.
    """
    servers: list[Nameserver] = []
    for entry in worker_settings().dns_nameservers:
        host, port = nameserver_address(entry)
        servers.extend((address, port) for address in _addresses(host))
    return servers


def make_resolver(timeout: float) -> dns.resolver.Resolver:
    """A resolver for ``UNKEY_DNS_NAMESERVERS`` (else the system's), uncached, bounded by
    ``timeout`` seconds in all.

    Raises:
        DnsLookupError: there is no resolver configuration at all.
    """
    servers = configured_nameservers()
    try:
        resolver = dns.resolver.Resolver(configure=not servers)
    except dns.resolver.NoResolverConfiguration:
        raise DnsLookupError(
            "no DNS resolver: /etc/resolv.conf has none and UNKEY_DNS_NAMESERVERS is unset"
        ) from None
    if servers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in servers]
    resolver.lifetime = timeout
    resolver.timeout = min(timeout, 2.0)  # one server's turn; the lifetime bounds them all
    resolver.cache = None
    return resolver


def lookup(name: str, rdtype: str, timeout: float) -> dns.resolver.Answer | None:
    """One lookup through ``make_resolver``; no such name or record is ``None``.

    Raises:
        DnsLookupError: timeout, SERVFAIL, refused, or another DNS failure.
    """
    try:
        return make_resolver(timeout).resolve(name, rdtype, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    except dns.exception.Timeout:
        raise DnsLookupError(f"DNS {rdtype} lookup of '{name}' timed out") from None
    except dns.resolver.NoNameservers:
        raise DnsLookupError(
            f"DNS {rdtype} lookup of '{name}' failed: no server answered (SERVFAIL or refused)"
        ) from None
    except dns.exception.DNSException as exc:
        raise DnsLookupError(
            f"DNS {rdtype} lookup of '{name}' failed: {type(exc).__name__}"
        ) from None


def txt_text(rdata: object) -> str:
    """The text of one TXT record (its character-strings joined)."""
    strings: Sequence[bytes] = getattr(rdata, "strings", ())
    return b"".join(strings).decode("utf-8", errors="replace")


def txt_values(name: str, timeout: float = LOOKUP_TIMEOUT) -> list[str]:
    """The TXT values of ``name`` (each record's strings joined, as DNS-01 and the original do).

    Args:
        name: the name to look up (a trailing dot is optional).
        timeout: seconds for the whole lookup.

    Returns:
        The values; empty when the name does not exist or has no TXT record.

    Raises:
        DnsLookupError: timeout, SERVFAIL or no server reachable.
    """
    answer = lookup(name, "TXT", timeout)
    return [] if answer is None else [txt_text(rdata) for rdata in answer]


def cname_target(name: str, timeout: float = LOOKUP_TIMEOUT) -> str | None:
    """The CNAME target of ``name``, lowercased and without the trailing dot.

    Args:
        name: the name to look up.
        timeout: seconds for the whole lookup.

    Returns:
        The target, or None when the name does not exist or is not a CNAME.

    Raises:
        DnsLookupError: timeout, SERVFAIL or no server reachable.
    """
    answer = lookup(name, "CNAME", timeout)
    if answer is None:
        return None
    for rdata in answer:
        target: dns.name.Name = getattr(rdata, "target")  # noqa: B009 (a CNAME rdata)
        return target.to_text(omit_final_dot=True).lower()
    return None


def _shown(text: str) -> str:
    return repr(text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "...")


@dataclass(frozen=True)
class DomainCheck:
    """The outcome of one custom-domain DNS check.

    Attributes:
        domain: the custom domain checked.
        txt_name: the TXT name checked (``_unkey.<domain>``).
        expected_txt: the TXT value required.
        target_cname: the CNAME target required.
        txt_ok: the TXT record holds the expected value.
        cname_ok: the domain is a CNAME to the target.
        found_txt: the TXT values found.
        found_cname: the CNAME target found (None: no CNAME).
        txt_error: why the TXT lookup failed, when it did (then ``txt_ok`` is False).
        cname_error: why the CNAME lookup failed, when it did.
    """

    domain: str
    txt_name: str
    expected_txt: str
    target_cname: str
    txt_ok: bool
    cname_ok: bool
    found_txt: list[str]
    found_cname: str | None
    txt_error: str | None = None
    cname_error: str | None = None

    @property
    def verified(self) -> bool:
        """Both checks passed."""
        return self.txt_ok and self.cname_ok

    def missing_message(self) -> str:
        """What is missing (TXT, CNAME or both) and what was found, at most 512 characters.

        Returns:
            The message for ``custom_domains.verification_error``; empty when verified.
        """
        kinds: list[str] = []
        parts: list[str] = []
        if not self.txt_ok:
            if self.txt_error:
                found = f"lookup failed: {self.txt_error}"
            elif self.found_txt:
                shown = ", ".join(_shown(v) for v in self.found_txt[:_SHOWN_VALUES])
                more = len(self.found_txt) - _SHOWN_VALUES
                found = f"found {shown}" + (f" and {more} more" if more > 0 else "")
            else:
                found = "found no TXT record"
            kinds.append("TXT")
            parts.append(f"TXT {self.txt_name} must contain {self.expected_txt!r} ({found})")
        if not self.cname_ok:
            if self.cname_error:
                found = f"lookup failed: {self.cname_error}"
            elif self.found_cname:
                found = f"found {_shown(self.found_cname)}"
            else:
                found = "found no CNAME record"
            kinds.append("CNAME")
            parts.append(f"CNAME {self.domain} must point to {self.target_cname!r} ({found})")
        if not parts:
            return ""
        message = f"missing {' and '.join(kinds)}: " + "; ".join(parts)
        return message if len(message) <= _MESSAGE_LIMIT else message[: _MESSAGE_LIMIT - 3] + "..."


def _normalized(name: str) -> str:
    return name.strip().rstrip(".").lower()


def verify_ownership(
    domain: str, token: str, target_cname: str, timeout: float = LOOKUP_TIMEOUT
) -> DomainCheck:
    """Check a custom domain's TXT proof and CNAME (both lookups in parallel).

    Args:
        domain: the custom domain (``app.example.com``).
        token: its verification token.
        target_cname: the CNAME target it must point to.
        timeout: seconds for each lookup.

    Returns:
        What was required and found; a failed lookup counts as "not found" (the original's
        rule) with its reason in ``txt_error`` / ``cname_error``.
    """
    domain = _normalized(domain)
    txt_name = f"{TXT_PREFIX}.{domain}"
    expected = f"{TXT_VALUE_PREFIX}{token}"
    target = _normalized(target_cname)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="dns-check") as pool:
        txt_future = pool.submit(txt_values, txt_name, timeout)
        cname_future = pool.submit(cname_target, domain, timeout)
        txt_error = cname_error = None
        found_txt: list[str] = []
        found_cname: str | None = None
        try:
            found_txt = txt_future.result()
        except DnsLookupError as exc:
            txt_error = str(exc)
        try:
            found_cname = cname_future.result()
        except DnsLookupError as exc:
            cname_error = str(exc)
    return DomainCheck(
        domain=domain,
        txt_name=txt_name,
        expected_txt=expected,
        target_cname=target,
        txt_ok=any(value.strip().lower() == expected.lower() for value in found_txt),
        cname_ok=found_cname is not None and found_cname == target,
        found_txt=found_txt,
        found_cname=found_cname,
        txt_error=txt_error,
        cname_error=cname_error,
    )
