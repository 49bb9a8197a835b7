"""Certificate metrics with cert-manager's names, one series per hostname, on ``/metrics``.

- ``certificate_expiration_timestamp_seconds{hostname}``: the stored leaf's NotAfter.
- ``certificate_renewal_timestamp_seconds{hostname}``: when it becomes due by the lifetime
  rule (a third of the lifetime left; ``tasks.acme.renewal``). At a CA offering ARI the sweep
  may renew earlier, inside the CA's window: that window is asked at sweep time, never at
  scrape time.
- ``certificate_ready_status{hostname, condition}``: 1 for the current condition, 0 for the
  other two, like cert-manager: ``True`` (challenge ``verified``, certificate not expired),
  ``False`` (challenge ``failed``, or the certificate expired), ``Unknown`` (anything else:
  an issuance under way).

Why a collector read at scrape time: flow runs are child processes (prometheus multiprocess
mode), and a gauge set by a run would be a per-process file that outlives the truth. The
collector runs in the worker process, reads ``certificates`` and ``acme_challenges`` on each
scrape (ids and ``updated_at`` only) and parses a leaf only when its certificate is new or
changed (cached by id and ``updated_at``). A failing database read yields no certificate
series for that scrape, never a failed scrape.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tasks.acme.renewal import Leaf, lifetime_renewal_at, parse_leaf
from tasks.db import renewals as renewal_db

__all__ = ["CONDITIONS", "CertificateCollector"]

log = logging.getLogger("ctrl.worker.metrics")

CONDITIONS = ("True", "False", "Unknown")


def _condition(state: renewal_db.CertificateState, leaf: Leaf, now: float) -> str:
    if leaf.not_after.timestamp() <= now or state.challenge_status == "failed":
        return "False"
    if state.challenge_status == "verified":
        return "True"
    return "Unknown"


class CertificateCollector(Collector):
    """Collects the certificate metrics from the control-plane DB at each scrape.

    Args:
        states: reads every certificate's id, hostname, version and challenge status.
        chains: reads the chain PEMs of the given certificate ids.
        clock: seconds since the epoch (the ready condition's "expired").
    """

    def __init__(
        self,
        states: Callable[[], list[renewal_db.CertificateState]] = renewal_db.certificate_states,
        chains: Callable[[Sequence[str]], dict[str, str]] = renewal_db.certificate_chains,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._states = states
        self._chains = chains
        self._clock = clock
        self._leaves: dict[str, tuple[int, Leaf | None]] = {}
        self._lock = threading.Lock()  # the HTTP server may scrape from two threads at once

    def _leaves_of(self, states: list[renewal_db.CertificateState]) -> dict[str, Leaf | None]:
        with self._lock:
            stale = [s.id for s in states if self._leaves.get(s.id, (None,))[0] != s.updated_at]
            chains = self._chains(stale) if stale else {}
            for state in states:
                if state.id not in stale:
                    continue
                try:
                    leaf: Leaf | None = parse_leaf(chains[state.id])
                except (KeyError, ValueError):
                    leaf = None  # deleted meanwhile, or not a PEM: no series for it
                self._leaves[state.id] = (state.updated_at, leaf)
            present = {s.id for s in states}
            for gone in [i for i in self._leaves if i not in present]:
                del self._leaves[gone]
            return {i: leaf for i, (_, leaf) in self._leaves.items()}

    def collect(self) -> Iterator[Metric]:
        """The three metric families (empty when the database cannot be read)."""
        expiration = GaugeMetricFamily(
            "certificate_expiration_timestamp_seconds",
            "The date after which the certificate expires (unix seconds)",
            labels=["hostname"],
        )
        renewal = GaugeMetricFamily(
            "certificate_renewal_timestamp_seconds",
            "The date after which the certificate is due for renewal (unix seconds)",
            labels=["hostname"],
        )
        ready = GaugeMetricFamily(
            "certificate_ready_status",
            "The ready status of the certificate (1 for the current condition)",
            labels=["hostname", "condition"],
        )
        try:
            states = self._states()
            leaves = self._leaves_of(states)
        except Exception as exc:  # a scrape must not fail because the DB is away
            log.warning("certificate metrics: could not read the certificates: %s", exc)
            states, leaves = [], {}
        now = self._clock()
        for state in states:
            leaf = leaves.get(state.id)
            if leaf is None:
                continue
            expiration.add_metric([state.hostname], leaf.not_after.timestamp())
            renewal.add_metric([state.hostname], lifetime_renewal_at(leaf).timestamp())
            current = _condition(state, leaf, now)
            for condition in CONDITIONS:
                ready.add_metric([state.hostname, condition], 1.0 if condition == current else 0.0)
        yield expiration
        yield renewal
        yield ready
