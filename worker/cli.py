"""The ``ctrl-worker`` command line: run, check-config, db init, trigger, dataplane, acme-responder,
seed-demo.

Imports stay lazy: Prefect reads its settings on import, so the API URL must be in the
environment first, and ``check-config`` should answer without importing Prefect at all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import timedelta
from typing import Any

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(ValueError):
    """The command itself was used wrongly (unknown flow, malformed ``--param``): exit 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctrl-worker",
        description="The control-plane worker (Prefect). Configuration: UNKEY_* variables or .env.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="start the worker (serves every deployment of the catalogue)")
    commands.add_parser("check-config", help="validate the configuration; exit 1 on any problem")
    db = commands.add_parser("db", help="control-plane database commands")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("init", help="create the control-plane tables (idempotent)")
    trigger = commands.add_parser("trigger", help="start a service call through the Prefect API")
    trigger.add_argument("flow", help="flow function name, e.g. next_version")
    trigger.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="K=V",
        help="a parameter; V is parsed as JSON when it parses, else taken as a string",
    )
    trigger.add_argument("--idempotency-key", default=None)
    trigger.add_argument("--wait", action="store_true", help="wait and print the result as JSON")
    trigger.add_argument(
        "--in",
        dest="delay",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start the run this many seconds from now",
    )
    commands.add_parser(
        "dataplane",
        help="run the local data plane (a simulation of krane, not for production) until SIGTERM",
    )
    commands.add_parser(
        "acme-responder",
        help="serve ACME HTTP-01 challenges from the control-plane database until SIGTERM",
    )
    commands.add_parser(
        "seed-demo", help="write a demo workspace, project, environment and pending deployment"
    )
    return parser


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}`` (JSON when it parses)."""
    params: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"--param {pair!r}: expected K=V")
        try:
            params[name] = json.loads(raw)
        except ValueError:
            params[name] = raw
    return params


def _check_config() -> int:
    from worker.settings import collect_problems

    _, problems = collect_problems()
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return EXIT_FAILED
    print("configuration ok")
    return EXIT_OK


def _db_init() -> int:
    from tasks.db.schema import init_schema
    from worker.settings import load_settings

    settings = load_settings()
    created = init_schema(settings.database_url())
    print(f"created {len(created)} table(s)" + (f": {', '.join(created)}" if created else ""))
    return _analytics_init(settings)


def _analytics_init(settings: Any) -> int:
    # The analytics tables (tasks.clickhouse.bootstrap): ours on chdb, the platform's on a
    # server, where a refusal is reported but does not fail `db init`.
    from tasks.clickhouse.bootstrap import init_configured_analytics

    done = init_configured_analytics(settings)
    if not done.where:
        print("analytics: ClickHouse is off (UNKEY_CLICKHOUSE_URL), no tables to create")
    elif done.error is not None:
        print(f"analytics: left {done.where} as it is: {done.error}", file=sys.stderr)
    else:
        names = f": {', '.join(done.created)}" if done.created else ""
        print(f"analytics: created {len(done.created)} table(s) in {done.where}{names}")
    return EXIT_OK


def _trigger(args: argparse.Namespace) -> int:
    # Bad usage is told before anything else (even with no Prefect API to talk to).
    from deployments import by_flow_name

    try:
        by_flow_name(args.flow)
    except KeyError as exc:
        raise UsageError(exc.args[0]) from None
    params = parse_params(args.param)

    from worker import prefect_env
    from worker.settings import load_settings

    settings = load_settings()
    api_url = prefect_env.resolve_api_url(settings)
    env = prefect_env.worker_env(settings, api_url)
    prefect_env.apply(
        {k: env[k] for k in ("PREFECT_API_URL", "PREFECT_RESULTS_LOCAL_STORAGE_PATH")}
    )

    from worker.kernel.clock import now

    scheduled = now() + timedelta(seconds=args.delay) if args.delay else None
    try:
        outcome = asyncio.run(_trigger_fast(args, params, api_url, scheduled))
    except _FellBack as fallback:
        outcome = fallback.outcome
    if not args.wait:
        print(outcome.flow_run_id)
        return EXIT_OK
    if not outcome.completed:
        print(
            f"error: flow run {outcome.flow_run_id} ended {outcome.state_name}: {outcome.message}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(json.dumps(outcome.result, default=str))
    return EXIT_OK


class _FellBack(Exception):
    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome


async def _trigger_fast(
    args: argparse.Namespace, params: dict[str, Any], api_url: str, scheduled: Any
) -> Any:
    """The REST path (no Prefect import: ~1.4 s faster); ``worker.client`` where it must."""
    from worker import rest_trigger

    try:
        return await rest_trigger.trigger(
            api_url,
            args.flow,
            params,
            idempotency_key=args.idempotency_key,
            scheduled_time=scheduled,
            wait=args.wait,
        )
    except rest_trigger.NeedsPrefect as needs:
        raise _FellBack(await _trigger_with_prefect(args, params, scheduled, needs)) from None


async def _trigger_with_prefect(
    args: argparse.Namespace, params: dict[str, Any], scheduled: Any, needs: Any
) -> Any:
    from uuid import UUID

    from worker import client
    from worker.rest_trigger import Outcome

    if needs.flow_run_id is None:
        run = await client.submit(
            args.flow, params, idempotency_key=args.idempotency_key, scheduled_time=scheduled
        )
        run_id = run.id
    elif args.idempotency_key and "re-run" in str(needs):
        run_id = (await client.submit(args.flow, params, idempotency_key=args.idempotency_key)).id
    else:
        run_id = UUID(needs.flow_run_id)
    if not args.wait:
        return Outcome(str(run_id))
    try:
        result = await client.wait_for_result(run_id)
    except client.FlowRunFailed as exc:
        return Outcome(str(run_id), "FAILED", exc.state_name, str(exc).split(": ", 1)[-1])
    return Outcome(str(run_id), "COMPLETED", "Completed", "", result)


def _masked(url: str) -> str:
    """``url`` with its password replaced by ``***`` (a database URL is a secret)."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _require_tables(url: str) -> None:
    """Refuse a database without the control-plane tables, naming the command that makes them.

    Raises:
        CtrlError: the database cannot be reached or tables are missing (the message shows
            the URL with its password masked).
    """
    from sqlalchemy.exc import SQLAlchemyError

    from tasks.db.schema import missing_tables
    from worker.kernel.errors import CtrlError

    try:
        absent = missing_tables(url)
    except SQLAlchemyError as exc:
        # The driver's first line says why (access denied, unknown host); never the password.
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise CtrlError(
            f"cannot reach the control-plane database {_masked(url)}: {reason}"
        ) from None
    if absent:
        names = ", ".join(absent[:3]) + (", ..." if len(absent) > 3 else "")
        raise CtrlError(
            f"the control-plane database {_masked(url)} lacks {len(absent)} table(s) "
            f"({names}): run `ctrl-worker db init` first"
        )


def _dataplane() -> int:
    from worker.dataplane import LocalDataPlane, run_local_dataplane
    from worker.settings import load_settings

    settings = load_settings()
    url = settings.database_url()
    _require_tables(url)
    description = LocalDataPlane.from_settings(settings).describe()
    print(f"{description}; database {_masked(url)}", flush=True)
    run_local_dataplane(settings)
    return EXIT_OK


def _acme_responder() -> int:
    from worker.acme_responder import run_acme_responder
    from worker.settings import load_settings

    settings = load_settings()
    url = settings.database_url()
    _require_tables(url)
    address = f"{settings.acme_http01_host}:{settings.acme_http01_port}"
    print(f"acme-responder on http://{address}; database {_masked(url)}", flush=True)
    run_acme_responder(settings)
    return EXIT_OK


def _seed_demo() -> int:
    from tasks.db.demo import seed_demo
    from worker.settings import load_settings

    url = load_settings().database_url()
    _require_tables(url)
    ids = seed_demo(url)
    for name in ("workspace_id", "project_id", "environment_id", "deployment_id"):
        print(f"{name}={getattr(ids, name)}")
    print("next, with `ctrl-worker run` running (from this directory):")
    print(
        f"ctrl-worker trigger deploy --param deployment_id={ids.deployment_id} "
        "--param docker_image=nginx:1.27 --wait"
    )
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ctrl-worker`` console script."""
    args = _parser().parse_args(argv)
    from worker.kernel.errors import ConfigError, CtrlError

    try:
        if args.command == "check-config":
            return _check_config()
        if args.command == "db":
            return _db_init()
        if args.command == "trigger":
            return _trigger(args)
        if args.command == "dataplane":
            return _dataplane()
        if args.command == "acme-responder":
            return _acme_responder()
        if args.command == "seed-demo":
            return _seed_demo()
        from worker.runtime import run_worker
        from worker.settings import load_settings

        return run_worker(load_settings())
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ConfigError, CtrlError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
