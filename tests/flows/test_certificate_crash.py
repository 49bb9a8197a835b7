"""CertificateService under SIGKILL, through real worker subprocesses, real pebble (orders
counted in its log), the real ``ctrl-worker acme-responder`` and MariaDB.

Each test stops an HTTP-01 issuance at a known point from outside, SIGKILLs the worker and
the run's process there, and starts a new worker; the same run resumes and completes:

- after the order (and the answer), before finalization: pebble's validation fetch is held
  by a gate in front of the responder (``tests.support.challenge_gate``), so the call is in
  "wait for authorization"; the gate opens after the kill;
- after finalization, before the certificate is written: the test holds a lock on the
  hostname's slot in ``certificates`` (``SELECT ... FOR UPDATE`` of the absent row: a gap
  lock the INSERT waits on).

The responder and pebble are not the worker's processes: they survive the kills.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import sqlalchemy as sa
from cryptography import x509

from tasks.db.schema import certificates
from tests.support.acme_servers import Pebble, start_acme_responder
from tests.support.certificate_seed import (
    SeededDomain,
    certificate_rows,
    challenge_row,
    seeded_domain,
)
from tests.support.challenge_gate import ChallengeGate, challenge_gate
from tests.support.fixtures import PrefectApi
from tests.support.waits import flow_run, holding_row_lock, row_lock_waits, run_pid, wait_for
from tests.support.worker_process import WorkerProcess
from worker import client as worker_client
from worker.kernel.clock import new_dns_label
from worker.local_server import free_port

pytestmark = [pytest.mark.slow, pytest.mark.mysql]


def _orders_placed(pebble: Pebble) -> int:
    """How many orders pebble has created since it started (one log line each)."""
    return pebble.process.log_path.read_text().count("Added order ")


def _kill_worker_and_run(worker: WorkerProcess, state_dir: Path, run_id: UUID) -> None:
    """SIGKILL the worker's process group and the run's own process (a dead machine)."""
    pid = run_pid(state_dir, run_id)
    worker.kill()
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _holding_certificate_slot(url: str, hostname: str) -> Any:
    """Hold the lock an INSERT of ``hostname`` into ``certificates`` waits on, until the
    block ends (REPEATABLE READ: the absent row's gap on the unique hostname index)."""
    query = sa.select(certificates).where(certificates.c.hostname == hostname)
    return holding_row_lock(url, query, isolation_level="REPEATABLE READ")


@pytest.fixture
def domain(control_db: str) -> Iterator[SeededDomain]:
    """A fresh ``app-<random>.example.test`` with a ``waiting`` HTTP-01 challenge."""
    with seeded_domain(control_db, f"app-{new_dns_label(10)}.example.test") as seed:
        yield seed


@pytest.fixture
def gate(control_db: str, pebble: Pebble, tmp_path: Path) -> Iterator[ChallengeGate]:
    """A closed gate on pebble's HTTP-01 port, in front of a real responder on the DB."""
    port = free_port()
    responder = start_acme_responder(tmp_path / "responder", control_db, port)
    try:
        with challenge_gate(pebble.http01_port, port) as held:
            yield held
    finally:
        responder.stop(timeout=10)


BEFORE_FINALIZATION = "before finalization"
BEFORE_CERTIFICATE_WRITE = "before the certificate write"


def _issue_killed_at(
    stop: str,
    seed: SeededDomain,
    gate: ChallengeGate,
    pebble: Pebble,
    prefect_api: PrefectApi,
    worker_factory: Callable[..., WorkerProcess],
) -> UUID:
    """Start the call on a worker, let it reach ``stop``, SIGKILL the worker and the run."""
    at_write = stop == BEFORE_CERTIFICATE_WRITE
    if at_write:
        gate.open()  # validation goes through; the INSERT is what waits
    blocker = (
        _holding_certificate_slot(seed.url, seed.domain) if at_write else contextlib.nullcontext()
    )
    with blocker:
        first = worker_factory(**pebble.worker_env())
        run_id = UUID(
            str(asyncio.run(worker_client.process_challenge(seed.workspace_id, seed.domain)))
        )
        if at_write:
            wait_for(
                lambda: row_lock_waits(seed.url, "certificates") > 0, 90, "the certificate write"
            )
        else:
            gate.wait_until_held(90)
        _kill_worker_and_run(first, prefect_api.state_dir, run_id)
    gate.open()  # the CA may now validate, without the killed process
    return run_id


@pytest.mark.parametrize("stop", [BEFORE_FINALIZATION, BEFORE_CERTIFICATE_WRITE])
def test_issuance_killed_mid_way_resumes_to_one_certificate_and_one_order(
    stop: str,
    pebble: Pebble,
    prefect_api: PrefectApi,
    worker_factory: Callable[..., WorkerProcess],
    domain: SeededDomain,
    gate: ChallengeGate,
) -> None:
    """SIGKILL of the worker and the run's process during an HTTP-01 issuance (after the
    order, before finalization; after finalization, before the certificate write): once a new
    worker starts, the same run resumes (a second run of the same flow run) and completes
    with exactly one `certificates` row for the hostname, for exactly that name, the
    challenge `verified`, and no second ACME order (the finished `create order` step is
    replayed, well within "at most one extra order per kill")."""
    orders_before = _orders_placed(pebble)
    run_id = _issue_killed_at(stop, domain, gate, pebble, prefect_api, worker_factory)
    assert _orders_placed(pebble) == orders_before + 1
    assert certificate_rows(domain) == []

    worker_factory(**pebble.worker_env())
    result = asyncio.run(worker_client.wait_for_result(run_id, timeout=180))

    (row,) = certificate_rows(domain)
    assert result == {"certificate_id": row.id, "status": "success"}
    leaf = x509.load_pem_x509_certificates(row.certificate.encode())[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [domain.domain]
    challenge = challenge_row(domain)
    assert challenge.status == "verified"
    assert challenge.expires_at == int(leaf.not_valid_after_utc.timestamp() * 1000)
    assert _orders_placed(pebble) == orders_before + 1
    assert flow_run(run_id).run_count == 2
