"""step_overhead: what a durable step adds to the function it wraps.

ours: ``read_counter`` (one single-row MariaDB read) as a durable step
(``worker.kernel.steps.step``, persisted JSON result under its call key), called N times in
a flow run with a distinct key input each time. ref: the same function called plainly N times
in the same kind of flow run.
Result: the added p50 per call (target <= 10 ms) and ratio = ours/ref of the per-call medians.

For the breakdown, the function is also timed with one sync Prefect client held by the flow
for its whole loop (Prefect otherwise builds a new client, TLS context included, for every
sync task called from an async flow): as a bare task (no cache, not persisted), as a persisted
task without a cache key, and as the same durable step. So: task-run overhead, result write,
keyed cache lookup, and what the per-call client costs.

    python -m bench.step_overhead [N=200]
"""

from __future__ import annotations

import asyncio
import time
import uuid

from bench.common import (
    bench_env,
    count_api_retries,
    describe,
    median,
    print_result,
    quiet_prefect_console,
    size_arg,
)

TARGET_ADDED_MS = 10.0
# mode -> (how bench_calls calls the function, whether the flow holds one sync client).
# "plain" is the reference and "step" ours (the project's way); the rest are the breakdown.
MODES: dict[str, tuple[str, bool]] = {
    "plain": ("plain", False),
    "step": ("step", False),
    "task, shared client": ("task", True),
    "persisted task, shared client": ("persisted_task", True),
    "step, shared client": ("step", True),
}
# The machine is shared and noisy: the modes take turns in short flow runs (round robin), so
# a slow minute hits all of them alike instead of one.
ROUNDS = 4


async def _run_all(count: int) -> dict[str, list[float]]:
    from bench.flows import bench_calls

    prefix = uuid.uuid4().hex[:8]
    # Warm-up flow runs: imports, the DB pool and the first API connections are not measured.
    await bench_calls("step", 5, f"{prefix}-warm")
    await bench_calls("plain", 5, f"{prefix}-warmplain")
    results: dict[str, list[float]] = {mode: [] for mode in MODES}
    walls: dict[str, float] = dict.fromkeys(MODES, 0.0)
    per_round = [count // ROUNDS + (1 if r < count % ROUNDS else 0) for r in range(ROUNDS)]
    for round_no, calls in enumerate(per_round):
        if not calls:
            continue
        for number, (mode, (how, shared)) in enumerate(MODES.items()):
            started = time.monotonic()
            results[mode] += await bench_calls(
                how, calls, f"{prefix}-{number}-{round_no}", shared_sync_client=shared
            )
            walls[mode] += time.monotonic() - started
    for mode, wall in walls.items():
        print(f"# flow runs '{mode}': {wall:.2f} s wall in total", flush=True)
    return results


def main() -> None:
    count = size_arg(200)
    with bench_env():
        quiet_prefect_console()
        retries = count_api_retries()
        results = asyncio.run(_run_all(count))

    for mode, durations in results.items():
        print(describe(mode, durations))
    p50 = {mode: median(durations) * 1000 for mode, durations in results.items()}
    ours = p50["step"]
    ref = p50["plain"]
    print(
        f"breakdown (differences of p50s, ms): task run "
        f"{p50['task, shared client'] - ref:.3f}; + result write "
        f"{p50['persisted task, shared client'] - p50['task, shared client']:.3f}; + cache key "
        f"and lookup {p50['step, shared client'] - p50['persisted task, shared client']:.3f}; "
        f"+ a new SyncPrefectClient per call {ours - p50['step, shared client']:.3f}"
    )
    added = ours - ref
    met = "met" if added <= TARGET_ADDED_MS else "NOT met"
    print(f"added p50 per call: {added:.3f} ms (target <= {TARGET_ADDED_MS:.0f} ms: {met})")
    print(retries.summary())
    print(f"size: {count} calls per mode")
    print_result("step_overhead", ours / ref, f"{ours:.3f}", f"{ref:.3f}", "ms p50 per call")


if __name__ == "__main__":
    main()
