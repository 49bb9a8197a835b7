"""The DNS-01 propagation check: a TXT value is answered by every server that matters.

``wait_for_txt_propagation`` returns only once **every** server it checks answers the TXT
value itself (queried directly, recursion off, not through a recursive resolver's cache): the
zone's authoritative nameservers, or the configured nameservers when ``UNKEY_DNS_NAMESERVERS``
is set (they are then taken as authoritative: a test DNS server such as pebble-challtestsrv
answers every name itself, and an operator who sets them names the servers the CA will ask).

Error handling: a value that does not reach every server in time raises
``PropagationTimeoutError`` (retryable), naming the servers that lacked it and what they said.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver

from tasks.dns import (
    LOOKUP_TIMEOUT,
    DnsLookupError,
    Nameserver,
    configured_nameservers,
    lookup,
    make_resolver,
    txt_text,
)
from worker.kernel.errors import RetryableError

__all__ = [
    "PropagationTimeoutError",
    "authoritative_servers",
    "propagation_servers",
    "wait_for_txt_propagation",
]


class PropagationTimeoutError(RetryableError):
    """A TXT value did not reach every checked server in time."""


def authoritative_servers(fqdn: str, timeout: float = LOOKUP_TIMEOUT) -> list[Nameserver]:
    """The authoritative nameservers of the zone holding ``fqdn``, on port 53.

    The zone is found by walking up from ``fqdn`` with SOA queries through the configured
    resolver; its NS names and their A/AAAA addresses come from the same resolver.

    Args:
        fqdn: a name inside the zone.
        timeout: seconds for each lookup.

    Returns:
        ``(ip, 53)`` of every NS of the zone: its IPv4 addresses, or its IPv6 ones when it
        has no IPv4 address.

    Raises:
        DnsLookupError: the zone, its NS records or their addresses could not be found.
    """
    resolver = make_resolver(timeout)
    try:
        zone = dns.resolver.zone_for_name(fqdn, resolver=resolver, lifetime=timeout)
    except dns.exception.DNSException as exc:
        raise DnsLookupError(f"zone of '{fqdn}' not found: {type(exc).__name__}") from None
    answer = lookup(zone.to_text(), "NS", timeout)
    hosts = [getattr(rdata, "target").to_text() for rdata in answer or ()]  # noqa: B009
    servers: list[Nameserver] = []
    for host in hosts:
        # One address family per server: IPv4 when it has one (a host without IPv6 routes
        # would otherwise wait forever on the server's AAAA address), else IPv6.
        answer = lookup(host, "A", timeout) or lookup(host, "AAAA", timeout)
        servers.extend((rdata.to_text(), 53) for rdata in answer or ())
    if not servers:
        raise DnsLookupError(f"no nameserver address found for zone '{zone.to_text()}'")
    return servers


def propagation_servers(fqdn: str, timeout: float = LOOKUP_TIMEOUT) -> list[Nameserver]:
    """The servers a propagation check asks: the configured ones, else the zone's own.

    Args:
        fqdn: the challenge record's name.
        timeout: seconds for each discovery lookup.

    Returns:
        ``UNKEY_DNS_NAMESERVERS`` when set (taken as authoritative), else
        ``authoritative_servers(fqdn)``.

    Raises:
        DnsLookupError: discovery failed.
    """
    return configured_nameservers() or authoritative_servers(fqdn, timeout)


def _values_at(server: Nameserver, fqdn: str, timeout: float) -> list[str] | str:
    """The TXT values ``server`` itself answers for ``fqdn``, or why it gave none."""
    query = dns.message.make_query(fqdn, "TXT")
    query.flags &= ~dns.flags.RD  # its own data, not what it could fetch elsewhere
    ip, port = server
    try:
        response, _ = dns.query.udp_with_fallback(query, ip, timeout=timeout, port=port)
    except (dns.exception.DNSException, OSError) as exc:
        return f"no answer ({type(exc).__name__})"
    rcode = response.rcode()
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        return f"answered {dns.rcode.to_text(rcode)}"
    name = dns.name.from_text(fqdn)
    return [
        txt_text(rdata)
        for rrset in response.answer
        if rrset.name == name and rrset.rdtype == dns.rdatatype.TXT
        for rdata in rrset
    ]


def wait_for_txt_propagation(
    fqdn: str,
    value: str,
    *,
    timeout: float = 300.0,
    interval: float = 2.0,
    servers: Sequence[Nameserver] | None = None,
) -> list[Nameserver]:
    """Wait until every checked server answers ``value`` among the TXT values of ``fqdn``.

    Each server is asked directly (recursion not desired), so a value is seen only where it is
    published, never from a resolver's cache. A short in-place poll (lego's default is 5 min):
    the caller's step is retried on timeout.

    Args:
        fqdn: the TXT record's name (``_acme-challenge.example.com``).
        value: the value that must be present (exact match).
        timeout: seconds to wait for all servers.
        interval: seconds between rounds.
        servers: the servers to check; None = ``propagation_servers(fqdn)``.

    Returns:
        The servers that were checked.

    Raises:
        PropagationTimeoutError: some server still lacked the value after ``timeout`` (the
            message names them and what they answered).
        DnsLookupError: the servers could not be found.
    """
    checked = list(servers) if servers is not None else propagation_servers(fqdn)
    if not checked:
        raise DnsLookupError(f"no server to check the propagation of '{fqdn}' on")
    deadline = time.monotonic() + timeout
    pending = list(checked)
    last: dict[Nameserver, list[str] | str] = {}
    while True:
        for server in list(pending):
            answer = _values_at(server, fqdn, timeout=min(LOOKUP_TIMEOUT, max(timeout, 0.5)))
            last[server] = answer
            if isinstance(answer, list) and value in answer:
                pending.remove(server)
        if not pending:
            return checked
        if time.monotonic() + interval > deadline:
            break
        time.sleep(interval)
    lacking = ", ".join(f"{ip}:{port} ({_describe(last.get((ip, port)))})" for ip, port in pending)
    raise PropagationTimeoutError(
        f"TXT value for '{fqdn}' not on every authoritative server after {timeout:.0f} s: "
        f"missing on {lacking}"
    )


def _describe(answer: list[str] | str | None) -> str:
    if answer is None:
        return "not asked"
    if isinstance(answer, str):
        return answer
    return f"{len(answer)} other value(s)" if answer else "no TXT"
