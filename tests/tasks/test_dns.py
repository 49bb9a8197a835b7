"""The DNS lookups and the custom-domain check, against a real DNS server (pebble-challtestsrv).

challtestsrv answers every name itself: a name without records gets an empty NOERROR answer
(NoAnswer), never NXDOMAIN, so the NXDOMAIN branch is not reached by these tests (it is handled
exactly as NoAnswer, by the same ``except``). SERVFAIL is real (its ``/set-servfail``).
"""

from __future__ import annotations

import socketserver
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import httpx
import pytest

from tasks import dns as dns_tasks
from tasks import dns_propagation
from tasks.dns import DnsLookupError
from tasks.dns_propagation import PropagationTimeoutError
from tests.support.acme_servers import Challtestsrv
from tests.support.settings import installed_settings
from tests.support.waits import wait_for
from worker.local_server import free_port
from worker.settings import Settings


@pytest.fixture
def dns_on_challtestsrv(challtestsrv: Challtestsrv) -> Iterator[Challtestsrv]:
    """This process's ``UNKEY_DNS_NAMESERVERS`` is the session's challtestsrv."""
    settings = Settings(_env_file=None, dns_nameservers=[challtestsrv.dns_address])
    with installed_settings(settings):
        yield challtestsrv


@pytest.fixture
def domain(dns_on_challtestsrv: Challtestsrv) -> Iterator[str]:
    """A fresh domain name of this test; its records are removed afterwards."""
    name = f"d{uuid.uuid4().hex[:12]}.example.test"
    yield name
    dns_on_challtestsrv.clear_txt(f"_unkey.{name}")
    dns_on_challtestsrv.clear_cname(name)


def test_txt_values_returns_every_value_of_the_name(
    dns_on_challtestsrv: Challtestsrv, domain: str
) -> None:
    """Every TXT value of a name is returned, and a name without TXT gives an empty list."""
    dns_on_challtestsrv.add_txt(f"_unkey.{domain}", "one")
    dns_on_challtestsrv.add_txt(f"_unkey.{domain}", "two")
    assert sorted(dns_tasks.txt_values(f"_unkey.{domain}")) == ["one", "two"]
    assert dns_tasks.txt_values(f"_other.{domain}") == []


def test_cname_target_is_lowercased_without_the_trailing_dot(
    dns_on_challtestsrv: Challtestsrv, domain: str
) -> None:
    """A CNAME target comes back lowercased without the dot; no CNAME gives None."""
    dns_on_challtestsrv.add_cname(domain, "Abc.CNAME.Example.")
    assert dns_tasks.cname_target(domain) == "abc.cname.example"
    assert dns_tasks.cname_target(f"none.{domain}") is None


def test_verify_ownership_passes_with_the_txt_proof_and_the_cname(
    dns_on_challtestsrv: Challtestsrv, domain: str
) -> None:
    """TXT _unkey.<domain> holding the token (any case, among other values) and the CNAME to
    the target verify the domain, with no message."""
    dns_on_challtestsrv.add_txt(f"_unkey.{domain}", "something-else")
    dns_on_challtestsrv.add_txt(f"_unkey.{domain}", "UNKEY-DOMAIN-VERIFY=TokenABC")
    dns_on_challtestsrv.add_cname(domain, "t1.cname.example")
    check = dns_tasks.verify_ownership(domain, "tokenabc", "T1.cname.example.")
    assert check.txt_ok and check.cname_ok and check.verified
    assert check.found_cname == "t1.cname.example"
    assert check.missing_message() == ""


def test_verify_ownership_names_both_missing_records(domain: str) -> None:
    """With neither record, both checks fail and the message names TXT and CNAME and says
    nothing was found."""
    check = dns_tasks.verify_ownership(domain, "tok", "t2.cname.example")
    assert not check.txt_ok and not check.cname_ok
    assert check.found_txt == [] and check.found_cname is None
    message = check.missing_message()
    assert message.startswith("missing TXT and CNAME: ")
    assert f"TXT _unkey.{domain} must contain 'unkey-domain-verify=tok' (found no TXT record)" in (
        message
    )
    assert f"CNAME {domain} must point to 't2.cname.example' (found no CNAME record)" in message


def test_verify_ownership_reports_a_wrong_txt_and_a_wrong_cname(
    dns_on_challtestsrv: Challtestsrv, domain: str
) -> None:
    """A wrong token and a CNAME elsewhere both fail, and the message quotes what was found."""
    dns_on_challtestsrv.add_txt(f"_unkey.{domain}", "unkey-domain-verify=old")
    dns_on_challtestsrv.add_cname(domain, "elsewhere.example")
    check = dns_tasks.verify_ownership(domain, "new", "t3.cname.example")
    assert not check.txt_ok and not check.cname_ok
    assert check.found_txt == ["unkey-domain-verify=old"]
    message = check.missing_message()
    assert "(found 'unkey-domain-verify=old')" in message
    assert "(found 'elsewhere.example')" in message


def test_verify_ownership_names_only_the_missing_cname(
    dns_on_challtestsrv: Challtestsrv, domain: str
) -> None:
    """With the TXT proof but no CNAME, only the CNAME is named as missing."""
    dns_on_challtestsrv.add_txt(f"_unkey.{domain}", "unkey-domain-verify=tok")
    check = dns_tasks.verify_ownership(domain, "tok", "t4.cname.example")
    assert check.txt_ok and not check.cname_ok
    assert check.missing_message().startswith(f"missing CNAME: CNAME {domain} must point to")


def test_servfail_is_a_retryable_lookup_error(
    dns_on_challtestsrv: Challtestsrv, domain: str
) -> None:
    """A SERVFAIL raises DnsLookupError (retryable) from a lookup, and verify_ownership counts
    it as not found and says the lookup failed."""
    host = f"_unkey.{domain}."
    httpx.post(f"{dns_on_challtestsrv.management_url}/set-servfail", json={"host": host})
    try:
        with pytest.raises(DnsLookupError, match="no server answered"):
            dns_tasks.txt_values(host, timeout=3)
        check = dns_tasks.verify_ownership(domain, "tok", "t5.cname.example", timeout=3)
        assert not check.txt_ok
        assert "lookup failed" in check.missing_message()
    finally:
        httpx.post(f"{dns_on_challtestsrv.management_url}/clear-servfail", json={"host": host})


def test_a_silent_server_is_a_retryable_lookup_error() -> None:
    """A configured server that does not answer raises DnsLookupError within the timeout."""
    silent = Settings(_env_file=None, dns_nameservers=[f"127.0.0.1:{free_port()}"])
    with installed_settings(silent), pytest.raises(DnsLookupError):
        dns_tasks.txt_values("x.example.test", timeout=1)


def test_propagation_wait_returns_once_every_server_has_the_value(
    dns_on_challtestsrv: Challtestsrv, domain: str
) -> None:
    """With UNKEY_DNS_NAMESERVERS set, those servers are the ones asked directly, and the wait
    returns once they hold the value."""
    fqdn = f"_unkey.{domain}"
    dns_on_challtestsrv.add_txt(fqdn, "other")
    dns_on_challtestsrv.add_txt(fqdn, "challenge-value")
    checked = dns_propagation.wait_for_txt_propagation(
        fqdn, "challenge-value", timeout=5, interval=0.1
    )
    assert checked == [(dns_on_challtestsrv.dns_host, dns_on_challtestsrv.dns_port)]


def test_propagation_wait_returns_once_the_value_is_published(
    dns_on_challtestsrv: Challtestsrv, domain: str
) -> None:
    """A wait that starts before the value is published keeps asking and returns once the
    server answers it (the value is added after the server was seen asked at least once)."""
    fqdn = f"_unkey.{domain}"
    with ThreadPoolExecutor(max_workers=1) as pool:
        waiting = pool.submit(
            dns_propagation.wait_for_txt_propagation, fqdn, "late-value", timeout=20, interval=0.1
        )
        wait_for(lambda: _asked(dns_on_challtestsrv, fqdn), timeout=10, what="a first query")
        assert not waiting.done()
        dns_on_challtestsrv.add_txt(fqdn, "late-value")
        assert waiting.result(timeout=20) == [
            (dns_on_challtestsrv.dns_host, dns_on_challtestsrv.dns_port)
        ]


def _asked(server: Challtestsrv, fqdn: str) -> bool:
    history = httpx.post(
        # The history is keyed by the name without its trailing dot (unlike the records).
        f"{server.management_url}/dns-request-history",
        json={"host": fqdn},
        timeout=5,
    )
    return bool(history.json())


def test_propagation_wait_times_out_without_the_value(
    dns_on_challtestsrv: Challtestsrv, domain: str
) -> None:
    """Without the value the wait gives up after its timeout, naming the server and what it
    answered."""
    fqdn = f"_unkey.{domain}"
    dns_on_challtestsrv.add_txt(fqdn, "stale")
    with pytest.raises(PropagationTimeoutError, match=r"missing on 127\.0\.0\.1:\d+ \(1 other"):
        dns_propagation.wait_for_txt_propagation(fqdn, "fresh", timeout=0.5, interval=0.1)


def test_nameservers_setting_is_comma_separated_and_each_entry_is_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """UNKEY_DNS_NAMESERVERS takes comma-separated host[:port] entries; a bad entry is a
    problem naming the variable and the entry, and every bad entry is reported."""
    from worker.settings import collect_problems

    monkeypatch.setenv("UNKEY_DNS_NAMESERVERS", "127.0.0.1:8053, [::1]:53,ns1.example.net")
    settings, problems = collect_problems(_env_file=None)
    assert problems == []
    assert settings is not None
    assert settings.dns_nameservers == ["127.0.0.1:8053", "[::1]:53", "ns1.example.net"]
    monkeypatch.setenv("UNKEY_DNS_NAMESERVERS", "127.0.0.1:0,bad host,[::1")
    _, problems = collect_problems(_env_file=None)
    assert problems == [
        "UNKEY_DNS_NAMESERVERS: '127.0.0.1:0' has a port that is not 1-65535",
        "UNKEY_DNS_NAMESERVERS: 'bad host' must be host, host:port or [ipv6]:port",
        "UNKEY_DNS_NAMESERVERS: '[::1' must be host, host:port or [ipv6]:port",
    ]


class _ZoneServer(socketserver.BaseRequestHandler):
    """A real authoritative DNS server (UDP) for one zone: SOA and NS at the apex, the NS
    host's A record, an empty NOERROR with the SOA in the authority section for every other
    name inside, REFUSED outside (what a real authoritative server answers)."""

    zone = dns.name.from_text("zone-under-test.example.")
    ns_host = dns.name.from_text("ns1.zone-under-test.example.")

    def handle(self) -> None:
        data, sock = self.request
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        soa = dns.rrset.from_text(
            self.zone, 60, "IN", "SOA", f"{self.ns_host} host.{self.zone} 1 60 60 60 60"
        )
        if not question.name.is_subdomain(self.zone):
            response.set_rcode(dns.rcode.REFUSED)
        elif question.name == self.zone and question.rdtype == dns.rdatatype.SOA:
            response.answer.append(soa)
        elif question.name == self.zone and question.rdtype == dns.rdatatype.NS:
            response.answer.append(
                dns.rrset.from_text(self.zone, 60, "IN", "NS", self.ns_host.to_text())
            )
        elif question.name == self.ns_host and question.rdtype == dns.rdatatype.A:
            response.answer.append(dns.rrset.from_text(self.ns_host, 60, "IN", "A", "127.0.0.9"))
        else:
            response.authority.append(soa)
        sock.sendto(response.to_wire(), self.client_address)


def test_authoritative_servers_are_found_by_walking_up_to_the_zone() -> None:
    """Without configured authoritative servers, the zone of a challenge name is found by SOA
    queries walking up from the name, and its NS hosts' addresses are the servers checked."""
    with socketserver.UDPServer(("127.0.0.1", 0), _ZoneServer) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            port = server.server_address[1]
            settings = Settings(_env_file=None, dns_nameservers=[f"127.0.0.1:{port}"])
            with installed_settings(settings):
                found = dns_propagation.authoritative_servers(
                    "_acme-challenge.a.zone-under-test.example", timeout=3
                )
        finally:
            server.shutdown()
    assert found == [("127.0.0.9", 53)]
