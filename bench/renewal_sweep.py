"""renewal_sweep: the certificate renewal sweep over N due certificates, in issuance units.

ours: ``renew_expiring_certificates`` through the Prefect API to the real worker
(``bench.worker_main``, warm dispatch, ``UNKEY_CERT_RENEWAL_CONCURRENCY=10``) over N
``verified`` domains whose stored certificate expires in 5 days (due by the lifetime rule):
the sweep selects them and runs one ``process_challenge`` call per domain against a real
pebble (HTTP-01 through ``ctrl-worker acme-responder``), 10 at a time; wall time trigger ->
sweep result.
ref: one ``process_challenge`` issuance the same way, same worker, same run (p50 of 3),
times N / 10: what the sweep would take if it were exactly 10 issuances in parallel.
ratio = ours / ref (target <= 1.3, goal <= 1.1).

    python -m bench.renewal_sweep [N=200]
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.common import (
    BenchEnv,
    CpuSampler,
    bench_env,
    describe,
    load_average,
    median,
    print_result,
    quiet_prefect_console,
    served_worker,
    size_arg,
)

CONCURRENCY = 10
REFERENCE_ISSUANCES = 3


def _expiring_chain(domain: str) -> str:
    """A certificate of ``domain`` issued 85 days ago for 90 days: due (5 days left)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)])
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=85)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=90))
        .sign(key, hashes.SHA256())
    )
    return leaf.public_bytes(serialization.Encoding.PEM).decode()


def _seed(url: str, domains: list[str], *, with_certificate: bool) -> str:
    """Custom domains (one workspace) with a challenge each: ``verified`` with an expiring
    certificate, or ``waiting``; returns the workspace id."""
    from tasks.db.engine import engine_for
    from tasks.db.schema import certificates
    from tests.support.certificate_seed import insert_domain
    from worker.kernel.clock import new_id, now_ms

    workspace = new_id("ws")
    at = now_ms()
    with engine_for(url).begin() as connection:
        for domain in domains:
            insert_domain(
                connection,
                domain,
                workspace_id=workspace,
                status="verified" if with_certificate else "waiting",
                expires_at=at,
            )
            if with_certificate:
                connection.execute(
                    sa.insert(certificates).values(
                        id=new_id("cert"),
                        workspace_id=workspace,
                        hostname=domain,
                        certificate=_expiring_chain(domain),
                        encrypted_private_key="bench",
                        created_at=at,
                    )
                )
    return workspace


@contextlib.contextmanager
def _acme(env: BenchEnv) -> Iterator[tuple[Any, Any]]:
    """challtestsrv, pebble and the HTTP-01 responder, stopped at the end."""
    from tests.support.acme_servers import start_acme_responder, start_challtestsrv, start_pebble
    from worker.local_server import free_port

    root = Path(env.state_dir) / "acme"
    dns = start_challtestsrv(root / "challtestsrv")
    pebble = responder = None
    try:
        pebble = start_pebble(root / "pebble", dns, free_port())
        responder = start_acme_responder(root / "responder", env.database_url, pebble.http01_port)
        yield pebble, responder
    finally:
        if responder is not None:
            responder.stop(timeout=10)
        if pebble is not None:
            pebble.stop()
        dns.stop()


async def _measure(
    env: BenchEnv, reference_domains: list[str], workspace: str, sampler: CpuSampler
) -> tuple[list[float], float, Any, list[dict[str, float]]]:
    """The reference issuances, then the sweep; wall times and CPU totals after each phase."""
    from worker import client

    singles = []
    for domain in reference_domains:
        started = time.perf_counter()
        await client.process_challenge(workspace, domain, wait=True)
        singles.append(time.perf_counter() - started)
    cpu = [sampler.totals()]
    started = time.perf_counter()
    result = await client.renew_expiring_certificates(wait=True)
    sweep = time.perf_counter() - started
    cpu.append(sampler.totals())
    return singles, sweep, result, cpu


def _cpu_per_issuance(before: dict[str, float], after: dict[str, float], count: int) -> str:
    parts = {name: (after[name] - before.get(name, 0.0)) / count for name in after}
    total = sum(parts.values())
    detail = ", ".join(f"{name} {value:.2f}" for name, value in parts.items())
    return f"{total:.2f} CPU s ({detail})"


def _renewed(url: str, domains: list[str]) -> int:
    from tasks.db.engine import engine_for
    from tasks.db.schema import certificates

    with engine_for(url).connect() as connection:
        return int(
            connection.execute(
                sa.select(sa.func.count())
                .select_from(certificates)
                .where(
                    certificates.c.hostname.in_(domains),
                    certificates.c.encrypted_private_key != "bench",
                )
            ).scalar_one()
        )


def main() -> int:
    """Run the benchmark; returns the exit code."""
    size = size_arg(200)
    print(f"# renewal_sweep N={size} concurrency={CONCURRENCY}, {load_average()}", flush=True)
    with bench_env() as env, _acme(env) as (pebble, _responder):
        quiet_prefect_console()  # inside: Prefect must first see the bench server's URL
        from worker.kernel.clock import new_dns_label

        due = [f"due-{i}-{new_dns_label(8)}.bench.test" for i in range(size)]
        singles = [f"one-{i}-{new_dns_label(8)}.bench.test" for i in range(REFERENCE_ISSUANCES)]
        _seed(env.database_url, due, with_certificate=True)
        workspace = _seed(env.database_url, singles, with_certificate=False)
        extra = {
            "UNKEY_ACME_ENABLED": "true",
            "UNKEY_ACME_DIRECTORY_URL": pebble.directory_url,
            "UNKEY_ACME_CA_BUNDLE": str(pebble.ca_bundle),
            "UNKEY_ACME_EMAIL_DOMAIN": "bench.test",
            "UNKEY_CERT_RENEWAL_CONCURRENCY": str(CONCURRENCY),
            "UNKEY_WORKER_LIMIT": str(CONCURRENCY + 2),
        }
        with served_worker(env, 120.0, **extra) as served:
            groups: dict[str, Sequence[int]] = {
                "worker": [served.process.pid],
                "prefect": [env.server.pid, int(getattr(env.server, "postgres_pid", 0) or 0)],
                "pebble": [pebble.process.pid],
            }
            with CpuSampler(groups) as sampler:
                # The reference issuances first: the account is created by the first of them,
                # and their challenges are `verified` (not due) when the sweep selects.
                singles_s, sweep_s, result, cpu = asyncio.run(
                    _measure(env, singles, workspace, sampler)
                )
        renewed = _renewed(env.database_url, due)
    zero = dict.fromkeys(cpu[0], 0.0)
    print(f"# CPU per reference issuance: {_cpu_per_issuance(zero, cpu[0], len(singles))}")
    print(f"# CPU per swept issuance: {_cpu_per_issuance(cpu[0], cpu[1], size)}")
    ref = median(singles_s) * size / CONCURRENCY
    print("# " + describe("one issuance (process_challenge) trigger -> result", singles_s, "s", 1))
    print(
        f"# sweep: {sweep_s:.1f} s wall, {renewed}/{size} renewed, "
        f"renewals_triggered={result['renewals_triggered']}, "
        f"failed={len(result['failed_domains'])}, {load_average()}",
        flush=True,
    )
    print_result(
        "renewal_sweep",
        sweep_s / ref,
        f"{sweep_s:.1f}",
        f"{ref:.1f}",
        f"s wall, sweep of {size} / ({size}/{CONCURRENCY} x one issuance p50)",
    )
    return 0 if renewed == size else 1


if __name__ == "__main__":
    raise SystemExit(main())
