"""The local data plane: a simulation of krane for one machine and for tests, not for production.

What it guarantees (SPEC §4, "The data plane contract"): every topology that should run
(``starting``/``started``) in a region it serves gets one ``running`` instance per desired
replica, ``UNKEY_DATAPLANE_START_SECONDS`` after the simulation first saw it (0: on the pass
that sees it); the instances of ``stopping``/``stopped`` topologies are gone on the next pass;
sentinels of ``unknown`` health become ``healthy``. It serves ``UNKEY_AVAILABLE_REGIONS``, the
regions deploys write topologies for, and nothing else.

How: a pass every ``poll_seconds`` (0.2 s) runs the SQL of ``tasks.db.dataplane`` in a thread
(the worker's loop never blocks on the database). First-seen times live in memory only: after a
restart a topology waits its delay again, which a simulation may do.

Failure: a pass that fails (database down, tables missing) is logged and tried again with a
backoff doubling up to 5 s; the loop only ends when its ``stop`` event is set or its task is
cancelled.

``ctrl-worker dataplane`` runs it in the foreground (``run_local_dataplane``);
``UNKEY_DATAPLANE=local`` makes ``ctrl-worker run`` start it in-process
(``start_local_dataplane``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tasks.db.dataplane import (
    mark_sentinels_healthy,
    remove_stopped_instances,
    report_instances,
    topologies_needing_instances,
)
from tasks.db.engine import transaction
from worker.settings import Settings

__all__ = ["LocalDataPlane", "PassReport", "run_local_dataplane", "start_local_dataplane"]

log = logging.getLogger("ctrl.dataplane")

POLL_SECONDS = 0.2
MAX_BACKOFF_SECONDS = 5.0


@dataclass
class PassReport:
    """What one pass of the simulation did."""

    reported: list[tuple[str, str]] = field(default_factory=list)  # (deployment id, region)
    waiting: int = 0  # topologies seen, their start delay not over yet
    removed_instances: int = 0
    healthy_sentinels: int = 0


class LocalDataPlane:
    """The simulation: reports instances of desired topologies in ``regions`` of ``url``.

    Args:
        url: the control-plane database (a secret: never logged).
        regions: the regions it serves.
        start_seconds: how long after a topology is first seen its instances are reported.
        poll_seconds: the pause between passes.
    """

    def __init__(
        self,
        url: str,
        regions: Sequence[str],
        start_seconds: float,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self.url = url
        self.regions = list(regions)
        self.start_seconds = start_seconds
        self.poll_seconds = poll_seconds
        self._first_seen: dict[tuple[str, str], float] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalDataPlane:
        """The simulation of ``settings``' database, regions and start delay.

        Args:
            settings: the worker's configuration.

        Returns:
            A simulation that is not running yet.
        """
        return cls(
            settings.database_url(),
            settings.available_regions,
            settings.dataplane_start_seconds,
        )

    def describe(self) -> str:
        """The line that says what this is (logged when it starts)."""
        return (
            "local data plane (simulation): instances are reported running "
            f"{self.start_seconds:g}s after a topology is written; not for production "
            f"(regions: {', '.join(self.regions)})"
        )

    def run_pass(self, now: float | None = None) -> PassReport:
        """One pass: report due instances, remove stopped ones, mark sentinels healthy.

        Blocking (database calls): the loop runs it in a thread.

        Args:
            now: the monotonic time of the pass (tests pass their own; default: now).

        Returns:
            What the pass did.

        Raises:
            sqlalchemy.exc.SQLAlchemyError: the database failed; the next pass tries again.
        """
        at = time.monotonic() if now is None else now
        report = PassReport()
        with transaction(self.url) as connection:
            pending = topologies_needing_instances(connection, self.regions)
        seen = {topology.key for topology in pending}
        # Forget what no longer waits: a topology stopped and started again waits again.
        for key in set(self._first_seen) - seen:
            del self._first_seen[key]
        for topology in pending:
            first_seen = self._first_seen.setdefault(topology.key, at)
            if at - first_seen < self.start_seconds:
                report.waiting += 1
                continue
            with transaction(self.url) as connection:
                names = report_instances(connection, topology)
            self._first_seen.pop(topology.key, None)
            report.reported.append(topology.key)
            log.info(
                "reported %d instance(s) running for deployment %s in %s",
                len(names),
                topology.deployment_id,
                topology.region,
            )
        with transaction(self.url) as connection:
            report.removed_instances = remove_stopped_instances(connection, self.regions)
            report.healthy_sentinels = mark_sentinels_healthy(connection, self.regions)
        if report.removed_instances:
            log.info("removed %d instance(s) of stopped topologies", report.removed_instances)
        if report.healthy_sentinels:
            log.info("reported %d sentinel(s) healthy", report.healthy_sentinels)
        return report

    async def run(self, stop: asyncio.Event) -> None:
        """Pass every ``poll_seconds`` until ``stop`` is set; a failed pass is retried.

        Args:
            stop: set it to end the loop (the pass in flight finishes first).
        """
        log.warning(self.describe())
        failures = 0
        while not stop.is_set():
            pause = self.poll_seconds
            try:
                await asyncio.to_thread(self.run_pass)
                failures = 0
            except Exception as exc:
                failures += 1
                pause = min(MAX_BACKOFF_SECONDS, self.poll_seconds * 2**failures)
                # The error's first line only: never the URL, and no page of SQL per pass.
                first_line = (str(exc).splitlines() or [""])[0]
                log.warning(
                    "local data plane pass failed (%s: %s); retrying in %.1f s",
                    type(exc).__name__,
                    first_line,
                    pause,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=pause)


def start_local_dataplane(
    settings: Settings, stop: asyncio.Event | None = None
) -> asyncio.Task[None]:
    """Start the simulation as a task of the running loop (``UNKEY_DATAPLANE=local``).

    Args:
        settings: the worker's configuration.
        stop: ends the loop when set; without one, cancel the task to stop it.

    Returns:
        The running task (named ``local-dataplane``).
    """
    dataplane = LocalDataPlane.from_settings(settings)
    return asyncio.create_task(dataplane.run(stop or asyncio.Event()), name="local-dataplane")


def run_local_dataplane(settings: Settings) -> None:
    """Run the simulation in the foreground until SIGTERM or SIGINT (``ctrl-worker dataplane``).

    Args:
        settings: the worker's configuration.
    """
    logging.basicConfig(
        level=os.environ.get("UNKEY_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await LocalDataPlane.from_settings(settings).run(stop)

    asyncio.run(serve())
