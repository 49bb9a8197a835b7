"""A test bridge from moto's Route53 to pebble-challtestsrv's DNS: moto answers Route53's API
but serves no DNS, and pebble (and the flow's propagation check, via
``UNKEY_DNS_NAMESERVERS``) resolve through challtestsrv.

``Route53Bridge`` is a thread that polls one hosted zone through Route53's API and mirrors
its ``_acme-challenge`` TXT record sets into challtestsrv (``/clear-txt`` then ``/set-txt``
per value when a set changes, ``/clear-txt`` when it goes). It records every name it
published and every name it cleared, so a test can assert a record left DNS because it left
Route53. On exit it clears whatever it still mirrors.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3

from tests.support.acme_servers import Challtestsrv

__all__ = ["Route53Bridge", "drop_hosted_zone", "route53_bridge"]

_POLL_SECONDS = 0.1
_CHUNK = re.compile(r'"((?:[^"\\]|\\.)*)"')


def drop_hosted_zone(client: Any, zone_id: str) -> None:
    """Delete a hosted zone and its record sets (Route53 refuses to delete a zone that has
    any besides its NS and SOA)."""
    records = client.list_resource_record_sets(HostedZoneId=zone_id)["ResourceRecordSets"]
    changes = [
        {"Action": "DELETE", "ResourceRecordSet": rrset}
        for rrset in records
        if rrset["Type"] not in ("NS", "SOA")
    ]
    if changes:
        client.change_resource_record_sets(HostedZoneId=zone_id, ChangeBatch={"Changes": changes})
    client.delete_hosted_zone(Id=zone_id)


def _text(value: str) -> str:
    """The text of a Route53 TXT value (``"a" "b"`` is ``ab``)."""
    return "".join(re.sub(r"\\(.)", r"\1", chunk) for chunk in _CHUNK.findall(value))


class Route53Bridge:
    """Mirror a hosted zone's ``_acme-challenge`` TXT record sets into challtestsrv.

    Args:
        client: a boto3 Route53 client on the server that holds the zone.
        zone_id: the hosted zone.
        dns: the challtestsrv to publish in.

    Attributes:
        published: every ``(name, value)`` it set in challtestsrv, in order.
        cleared: every name it cleared in challtestsrv after the name's record set changed
            or left Route53, in order.
    """

    def __init__(self, client: Any, zone_id: str, dns: Challtestsrv) -> None:
        self._client = client
        self._zone_id = zone_id
        self._dns = dns
        self._mirrored: dict[str, list[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="route53-bridge", daemon=True)
        self._failure: BaseException | None = None
        self.published: list[tuple[str, str]] = []
        self.cleared: list[str] = []

    def _records(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        pages = self._client.get_paginator("list_resource_record_sets")
        for page in pages.paginate(HostedZoneId=self._zone_id):
            for rrset in page["ResourceRecordSets"]:
                name = str(rrset["Name"]).rstrip(".").lower()
                if rrset["Type"] == "TXT" and name.startswith("_acme-challenge."):
                    found[name] = sorted(_text(r["Value"]) for r in rrset["ResourceRecords"])
        return found

    def sync(self) -> None:
        """Mirror the zone once (the thread does this every 0.1 s)."""
        wanted = self._records()
        for name in [n for n in self._mirrored if n not in wanted]:
            self._dns.clear_txt(name)
            del self._mirrored[name]
            self.cleared.append(name)
        for name, values in wanted.items():
            if self._mirrored.get(name) == values:
                continue
            if name in self._mirrored:
                self._dns.clear_txt(name)
                self.cleared.append(name)
            for value in values:
                self._dns.add_txt(name, value)
                self.published.append((name, value))
            self._mirrored[name] = values

    def mirrored(self) -> dict[str, list[str]]:
        """What it has published in challtestsrv right now, by name."""
        return {name: list(values) for name, values in self._mirrored.items()}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except BaseException as exc:  # reported by stop(), never lost in the thread
                self._failure = exc
                return
            self._stop.wait(_POLL_SECONDS)

    def start(self) -> Route53Bridge:
        """Start mirroring in the background."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop, after one last sync; clear what it still mirrors.

        Raises:
            BaseException: what made the thread stop early, if anything did.
        """
        self._stop.set()
        self._thread.join(timeout=10)
        if self._failure is None:
            self.sync()
        for name in list(self._mirrored):
            self._dns.clear_txt(name)
            del self._mirrored[name]
        if self._failure is not None:
            raise self._failure


@contextmanager
def route53_bridge(
    endpoint_url: str, zone_id: str, dns: Challtestsrv, key: str = "test", secret: str = "test"
) -> Iterator[Route53Bridge]:
    """A running ``Route53Bridge`` on the Route53 API at ``endpoint_url``; stopped after.

    Args:
        endpoint_url: the Route53 endpoint (a moto server).
        zone_id: the hosted zone to mirror.
        dns: the challtestsrv to publish in.
        key: the access key id the bridge reads with.
        secret: its secret.

    Yields:
        The bridge.
    """
    client = boto3.client(
        "route53",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
    )
    bridge = Route53Bridge(client, zone_id, dns).start()
    try:
        yield bridge
    finally:
        bridge.stop()
