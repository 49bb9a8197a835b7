"""key_lock: acquire+release of the per-key lock (``worker.kernel.locks.key_lock``) on a fresh key.

ours: the median of N cycles ``async with key_lock(<fresh key>): pass`` inside a flow run
against the local Prefect server (creating the key's global concurrency limit, acquiring a
slot with a lease, starting the lease renewal, releasing). There is no reference way: the
result is absolute, ratio = ours / the 50 ms target.

Also printed: the same cycle split into acquire and release, creating the limit alone, and the
cycle on a key whose limit already exists.

    python -m bench.key_lock [N=100]
"""

from __future__ import annotations

import asyncio
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

TARGET_MS = 50.0


async def _run(count: int) -> dict[str, list[float]]:
    from bench.flows import bench_lock_cycles

    prefix = f"bench:lock:{uuid.uuid4().hex[:8]}"
    await bench_lock_cycles(3, f"{prefix}:warm")  # imports, first connections
    return await bench_lock_cycles(count, prefix)


def main() -> None:
    count = size_arg(100)
    with bench_env():
        quiet_prefect_console()
        retries = count_api_retries()
        results = asyncio.run(_run(count))

    for name, durations in results.items():
        print(describe(name, durations))
    ours = median(results["fresh"]) * 1000
    met = "met" if ours <= TARGET_MS else "NOT met"
    print(f"p50 acquire+release on a fresh key: {ours:.2f} ms (target <= {TARGET_MS:.0f}: {met})")
    print(retries.summary())
    print(f"size: {count} cycles")
    print_result(
        "key_lock", ours / TARGET_MS, f"{ours:.2f}", f"{TARGET_MS:.0f}", "ms p50, ref=target"
    )


if __name__ == "__main__":
    main()
