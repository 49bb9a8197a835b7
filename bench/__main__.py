"""Run the benchmarks one after the other, each in its own process: ``python -m bench``.

Each benchmark starts (and stops) its own Prefect server, MariaDB database and, where it needs
one, worker; running them in sequence keeps them from competing for the 2 cores.

    python -m bench                        # all of them, default sizes
    python -m bench key_lock versions=500  # a selection; name=size overrides a size

Prints every benchmark's output as it comes, then the result lines together. Exits 1 if a
benchmark failed (a missed target is a result, not a failure).
"""

from __future__ import annotations

import subprocess
import sys
import time

from bench.common import REPO

BENCHMARKS = (
    "step_overhead",
    "key_lock",
    "key_handoff",
    "dispatch",
    "versions",
    "deploy_latency",
    "key_refill",
    "renewal_sweep",
    "quota_check",
)


def _selection(args: list[str]) -> list[tuple[str, str | None]]:
    if not args:
        return [(name, None) for name in BENCHMARKS]
    chosen = []
    for arg in args:
        name, _, size = arg.partition("=")
        if name not in BENCHMARKS:
            raise SystemExit(f"unknown benchmark '{name}' (known: {', '.join(BENCHMARKS)})")
        chosen.append((name, size or None))
    return chosen


def _run(name: str, size: str | None) -> tuple[int, str]:
    command = [sys.executable, "-m", f"bench.{name}", *([size] if size else [])]
    print(f"=== {' '.join(command[1:])}", flush=True)
    started = time.monotonic()
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert process.stdout is not None
    last = ""
    for line in process.stdout:
        print(line, end="", flush=True)
        if line.strip():
            last = line.rstrip("\n")
    code = process.wait()
    print(f"=== {name}: exit {code} in {time.monotonic() - started:.0f} s", flush=True)
    if code != 0 or not last.startswith(f"{name}: ratio="):
        return code or 1, f"{name}: FAILED (exit {code})"
    return 0, last


def main() -> int:
    results = [_run(name, size) for name, size in _selection(sys.argv[1:])]
    print("\n".join(["", "=== results", *(line for _, line in results)]))
    return 1 if any(code for code, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
