"""parallel_keys: K concurrent calls on K different keys vs one call.

The real worker runs as a subprocess with ``UNKEY_WORKER_LIMIT=K`` (default 10 would queue
half of them). Each call is ``bench_hold_key``: take a per-key lock (``critical_section``),
hold it 1 s, release. ours: the wall time of K concurrent ``trigger(..., wait=True)`` on K
different keys; ref: the wall time of one such call (median of 3, in the same run).
ratio = wall(K) / wall(1), target <= 2.

Also printed: when each run was taken by the runner and when its process started the flow,
and how many keys were held at the same time at most (are they really parallel?).

    python -m bench.parallel_keys [K=20]
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any

from bench.common import (
    BenchEnv,
    bench_env,
    count_api_retries,
    describe,
    median,
    print_result,
    quiet_prefect_console,
    run_phases,
    served_worker,
    size_arg,
)

TARGET_RATIO = 2.0
HOLD_SECONDS = 1.0
SINGLE_REPEATS = 3


async def _call(key: str) -> dict[str, Any]:
    from worker.client import trigger

    result = await trigger("bench_hold_key", {"key": key, "hold_seconds": HOLD_SECONDS}, wait=True)
    if not isinstance(result, dict):
        raise RuntimeError(f"unexpected result {result!r}")
    return result


async def _wall(keys: list[str]) -> tuple[float, float, list[dict[str, Any]]]:
    started = time.time()
    results = await asyncio.gather(*(_call(key) for key in keys))
    return started, time.time() - started, list(results)


def _max_overlap(results: list[dict[str, Any]]) -> int:
    edges = sorted(
        [(r["acquired"], 1) for r in results] + [(r["released"], -1) for r in results],
        key=lambda edge: (edge[0], edge[1]),
    )
    held = peak = 0
    for _, delta in edges:
        held += delta
        peak = max(peak, held)
    return peak


async def _run(width: int) -> tuple[list[float], float, float, list[dict[str, Any]]]:
    prefix = f"bench:par:{uuid.uuid4().hex[:8]}"
    await _wall([f"{prefix}:warm"])  # the first run pays for cold caches
    singles = []
    for i in range(SINGLE_REPEATS):
        _, wall, _ = await _wall([f"{prefix}:one:{i}"])
        singles.append(wall)
    started, wall_many, results = await _wall([f"{prefix}:many:{i}" for i in range(width)])
    return singles, started, wall_many, results


async def _phases(results: list[dict[str, Any]]) -> list[dict[str, float]]:
    return [await run_phases(str(r["flow_run_id"])) for r in results]


def main() -> None:
    width = size_arg(20)
    limit = os.environ.get("BENCH_WORKER_LIMIT", str(width))
    env: BenchEnv
    with bench_env() as env, served_worker(env, UNKEY_WORKER_LIMIT=limit) as worker:
        quiet_prefect_console()
        retries = count_api_retries()
        singles, started, wall_many, results = asyncio.run(_run(width))
        phases = asyncio.run(_phases(results))
        worker_retries = worker.api_retries()

    print(describe("wall(1)", singles, unit="s", scale=1.0))
    print(f"wall({width}): {wall_many:.3f} s")
    taken = [p["pending"] - started for p in phases if "pending" in p]
    running = [p["running"] - started for p in phases if "running" in p]
    acquired = [r["acquired"] - started for r in results]
    print(describe(f"  runner took the run (s after the {width} triggers)", taken, "s", 1.0))
    print(describe("  flow started in its process", running, "s", 1.0))
    print(describe("  key acquired", acquired, "s", 1.0))
    print(f"  keys held at the same time, at most: {_max_overlap(results)} of {width}")
    print("  per run, s after the triggers: created / taken / flow started / key acquired")
    for phase, result in sorted(
        zip(phases, results, strict=True), key=lambda pr: pr[1]["acquired"]
    ):
        marks = [
            phase.get(name, float("nan")) - started for name in ("created", "pending", "running")
        ]
        marks.append(result["acquired"] - started)
        print("    " + " / ".join(f"{mark:6.2f}" for mark in marks))
    ours = wall_many
    ref = median(singles)
    ratio = ours / ref
    met = "met" if ratio <= TARGET_RATIO else "NOT met"
    print(f"wall({width})/wall(1) = {ratio:.2f} (target <= {TARGET_RATIO:.0f}: {met})")
    print(retries.summary())
    print(worker_retries)
    print(
        f"size: {width} keys, hold {HOLD_SECONDS:.0f} s, UNKEY_WORKER_LIMIT={limit}, "
        f"{os.cpu_count()} cores"
    )
    print_result("parallel_keys", ratio, f"{ours:.3f}", f"{ref:.3f}", "s wall")


if __name__ == "__main__":
    main()
