"""What a forked flow-run process does: become the run's environment, run the flow, report.

It is ``python -m prefect.engine`` without the start-up: the fork server already imported
Prefect and the flow modules, so a child applies the run's environment (only what differs from
the fork server's), runs the deployment's pull steps, finds the flow among the preloaded
modules, and runs it with Prefect's own engine (``run_flow`` inside
``handle_engine_signals``, the public pair ``prefect.engine`` uses). The engine does the
orchestration: Running, the result, the final state, heartbeats.

The return value is the process exit code: 0 when the engine handled the outcome (Completed,
Failed, Cancelled, or a durable sleep that rescheduled the run), non-zero only when the engine
itself could not run (then the worker reports the run Crashed).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

from worker.prefect_env import drain_background_senders

__all__ = ["resolve_flow", "run_child", "warm_up"]

DRAIN_TIMEOUT_SECONDS = 10.0


def resolve_flow(entrypoint: str) -> Any:
    """The flow object of ``entrypoint`` (``path/to/file.py:function`` or ``module:function``).

    A preloaded module is used as it is (no second copy of its module-level state); anything
    else is loaded the way Prefect loads an entrypoint.
    """
    from prefect import Flow
    from prefect.flows import load_flow_from_entrypoint

    path, _, name = entrypoint.partition(":")
    module_name = path.removesuffix(".py").replace("/", ".") if path.endswith(".py") else path
    module = sys.modules.get(module_name)
    if module is not None and name:
        file = getattr(module, "__file__", None)
        same_file = not path.endswith(".py") or (
            file is not None and Path(file).resolve() == Path(path).resolve()
        )
        candidate = getattr(module, name, None)
        if same_file and isinstance(candidate, Flow):
            return candidate
    return load_flow_from_entrypoint(entrypoint)


# Imported by the engine only once a run starts: import them once in the fork server instead.
_LAZY_IMPORTS = (
    "prefect._flow_run_suspension",
    "prefect.events.clients",
    "websockets",
    "anyio._backends._asyncio",
    "anyio.streams.memory",
    "anyio.streams.stapled",
    "anyio.streams.tls",
    "rich._emoji_codes",
)


def warm_up() -> None:
    """Called in the fork server after the preload: what every child would otherwise redo.

    Only imports and pure computations: no thread, loop, socket or client may exist before a
    fork.
    """
    for name in _LAZY_IMPORTS:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    with contextlib.suppress(Exception):
        from worker.settings import worker_settings

        worker_settings()  # parsing UNKEY_* and .env costs ~55 ms


def _apply_environment(env: dict[str, str]) -> None:
    os.environ.update(env)
    if any(key.startswith("UNKEY_") for key in env):
        from worker.settings import use_settings

        use_settings(None)  # the run's own configuration differs: read it again
    # Prefect read its settings in the fork server; re-read them only if a setting differs
    # (PREFECT__* names are per-run values the engine reads directly, not settings).
    if any(key.startswith("PREFECT_") and not key.startswith("PREFECT__") for key in env):
        from prefect.context import SettingsContext, get_settings_context
        from prefect.settings import Settings

        context = SettingsContext(profile=get_settings_context().profile, settings=Settings())
        context.__enter__()  # for the rest of this process's life


_CHDIR_STEPS = {
    "prefect.deployments.steps.set_working_directory",
    "prefect.deployments.steps.pull.set_working_directory",
}
_ENV_TEMPLATE = re.compile(r"^\{\{\s*\$(\w+)\s*\}\}$")


def _only_chdir(steps: list[dict[str, Any]]) -> str | None:
    """The directory, when the pull steps only move into one (this project's prefect.yaml).

    ``run_steps`` would do the same in ~100 ms (an event loop, templating, a step event);
    a plain path or a lone ``{{ $VARIABLE }}`` is resolved here directly.
    """
    if len(steps) != 1 or len(steps[0]) != 1:
        return None
    ((name, inputs),) = steps[0].items()
    if name not in _CHDIR_STEPS or not isinstance(inputs, dict) or set(inputs) != {"directory"}:
        return None
    directory = str(inputs["directory"])
    match = _ENV_TEMPLATE.match(directory)
    if match:
        return os.environ.get(match.group(1)) or None
    return None if "{{" in directory else directory


async def _run_pull_steps(steps: list[dict[str, Any]]) -> None:
    from prefect.deployments.steps.core import run_steps

    # With a flow-run id in the environment every step opens an events websocket of its own
    # (~45 ms each, fast-dispatch.md); the run's own events say the same.
    run_id = os.environ.pop("PREFECT__FLOW_RUN_ID", None)
    try:
        await run_steps(steps, print_function=lambda *_: None)
    finally:
        if run_id is not None:
            os.environ["PREFECT__FLOW_RUN_ID"] = run_id


def run_child(payload: dict[str, Any]) -> int:
    """Run one flow run in this (forked) process; returns the exit code.

    Args:
        payload: ``flow_run`` (the FlowRun as JSON), ``env`` (what differs from the fork
            server's environment), ``entrypoint``, ``pull_steps`` and ``cwd`` (or None).

    Returns:
        0 when Prefect's engine handled the run's outcome, else non-zero.
    """
    code = 1
    try:
        _apply_environment(payload.get("env") or {})
        if payload.get("cwd"):
            os.chdir(payload["cwd"])
        steps = payload.get("pull_steps") or []
        directory = _only_chdir(steps)
        if directory is not None:
            os.chdir(directory)
        elif steps:
            asyncio.run(_run_pull_steps(steps))
        from prefect.client.schemas.objects import FlowRun
        from prefect.engine import handle_engine_signals
        from prefect.flow_engine import run_flow
        from prefect.logging.loggers import flow_run_logger

        flow_run = FlowRun.model_validate(payload["flow_run"])
        logger = flow_run_logger(flow_run=flow_run)
        with handle_engine_signals(flow_run.id):
            try:
                flow = resolve_flow(payload["entrypoint"])
            except Exception:
                logger.error("could not load the flow %s", payload["entrypoint"], exc_info=True)
                raise
            outcome = run_flow(flow, flow_run=flow_run, error_logger=logger)  # type: ignore[arg-type]
            if asyncio.iscoroutine(outcome):
                asyncio.run(outcome)
        code = 0
    except SystemExit as exc:  # handle_engine_signals ends with exit(0) or exit(1)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        drain_background_senders(DRAIN_TIMEOUT_SECONDS)
        sys.stdout.flush()
        sys.stderr.flush()
    return code
