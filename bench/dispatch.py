"""dispatch: a 3-step service call served by our worker vs the same flow under stock ``serve``.

Both serve the same flows (``bench/flows.py``) against the SAME Prefect server and MariaDB in
the same run, one after the other (never both at once, so they do not share the 2 cores):

- **stock** (the reference): a subprocess running ``prefect.runner.Runner(query_seconds=1)``
  with ``aadd_flow(<flow>, name="stock")``: Prefect's default, a spawned interpreter per run
  (``python -m bench.dispatch serve-stock``, deployments ``<flow>/stock``).
- **ours**: ``bench.common.served_worker`` (``bench.worker_main``: ``run_worker`` plus the bench
  flows, deployments ``<flow>/ctrl``), called through ``worker.client.trigger``.

The stock side is called the same way: one client per call, create the run from its
deployment, ``worker.client.wait_for_result``. Measured for each side:

1. sequential: N ``bench_three_steps`` calls one after the other; trigger -> ``Completed``
   p50/p90 from the runs' state timestamps (the API's clock; same host) and as the client saw
   it (it polls every 0.25 s), with the breakdown created -> Pending -> Running -> Completed;
2. concurrent: N ``bench_hold_key`` calls on N different keys at once (each takes its key's
   lock and holds it ``--hold`` s): the wall until the last result;
3. sustained: ``--callers`` K closed-loop callers of ``bench_three_steps`` for ``--sustain`` s:
   completed calls/s, failed/crashed runs, and the Prefect client's HTTP 503 retries seen by the
   callers (this process) and in the serving process's log.

For every phase: CPU seconds per call of the serving process tree (the process and every
descendant, including the per-run processes that ended during the phase: ``CpuSampler``
follows the tree every 25 ms, because a fork server that ignores SIGCHLD never accounts its
children's CPU) and of the Prefect server's tree (and its PostgreSQL's). ratio = ours p50 /
stock p50 (sequential, from the state timestamps).

    python -m bench.dispatch [N=20] [--sustain 60] [--callers 8] [--hold 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from bench.common import (
    ApiRetries,
    BenchEnv,
    CpuSampler,
    ServedWorker,
    bench_env,
    count_api_retries,
    describe,
    load_average,
    median,
    percentile,
    print_result,
    quiet_prefect_console,
    retry_status_codes,
    run_phases,
    served_process,
    served_worker,
)

THREE_STEPS = "bench_three_steps"
HOLD_KEY = "bench_hold_key"
STOCK_DEPLOYMENT = "stock"
CALL_TIMEOUT_S = 300.0
DRAIN_TIMEOUT_S = 300.0

# Targets (/work/shared/BENCHMARKS.md).
TARGET_P50_S = 0.5
TARGET_P50_RATIO = 0.25
TARGET_CONCURRENT_S = 10.0
TARGET_CONCURRENT_RATIO = 0.3
TARGET_CALLS_PER_S = 4.0

PHASES = (
    ("submit", "call", "created"),
    ("created -> Pending (claimed)", "created", "pending"),
    ("Pending -> Running (process start)", "pending", "running"),
    ("Running -> Completed (3 steps)", "running", "completed"),
    ("Completed -> client has the result", "completed", "returned"),
)

CallFn = Callable[[str, dict[str, Any]], Awaitable[Any]]


# -- the stock serve process -------------------------------------------------------------------


def serve_stock(limit: int) -> int:
    """Serve the bench flows with a stock ``Runner(query_seconds=1)`` until SIGTERM.

    Deployments ``bench_three_steps/stock`` and ``bench_hold_key/stock``; every run is a
    spawned interpreter (Prefect's default). ``/health/ready`` on ``UNKEY_HTTP_PORT`` answers
    200 once the runner has started.

    Args:
        limit: the runner's limit of concurrent flow runs (the same as our worker's).

    Returns:
        The exit code (0).
    """
    from prefect.runner import Runner

    from bench.flows import bench_hold_key, bench_three_steps

    ready = threading.Event()

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path == "/health/ready" and ready.is_set()
            self.send_response(200 if ok else 503)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    port = int(os.environ["UNKEY_HTTP_PORT"])
    http = ThreadingHTTPServer(("127.0.0.1", port), Health)
    threading.Thread(target=http.serve_forever, name="health", daemon=True).start()

    async def serve() -> None:
        runner = Runner(name=f"bench-stock-{port}", query_seconds=1, limit=limit)
        for served in (bench_three_steps, bench_hold_key):
            await runner.aadd_flow(served, name=STOCK_DEPLOYMENT)
        task = asyncio.create_task(runner.start())
        while not runner.started and not task.done():
            await asyncio.sleep(0.05)
        ready.set()
        print(f"stock runner started (limit {limit})", flush=True)
        await task

    try:
        asyncio.run(serve())
    finally:
        http.shutdown()
    return 0


# -- calling -------------------------------------------------------------------------------------


async def call_ours(flow_name: str, parameters: dict[str, Any]) -> Any:
    """One call of ``<flow_name>/ctrl`` through the worker's client (``worker.client.trigger``).

    Args:
        flow_name: the served flow.
        parameters: its parameters.

    Returns:
        The flow's result.

    Raises:
        worker.client.FlowRunFailed: the run ended without completing.
    """
    from worker.client import trigger

    return await trigger(flow_name, parameters, wait=True)


_stock_ids: dict[str, Any] = {}


async def call_stock(flow_name: str, parameters: dict[str, Any]) -> Any:
    """One call of ``<flow_name>/stock``, made the way ``trigger`` calls ours.

    Args:
        flow_name: the served flow.
        parameters: its parameters.

    Returns:
        The flow's result.

    Raises:
        worker.client.FlowRunFailed: the run ended without completing.
    """
    from prefect.client.orchestration import get_client

    from worker.client import wait_for_result

    async with get_client() as client:
        deployment_id = _stock_ids.get(flow_name)
        if deployment_id is None:
            deployment = await client.read_deployment_by_name(f"{flow_name}/{STOCK_DEPLOYMENT}")
            deployment_id = _stock_ids[flow_name] = deployment.id
        flow_run = await client.create_flow_run_from_deployment(
            deployment_id, parameters=parameters
        )
        return await wait_for_result(flow_run.id, client=client)


@dataclass
class Call:
    """One call: when it was made and returned (epoch s), its run, how it ended."""

    called: float
    returned: float
    outcome: str  # "Completed", the run's final state name, or the exception's class
    flow_run_id: str = ""
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """It returned the expected result."""
        return self.outcome == "Completed"


def _result_run_id(flow_name: str, parameters: dict[str, Any], result: Any) -> str:
    if flow_name == THREE_STEPS:
        tag = parameters["tag"]
        if not isinstance(result, list) or result[:3] != [
            f"{tag}:first",
            f"{tag}:second",
            f"{tag}:third",
        ]:
            raise ValueError(f"unexpected result {result!r}")
        return str(result[3])
    if not isinstance(result, dict) or "flow_run_id" not in result:
        raise ValueError(f"unexpected result {result!r}")
    return str(result["flow_run_id"])


async def call_once(call: CallFn, flow_name: str, parameters: dict[str, Any]) -> Call:
    """Make one call and record how it went (a failure is recorded, not raised).

    Args:
        call: ``call_ours`` or ``call_stock``.
        flow_name: ``bench_three_steps`` or ``bench_hold_key``.
        parameters: its parameters.

    Returns:
        When it was made and returned, its outcome and flow run id.
    """
    from worker.client import FlowRunFailed

    called = time.time()
    try:
        result = await asyncio.wait_for(call(flow_name, parameters), CALL_TIMEOUT_S)
        run_id = _result_run_id(flow_name, parameters, result)
        outcome = "Completed"
    except FlowRunFailed as exc:
        run_id, outcome = str(exc.flow_run_id), exc.state_name
    except Exception as exc:  # counted as a failure of the call
        run_id, outcome = "", type(exc).__name__
        print(f"# call of {flow_name} failed: {exc!r}", flush=True)
    return Call(called, time.time(), outcome, run_id)


async def _add_phases(calls: list[Call]) -> None:
    for call in calls:
        if call.flow_run_id:
            call.phases = await run_phases(call.flow_run_id)
            call.phases.update(call=call.called, returned=call.returned)


# -- measuring a phase ---------------------------------------------------------------------------


@dataclass
class Usage:
    """What a phase cost: CPU of the serving tree and of the server, retries by status code."""

    seconds: float
    serving_cpu: float
    server_cpu: float
    caller_codes: Counter[str]
    log_codes: Counter[str]

    def codes(self, code: str) -> tuple[int, int]:
        """Retries with status ``code``: (seen by the callers, in the serving log)."""
        return self.caller_codes[code], self.log_codes[code]


class Meter:
    """Samples CPU and retry counts before and after a phase.

    Args:
        served: the serving process (stock serve or our worker).
        sampler: a running ``CpuSampler`` with the groups ``serving`` and ``server``.
        retries: the callers' retry counter.
    """

    def __init__(self, served: ServedWorker, sampler: CpuSampler, retries: ApiRetries) -> None:
        self.served = served
        self.sampler = sampler
        self.retries = retries
        self._mark: tuple[float, dict[str, float], Counter[str], int] | None = None

    def _log_size(self) -> int:
        try:
            return self.served.log_path.stat().st_size
        except OSError:
            return 0

    def begin(self) -> None:
        """Take the "before" sample."""
        self._mark = (
            time.monotonic(),
            self.sampler.totals(),
            Counter(self.retries.codes),
            self._log_size(),
        )

    def end(self) -> Usage:
        """Take the "after" sample; returns the differences.

        Raises:
            RuntimeError: ``begin`` was not called.
        """
        if self._mark is None:
            raise RuntimeError("Meter.end without begin")
        started, cpu, codes, offset = self._mark
        now = self.sampler.totals()
        with self.served.log_path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
        return Usage(
            seconds=time.monotonic() - started,
            serving_cpu=now["serving"] - cpu["serving"],
            server_cpu=now["server"] - cpu["server"],
            caller_codes=Counter(self.retries.codes) - codes,
            log_codes=retry_status_codes(text),
        )


@dataclass
class SideResult:
    """Everything measured for one side (stock or ours)."""

    name: str
    sequential: list[Call] = field(default_factory=list)
    sequential_usage: Usage | None = None
    concurrent: list[Call] = field(default_factory=list)
    concurrent_started: float = 0.0
    concurrent_usage: Usage | None = None
    sustained: list[Call] = field(default_factory=list)
    sustained_window: tuple[float, float] = (0.0, 0.0)
    sustained_usage: Usage | None = None

    def latencies(self) -> list[float]:
        """Sequential trigger -> Completed state, seconds (successful calls)."""
        return [
            c.phases["completed"] - c.called
            for c in self.sequential
            if c.ok and "completed" in c.phases
        ]

    def client_latencies(self) -> list[float]:
        """Sequential trigger -> result in the caller's hands, seconds."""
        return [c.returned - c.called for c in self.sequential if c.ok]

    def p50(self) -> float:
        """Sequential p50 (state timestamps), seconds.

        Raises:
            SystemExit: no sequential call succeeded.
        """
        latencies = self.latencies()
        if not latencies:
            raise SystemExit(f"{self.name}: no sequential call completed")
        return median(latencies)

    def concurrent_wall(self) -> float:
        """Wall from the first concurrent trigger to the last result, seconds."""
        return max(c.returned for c in self.concurrent) - self.concurrent_started

    def concurrent_api_wall(self) -> float:
        """Wall from the first concurrent trigger to the last Completed state, seconds."""
        done = [c.phases["completed"] for c in self.concurrent if "completed" in c.phases]
        return (max(done) - self.concurrent_started) if done else float("nan")

    def sustained_rate(self) -> float:
        """Calls completed within the sustained window, per second."""
        start, end = self.sustained_window
        done = [c for c in self.sustained if c.ok and c.returned <= end]
        return len(done) / (end - start) if end > start else 0.0

    def drained_rate(self) -> float:
        """All completed sustained calls per second, from the start to the last result."""
        done = [c.returned for c in self.sustained if c.ok]
        start = self.sustained_window[0]
        return len(done) / (max(done) - start) if done else 0.0

    def failures(self, calls: list[Call]) -> Counter[str]:
        """Outcomes other than Completed, by state name or exception class."""
        return Counter(c.outcome for c in calls if not c.ok)


async def _sequential(call: CallFn, count: int, prefix: str) -> list[Call]:
    calls = [await call_once(call, THREE_STEPS, {"tag": f"{prefix}-{i}"}) for i in range(count)]
    await _add_phases(calls)
    return calls


async def _concurrent(
    call: CallFn, count: int, prefix: str, hold: float
) -> tuple[float, list[Call]]:
    started = time.time()
    calls = await asyncio.gather(
        *(
            call_once(call, HOLD_KEY, {"key": f"{prefix}:{i}", "hold_seconds": hold})
            for i in range(count)
        )
    )
    await _add_phases(list(calls))
    return started, list(calls)


async def _sustained(
    call: CallFn, seconds: float, callers: int, prefix: str
) -> tuple[tuple[float, float], list[Call]]:
    start = time.time()
    deadline = start + seconds
    calls: list[Call] = []

    async def caller(index: int) -> None:
        n = 0
        while time.time() < deadline:
            calls.append(await call_once(call, THREE_STEPS, {"tag": f"{prefix}-{index}-{n}"}))
            n += 1

    # Calls in flight at the deadline are waited for (counted, but not in calls/s).
    await asyncio.wait_for(
        asyncio.gather(*(caller(i) for i in range(callers))), seconds + DRAIN_TIMEOUT_S
    )
    return (start, deadline), calls


def _measure_side(
    name: str,
    call: CallFn,
    served: ServedWorker,
    env: BenchEnv,
    retries: ApiRetries,
    args: argparse.Namespace,
) -> SideResult:
    # The Prefect server's tree, and its PostgreSQL when it has one (started detached).
    server_pids = [env.server.pid, int(getattr(env.server, "postgres_pid", 0) or 0)]
    sampler = CpuSampler({"serving": [served.process.pid], "server": server_pids}).start()
    started = time.monotonic()
    try:
        return _phases(name, call, served, Meter(served, sampler, retries), args)
    finally:
        sampler.stop()
        rate = sampler.samples / max(time.monotonic() - started, 1e-9)
        print(f"# {name}: CPU sampled {sampler.samples} times ({rate:.0f}/s)", flush=True)


def _phases(
    name: str, call: CallFn, served: ServedWorker, meter: Meter, args: argparse.Namespace
) -> SideResult:
    prefix = f"{name}-{uuid.uuid4().hex[:8]}"
    side = SideResult(name)
    print(f"# {name}: {load_average()}", flush=True)
    # The first runs pay for cold caches (imports, connections, key limits): not counted.
    warm = asyncio.run(call_once(call, THREE_STEPS, {"tag": f"{prefix}-warm"}))
    warm_key = asyncio.run(
        call_once(call, HOLD_KEY, {"key": f"{prefix}:warm", "hold_seconds": args.hold})
    )
    print(
        f"# {name}: warm-up calls {warm.returned - warm.called:.3f} s ({warm.outcome}), "
        f"{warm_key.returned - warm_key.called:.3f} s ({warm_key.outcome}); not counted",
        flush=True,
    )

    meter.begin()
    side.sequential = asyncio.run(_sequential(call, args.size, f"{prefix}-seq"))
    side.sequential_usage = meter.end()
    print(f"# {name}: sequential done, {load_average()}", flush=True)

    meter.begin()
    side.concurrent_started, side.concurrent = asyncio.run(
        _concurrent(call, args.size, f"bench:dispatch:{prefix}", args.hold)
    )
    side.concurrent_usage = meter.end()
    print(f"# {name}: concurrent done, {load_average()}", flush=True)

    if args.sustain > 0:
        meter.begin()
        side.sustained_window, side.sustained = asyncio.run(
            _sustained(call, args.sustain, args.callers, f"{prefix}-sus")
        )
        side.sustained_usage = meter.end()
        print(f"# {name}: sustained done, {load_average()}", flush=True)
    print(f"# {name}: {served.api_retries()}", flush=True)
    return side


# -- report --------------------------------------------------------------------------------------


def _row(label: str, stock: str, ours: str) -> None:
    print(f"  {label:<44} {stock:>18} {ours:>18}")


def _fmt_failures(counter: Counter[str]) -> str:
    return ", ".join(f"{k}x{v}" for k, v in sorted(counter.items())) or "0"


def _per_call(usage: Usage | None, calls: int) -> tuple[str, str]:
    if usage is None or calls == 0:
        return "-", "-"
    return f"{usage.serving_cpu / calls:.3f} s", f"{usage.server_cpu / calls:.3f} s"


def _pct(values: list[float], fraction: float = 0.5) -> str:
    if not values:
        return "-"
    return f"{median(values) if fraction == 0.5 else percentile(values, fraction):.3f} s"


def _codes_503(usage: Usage | None) -> str:
    return "{} / {}".format(*usage.codes("503")) if usage else "-"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def report(stock: SideResult, ours: SideResult, args: argparse.Namespace) -> None:
    """Print both sides side by side, the targets, and the result line (last).

    Args:
        stock: the reference's measurements.
        ours: our worker's measurements.
        args: the command line (sizes).

    Raises:
        SystemExit: a side has no completed sequential call.
    """
    sides = (stock, ours)
    print(f"\n{'':46} {'stock serve':>18} {'ours':>18}")
    print(f"sequential, {args.size} calls of {THREE_STEPS}:")
    _row(
        "trigger -> Completed p50 (state timestamps)",
        *(_pct(s.latencies()) for s in sides),
    )
    _row("trigger -> Completed p90", *(_pct(s.latencies(), 0.9) for s in sides))
    _row(
        "trigger -> result p50 (client-observed)",
        *(_pct(s.client_latencies()) for s in sides),
    )
    _row(
        "trigger -> result p90 (client-observed)",
        *(_pct(s.client_latencies(), 0.9) for s in sides),
    )
    for label, start, end in PHASES:
        spans = [
            [
                c.phases[end] - c.phases[start]
                for c in s.sequential
                if {start, end} <= c.phases.keys()
            ]
            for s in sides
        ]
        _row(f"  p50 {label}", *(_pct(v) for v in spans))
    _row("failed calls", *(_fmt_failures(s.failures(s.sequential)) for s in sides))
    cpu = [_per_call(s.sequential_usage, len(s.sequential)) for s in sides]
    _row("CPU per call, serving process tree", cpu[0][0], cpu[1][0])
    _row("CPU per call, Prefect server", cpu[0][1], cpu[1][1])

    print(f"concurrent, {args.size} calls of {HOLD_KEY} on {args.size} keys (hold {args.hold} s):")
    _row("wall, first trigger -> last result", *(f"{s.concurrent_wall():.3f} s" for s in sides))
    _row(
        "wall, first trigger -> last Completed",
        *(f"{s.concurrent_api_wall():.3f} s" for s in sides),
    )
    _row("failed calls", *(_fmt_failures(s.failures(s.concurrent)) for s in sides))
    cpu = [_per_call(s.concurrent_usage, len(s.concurrent)) for s in sides]
    _row("CPU per call, serving process tree", cpu[0][0], cpu[1][0])
    _row("CPU per call, Prefect server", cpu[0][1], cpu[1][1])
    _row(
        "HTTP 503 retries: callers / serving log", *(_codes_503(s.concurrent_usage) for s in sides)
    )

    if args.sustain > 0:
        print(f"sustained, {args.callers} closed-loop callers for {args.sustain:.0f} s:")
        _row("completed calls/s (within the window)", *(f"{s.sustained_rate():.2f}" for s in sides))
        _row(
            "calls/s incl. those in flight at the end",
            *(f"{s.drained_rate():.2f}" for s in sides),
        )
        _row(
            "calls made / completed",
            *(f"{len(s.sustained)} / {sum(c.ok for c in s.sustained)}" for s in sides),
        )
        _row("failed/crashed runs", *(_fmt_failures(s.failures(s.sustained)) for s in sides))
        _row(
            "HTTP 503 retries: callers / serving log",
            *(_codes_503(s.sustained_usage) for s in sides),
        )
        _row(
            "all client retries: callers / serving log",
            *(
                f"{_fmt_failures(s.sustained_usage.caller_codes)} / "
                f"{_fmt_failures(s.sustained_usage.log_codes)}"
                if s.sustained_usage
                else "-"
                for s in sides
            ),
        )
        cpu = [_per_call(s.sustained_usage, len(s.sustained)) for s in sides]
        _row("CPU per call, serving process tree", cpu[0][0], cpu[1][0])
        _row("CPU per call, Prefect server", cpu[0][1], cpu[1][1])

    ours_p50, stock_p50 = ours.p50(), stock.p50()
    print("targets (ours):")
    ok = ours_p50 <= TARGET_P50_S and ours_p50 <= TARGET_P50_RATIO * stock_p50
    print(
        f"  sequential p50 <= {TARGET_P50_S} s and <= {TARGET_P50_RATIO}x stock: "
        f"{ours_p50:.3f} s, {ours_p50 / stock_p50:.2f}x: {_met(ok)}"
    )
    wall, stock_wall = ours.concurrent_wall(), stock.concurrent_wall()
    ok = wall <= TARGET_CONCURRENT_S and wall <= TARGET_CONCURRENT_RATIO * stock_wall
    print(
        f"  {args.size} concurrent <= {TARGET_CONCURRENT_S:.0f} s and <= "
        f"{TARGET_CONCURRENT_RATIO}x stock: {wall:.2f} s, {wall / stock_wall:.2f}x: {_met(ok)}"
    )
    if args.sustain > 0 and ours.sustained_usage is not None:
        rate = ours.sustained_rate()
        failed = sum(ours.failures(ours.sustained).values())
        codes = sum(ours.sustained_usage.codes("503"))
        ok = rate >= TARGET_CALLS_PER_S and failed == 0 and codes == 0
        print(
            f"  sustained >= {TARGET_CALLS_PER_S:.0f} calls/s, 0 failures, 0 503s: "
            f"{rate:.2f} calls/s, {failed} failures, {codes} 503s: {_met(ok)}"
        )
    print(
        f"size: {args.size} sequential / {args.size} concurrent, sustain {args.sustain:.0f} s "
        f"with {args.callers} callers, limit {_limit(args)} on both sides; {load_average()}"
    )
    print_result(
        "dispatch",
        ours_p50 / stock_p50,
        f"{ours_p50:.3f}",
        f"{stock_p50:.3f}",
        "s p50 sequential",
    )


# -- main ----------------------------------------------------------------------------------------


def _limit(args: argparse.Namespace) -> int:
    return max(args.size, args.callers)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.dispatch", description=__doc__)
    parser.add_argument("size", nargs="?", type=int, default=20, help="sequential/concurrent calls")
    parser.add_argument("--sustain", type=float, default=60.0, help="seconds of sustained load")
    parser.add_argument("--callers", type=int, default=8, help="concurrent sustained callers")
    parser.add_argument("--hold", type=float, default=0.1, help="seconds each key is held")
    args = parser.parse_args(argv)
    if args.size < 1 or args.callers < 1 or args.sustain < 0 or args.hold < 0:
        parser.error("size and --callers must be >= 1, --sustain and --hold >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with ``serve-stock LIMIT``, be the stock serve process).

    Returns:
        The exit code: 0, or 1 when a side has no completed sequential call.
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve-stock"]:
        return serve_stock(int(argv[1]))
    args = _parse(argv)
    limit = str(_limit(args))
    print(f"# dispatch: {load_average()}", flush=True)
    env: BenchEnv
    with bench_env() as env:
        quiet_prefect_console()
        retries = count_api_retries()
        stock_command = [sys.executable, "-m", "bench.dispatch", "serve-stock", limit]
        with served_process(env, stock_command, "stock-serve") as served:
            stock = _measure_side("stock", call_stock, served, env, retries, args)
        with served_worker(env, UNKEY_WORKER_LIMIT=limit) as served:
            ours = _measure_side("ours", call_ours, served, env, retries, args)
        print(retries.summary())
    for side in (stock, ours):
        print(describe(f"{side.name} sequential trigger -> Completed", side.latencies(), "s", 1.0))
    report(stock, ours, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
