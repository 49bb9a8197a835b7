"""step_overhead: what a durable step adds to the function it wraps.

ours: ``read_counter`` (one single-row MariaDB read) as a durable step (``worker.steps.step``,
persisted JSON result under its call key), called N times in a flow run with a distinct key
input each time. ref: the same function called plainly N times in the same kind of flow run.
Result: the added p50 per call (target <= 10 ms) and ratio = ours/ref of the per-call medians.

For the breakdown it also times the function as a bare Prefect task (no cache, not persisted)
and as a persisted task without a cache key: task-run overhead, then result write, then the
step's keyed cache lookup.

    python -m bench.step_overhead [N=200]
"""

from __future__ import annotations

import asyncio
import uuid

from bench.common import bench_env, describe, median, print_result, quiet_prefect_console, size_arg

TARGET_ADDED_MS = 10.0
# Each mode runs in its own flow run, in this order; the plain run is repeated at the end so
# drift of the machine during the run shows.
ORDER = ("plain", "step", "task", "persisted_task")


async def _run_all(count: int) -> dict[str, list[float]]:
    from bench.flows import bench_calls

    prefix = uuid.uuid4().hex[:8]
    # A warm-up flow run: imports, the DB pool and the first API connections are not measured.
    await bench_calls("step", 5, f"{prefix}-warm")
    await bench_calls("plain", 5, f"{prefix}-warmplain")
    results: dict[str, list[float]] = {}
    for mode in ORDER:
        results[mode] = await bench_calls(mode, count, f"{prefix}-{mode}")
    results["plain_again"] = await bench_calls("plain", count, f"{prefix}-plain2")
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
    print(
        f"breakdown (p50 ms): plain function {ref:.3f}; + task run {task_ms - ref:.3f}; "
        f"+ result write {persisted_ms - task_ms:.3f}; + cache key and lookup "
        f"{ours - persisted_ms:.3f}"
    )
    added = ours - ref
    met = "met" if added <= TARGET_ADDED_MS else "NOT met"
    print(f"added p50 per call: {added:.3f} ms (target <= {TARGET_ADDED_MS:.0f} ms: {met})")
    print(f"size: {count} calls per mode")
    print_result("step_overhead", ours / ref, f"{ours:.3f}", f"{ref:.3f}", "ms p50 per call")


if __name__ == "__main__":
    main()
