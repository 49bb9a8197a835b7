"""deploy_latency: trigger -> ``ready`` for a 2-region image deploy, in "service-call units".

ours: ``deploy`` of a fresh pending deployment (its own workspace, project and production
environment in two regions) through the Prefect API to the real worker (``bench.worker_main``,
warm dispatch), with the local data plane in the worker reporting instances at once
(``UNKEY_DATAPLANE=local``, start delay 0, instance poll 50 ms); sequential, p50 of N.
ref: one ``next_version`` call the same way, same worker, same run (p50 of N).
ratio = deploy p50 / next_version p50: what a deploy costs in single service calls.

    python -m bench.deploy_latency [N=10]
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from bench.common import (
    bench_env,
    describe,
    load_average,
    median,
    print_result,
    quiet_prefect_console,
    served_worker,
    size_arg,
)

REGIONS = ("bench-a.test", "bench-b.test")


async def _timed(call: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await call()
    return time.perf_counter() - started


def main() -> int:
    """Run the benchmark; returns the exit code."""
    size = size_arg(10)
    print(f"# deploy_latency N={size}, load {load_average()}", flush=True)
    with bench_env() as env:
        quiet_prefect_console()  # inside: Prefect must first see the bench server's URL
        from tasks.db.engine import engine_for
        from tasks.db.schema import environment_runtime_settings
        from tests.support.deploy_seed import cleanup_deploy, seed_deploy
        from worker import client

        seeds = [seed_deploy(env.database_url, regions=0) for _ in range(size + 1)]
        for seed in seeds:  # the same two regions for every deploy (what the worker serves)
            with engine_for(env.database_url).begin() as connection:
                connection.execute(
                    environment_runtime_settings.update()
                    .where(environment_runtime_settings.c.environment_id == seed.environment_id)
                    .values(region_config={region: 1 for region in REGIONS})
                )
        extra = {
            "UNKEY_DATAPLANE": "local",
            "UNKEY_DATAPLANE_START_SECONDS": "0",
            "UNKEY_AVAILABLE_REGIONS": ",".join(REGIONS),
            "UNKEY_DEPLOY_POLL_SECONDS": "0.05",
        }
        try:
            with served_worker(env, 120.0, **extra):

                async def measure() -> tuple[list[float], list[float]]:
                    await client.deploy(seeds[0].deployment_id, docker_image="nginx", wait=True)
                    await client.next_version(f"warm-{uuid.uuid4().hex[:6]}", wait=True)
                    deploys, calls = [], []
                    for seed in seeds[1:]:
                        deploy = functools.partial(
                            client.deploy, seed.deployment_id, docker_image="nginx:1.27", wait=True
                        )
                        deploys.append(await _timed(deploy))
                        calls.append(
                            await _timed(
                                lambda: client.next_version(
                                    f"bench-{uuid.uuid4().hex[:8]}", wait=True
                                )
                            )
                        )
                    return deploys, calls

                deploys, calls = asyncio.run(measure())
        finally:
            for seed in seeds:
                cleanup_deploy(seed)
    print("# " + describe("deploy (2 regions) trigger -> ready", deploys, "s", 1.0))
    print("# " + describe("next_version trigger -> result", calls, "s", 1.0))
    print_result(
        "deploy_latency",
        median(deploys) / median(calls),
        f"{median(deploys):.3f}",
        f"{median(calls):.3f}",
        "s p50, deploy / next_version",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
