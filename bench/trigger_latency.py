"""trigger_latency: client trigger -> a 3-step service call completed on a served worker.

The real worker runs as a subprocess (``bench.worker_main``: ``run_worker`` plus the bench
flows) against the benchmark's Prefect server and MariaDB. ours: the median of N sequential
``worker.client.trigger("bench_three_steps", ..., wait=True)`` calls, each timed from the call
to the returned result. There is no reference way: ratio = ours / the 1.5 s target.

The breakdown comes from each run's state history: created -> Pending (the runner's poll took
it) -> Running (its own process started the flow) -> Completed -> the client saw the result.

    python -m bench.trigger_latency [N=20]
"""

from __future__ import annotations

import asyncio
import time
import uuid

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

TARGET_S = 1.5
PHASES = (
    ("submit", "call", "created"),
    ("wait for the runner's poll", "created", "pending"),
    ("flow-run process start", "pending", "running"),
    ("flow body (3 steps)", "running", "completed"),
    ("client notices the result", "completed", "returned"),
)


async def _trigger_once(tag: str) -> tuple[float, dict[str, float]]:
    from worker.client import trigger

    called = time.time()
    result = await trigger("bench_three_steps", {"tag": tag}, wait=True)
    returned = time.time()
    if not isinstance(result, list) or result[:3] != [
        f"{tag}:first",
        f"{tag}:second",
        f"{tag}:third",
    ]:
        raise RuntimeError(f"unexpected result {result!r}")
    phases = await run_phases(str(result[3]))
    phases.update(call=called, returned=returned)
    return returned - called, phases


async def _run(count: int) -> tuple[list[float], list[dict[str, float]]]:
    prefix = uuid.uuid4().hex[:8]
    warm, _ = await _trigger_once(f"{prefix}-warm")  # the first run pays for cold caches
    print(f"# warm-up call: {warm:.3f} s (not counted)", flush=True)
    latencies: list[float] = []
    phases: list[dict[str, float]] = []
    for i in range(count):
        latency, phase = await _trigger_once(f"{prefix}-{i}")
        latencies.append(latency)
        phases.append(phase)
    return latencies, phases


def _print_breakdown(phases: list[dict[str, float]]) -> None:
    for label, start, end in PHASES:
        spans = [p[end] - p[start] for p in phases if start in p and end in p]
        if spans:
            print(describe(f"  {label}", spans, unit="s", scale=1.0))


def main() -> None:
    count = size_arg(20)
    env: BenchEnv
    with bench_env() as env, served_worker(env) as worker:
        quiet_prefect_console()
        retries = count_api_retries()
        latencies, phases = asyncio.run(_run(count))
        worker_retries = worker.api_retries()

    print(describe("trigger -> result", latencies, unit="s", scale=1.0))
    print("breakdown (from the runs' state history, seconds):")
    _print_breakdown(phases)
    ours = median(latencies)
    met = "met" if ours <= TARGET_S else "NOT met"
    print(f"p50 trigger -> result: {ours:.3f} s (target <= {TARGET_S} s: {met})")
    print(retries.summary())
    print(worker_retries)
    print(f"size: {count} sequential calls (runner poll 1 s, worker limit 10)")
    print_result(
        "trigger_latency", ours / TARGET_S, f"{ours:.3f}", f"{TARGET_S}", "s p50, ref=target"
    )


if __name__ == "__main__":
    main()
