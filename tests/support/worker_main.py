"""Run the real worker (``ctrl-worker run``) plus the kernel's test flows.

Used by the crash tests as the subprocess they SIGKILL: ``python -m tests.support.worker_main``.
"""

from __future__ import annotations

import sys

from deployments import DeploymentSpec
from tests.support.kernel_flows import KERNEL_FLOWS
from worker.runtime import run_worker
from worker.settings import load_settings

if __name__ == "__main__":
    sys.exit(run_worker(load_settings(), extra=[DeploymentSpec(e) for e in KERNEL_FLOWS]))
