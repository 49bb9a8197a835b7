"""The real worker (``ctrl-worker run``) plus the benchmark flows: ``python -m bench.worker_main``.

Configured by the environment like the worker (``PREFECT_API_URL``, ``UNKEY_DATABASE_PRIMARY``,
``UNKEY_STATE_DIR``, ``UNKEY_HTTP_PORT``, ``UNKEY_WORKER_LIMIT``); started by
``bench.common.served_worker``.
"""

from __future__ import annotations

import sys

from deployments import DeploymentSpec
from worker.runtime import run_worker
from worker.settings import load_settings

SERVED = ("bench/flows.py:bench_three_steps", "bench/flows.py:bench_hold_key")


def main() -> int:
    """Run the worker until SIGTERM/SIGINT; returns its exit code."""
    return run_worker(load_settings(), extra=[DeploymentSpec(entry) for entry in SERVED])


if __name__ == "__main__":
    sys.exit(main())
