"""key_handoff: 8 callers, each its own OS process, taking turns on ONE per-key lock.

Each caller (a spawned process, so the callers really contend instead of one event loop
taking turns) repeatedly enters ``worker.kernel.locks.key_lock(key, lease_seconds=60)`` on the
same key, records when it got the key (epoch seconds, the same host clock for all), holds it
``--hold`` s (~10 ms), records when it is done, and releases; for N rounds each or until
``--seconds`` pass. Against the benchmark's local Prefect server; there is no reference way:
ratio = handoff p50 / the 200 ms target.

Reported: serialized calls/s (holds / the span from the first acquire to the last release),
the handoff latency p50/p90 (the next holder's acquire time minus the previous holder's
release time, where the next holder is another process; the same gap to whichever process
comes next is printed too), and whether any two hold intervals overlap: an overlap means the
lock let two holders in, and the benchmark exits 1.

    python -m bench.key_handoff [N=10 rounds per caller] [--callers 8] [--seconds 120]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing
import os
import queue
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier

from bench.common import (
    bench_env,
    describe,
    drain_prefect_workers,
    load_average,
    median,
    percentile,
    print_result,
    quiet_prefect_console,
)

TARGET_MS = 200.0
LEASE_SECONDS = 60.0
START_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Hold:
    """One hold of the key: who held it and when (epoch seconds)."""

    acquired: float
    released: float
    caller: int
    pid: int


async def _warm(key: str) -> None:
    from worker.kernel.locks import key_lock

    # Imports, the first client and connection: paid before the barrier, on a key of its own.
    async with key_lock(key, lease_seconds=LEASE_SECONDS):
        pass


async def _take_turns(key: str, rounds: int, seconds: float, hold: float) -> list[float]:
    from worker.kernel.locks import key_lock

    marks: list[float] = []
    deadline = time.time() + seconds
    while len(marks) < 2 * rounds and time.time() < deadline:
        async with key_lock(key, lease_seconds=LEASE_SECONDS):
            acquired = time.time()
            await asyncio.sleep(hold)
            # Recorded before the release: the next holder can only get the key after it.
            marks += [acquired, time.time()]
    return marks


def caller(
    index: int,
    key: str,
    rounds: int,
    seconds: float,
    hold: float,
    barrier: Barrier,
    results: multiprocessing.Queue[tuple[int, int, list[float], str]],
) -> None:
    """One caller process: warm up, wait for the others, take turns; put its holds on ``results``.

    Args:
        index: the caller's number.
        key: the shared key.
        rounds: holds to make.
        seconds: stop starting new holds after this long.
        hold: seconds to hold the key each time.
        barrier: all callers start taking turns together.
        results: receives ``(index, pid, [acquired, released, ...], error text or "")``.
    """
    marks: list[float] = []
    error = ""
    try:
        quiet_prefect_console()
        asyncio.run(_warm(f"{key}:warm:{index}"))
        barrier.wait(START_TIMEOUT_S)
        marks = asyncio.run(_take_turns(key, rounds, seconds, hold))
    except BaseException:
        error = traceback.format_exc()
    finally:
        drain_prefect_workers()
        results.put((index, os.getpid(), marks, error))


def overlaps(holds: list[Hold]) -> list[tuple[Hold, Hold]]:
    """Pairs of holds whose intervals overlap (empty when the lock kept them apart).

    Args:
        holds: sorted by ``acquired``.

    Returns:
        (earlier hold still held, later hold that started inside it) pairs.
    """
    found: list[tuple[Hold, Hold]] = []
    latest: Hold | None = None  # the hold released last so far
    for current in holds:
        if latest is not None and current.acquired < latest.released:
            found.append((latest, current))
        if latest is None or current.released > latest.released:
            latest = current
    return found


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.key_handoff", description=__doc__)
    parser.add_argument("size", nargs="?", type=int, default=10, help="rounds per caller")
    parser.add_argument("--callers", type=int, default=8, help="caller processes")
    parser.add_argument("--seconds", type=float, default=120.0, help="at most this long")
    parser.add_argument("--hold", type=float, default=0.01, help="seconds each hold lasts")
    args = parser.parse_args(argv)
    if args.size < 1 or args.callers < 2 or args.seconds <= 0 or args.hold < 0:
        parser.error("size >= 1, --callers >= 2, --seconds > 0, --hold >= 0")
    return args


def _run_callers(args: argparse.Namespace, key: str) -> list[Hold]:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(args.callers)
    results: multiprocessing.Queue[tuple[int, int, list[float], str]] = context.Queue()
    processes = [
        context.Process(
            target=caller,
            args=(i, key, args.size, args.seconds, args.hold, barrier, results),
            name=f"caller-{i}",
        )
        for i in range(args.callers)
    ]
    for process in processes:
        process.start()
    holds: list[Hold] = []
    errors: list[str] = []
    pids: set[int] = set()
    deadline = time.monotonic() + START_TIMEOUT_S + args.seconds + 120
    try:
        for _ in processes:
            index, pid, marks, error = results.get(timeout=max(1.0, deadline - time.monotonic()))
            pids.add(pid)
            if error:
                errors.append(f"caller {index} (pid {pid}):\n{error}")
            holds += [Hold(marks[i], marks[i + 1], index, pid) for i in range(0, len(marks) - 1, 2)]
    except queue.Empty:
        errors.append("not every caller reported in time")
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
    if errors:
        raise SystemExit("key_handoff: a caller failed:\n" + "\n".join(errors))
    print(f"# {len(pids)} caller processes (pids {sorted(pids)})", flush=True)
    return sorted(holds, key=lambda h: h.acquired)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark.

    Returns:
        0, or 1 when two hold intervals overlapped or no handoff happened.

    Raises:
        SystemExit: a caller process failed.
    """
    args = _parse(sys.argv[1:] if argv is None else argv)
    print(f"# key_handoff: {load_average()}", flush=True)
    with bench_env():
        quiet_prefect_console()
        from worker.kernel.locks import ensure_key_limit

        key = f"bench:handoff:{uuid.uuid4().hex[:8]}"
        asyncio.run(ensure_key_limit(key))  # created once, before the callers race for it
        holds = _run_callers(args, key)

    if len(holds) < 2:
        print(f"only {len(holds)} hold(s): no handoff to measure")
        return 1
    pairs = list(itertools.pairwise(holds))
    handoffs = [b.acquired - a.released for a, b in pairs]
    # The headline: the key going to ANOTHER process (a waiter). A holder that asks again
    # right after releasing often beats the waiters, who sleep on the server's Retry-After.
    crossing = [b.acquired - a.released for a, b in pairs if a.pid != b.pid] or handoffs
    span = holds[-1].released - holds[0].acquired
    held = [h.released - h.acquired for h in holds]
    print(describe("hold (acquired -> done)", held))
    print(describe("release -> next holder, any process", handoffs))
    print(describe("release -> next holder, another process (handoff)", crossing))
    print(
        f"handoffs to another process: {sum(a.pid != b.pid for a, b in pairs)} of {len(pairs)}; "
        f"holds per caller: {[sum(h.caller == i for h in holds) for i in range(args.callers)]}"
    )
    print(f"serialized: {len(holds)} holds in {span:.2f} s = {len(holds) / span:.2f} calls/s")
    bad = overlaps(holds)
    print(f"overlapping hold intervals: {len(bad)}")
    for earlier, later in bad[:10]:
        print(f"  OVERLAP: {earlier} and {later}")
    p50_ms = median(crossing) * 1000
    p90_ms = percentile(crossing, 0.9) * 1000
    met = "met" if p50_ms <= TARGET_MS else "NOT met"
    print(
        f"handoff p50 {p50_ms:.1f} ms, p90 {p90_ms:.1f} ms (target p50 <= {TARGET_MS:.0f}: {met})"
    )
    print(
        f"size: {args.callers} caller processes x {args.size} rounds (at most {args.seconds:.0f} "
        f"s), hold {args.hold * 1000:.0f} ms, lease {LEASE_SECONDS:.0f} s; {load_average()}"
    )
    print_result(
        "key_handoff",
        p50_ms / TARGET_MS,
        f"{p50_ms:.1f}",
        f"{TARGET_MS:.0f}",
        "ms handoff p50, ref=target",
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
