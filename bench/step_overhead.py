"""step_overhead: what a durable step adds to the function it wraps.

ours: ``read_counter`` (one single-row MariaDB read) as a durable step (``worker.steps.step``,
persisted JSON result under its call key), called N times in a flow run with a distinct key
input each time. ref: the same function called plainly N times in the same kind of flow run.
Result: the added p50 per call (target <= 10 ms) and ratio = ours/ref of the per-call medians.

For the breakdown it also times the function as a bare Prefect task (no cache, not persisted)
and as a persisted task without a cache key: task-run overhead, then result write, then the
step's keyed cache lookup; and the step once more with one sync Prefect client held by the flow
(what the per-call client construction costs).

    python -m bench.step_overhead [N=200]
"""

from __future__ import annotations

import asyncio
import time
import uuid

from bench.common import bench_env, describe, median, print_result, quiet_prefect_console, size_arg

TARGET_ADDED_MS = 10.0
# Each mode runs in its own flow run, in this order; the plain run is repeated at the end so
# drift of the machine during the run shows.
MODES = ("plain", "step", "task", "persisted_task", "step_shared_client")
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
        for mode in MODES:
            started = time.monotonic()
            # "step_shared_client" is not the project's way today: the same step, with one
            # sync Prefect client held by the flow for the whole loop.
            shared = mode == "step_shared_client"
            results[mode] += await bench_calls(
                "step" if shared else mode,
                calls,
                f"{prefix}-{mode}-{round_no}",
                shared_sync_client=shared,
            )
            walls[mode] += time.monotonic() - started
    for mode, wall in walls.items():
        print(f"# flow runs '{mode}': {wall:.2f} s wall in total", flush=True)
    return results


def main() -> None:
    count = size_arg(200)
    with bench_env():
        quiet_prefect_console()
        results = asyncio.run(_run_all(count))

    for mode, durations in results.items():
        print(describe(mode, durations))
    ours = median(results["step"]) * 1000
    ref = median(results["plain"]) * 1000
    task_ms = median(results["task"]) * 1000
    persisted_ms = median(results["persisted_task"]) * 1000
    shared_ms = median(results["step_shared_client"]) * 1000
    print(
        f"breakdown (p50 ms): plain function {ref:.3f}; + task run {task_ms - ref:.3f}; "
        f"+ result write {persisted_ms - task_ms:.3f}; + cache key and lookup "
        f"{ours - persisted_ms:.3f}"
    )
    print(
        f"a new SyncPrefectClient per sync step in an async flow: step p50 {ours:.3f} ms, "
        f"{shared_ms:.3f} ms with one client held by the flow ({ours - shared_ms:.3f} ms of it)"
    )
    added = ours - ref
    met = "met" if added <= TARGET_ADDED_MS else "NOT met"
    print(f"added p50 per call: {added:.3f} ms (target <= {TARGET_ADDED_MS:.0f} ms: {met})")
    print(f"size: {count} calls per mode")
    print_result("step_overhead", ours / ref, f"{ours:.3f}", f"{ref:.3f}", "ms p50 per call")


if __name__ == "__main__":
    main()
