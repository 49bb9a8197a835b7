"""The catalogue of deployments: the single list that ``ctrl-worker run`` serves and that
``prefect.yaml`` must match (a test checks it).

Every service call is deployed as ``<flow name>/ctrl``; crons carry their schedule (UTC).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the catalogue is read by commands that must not import Prefect
    from prefect import Flow

__all__ = [
    "CATALOGUE",
    "DEPLOYMENT_NAME",
    "JOB_VARIABLES",
    "POOL_NAME",
    "PULL_STEPS",
    "WORK_QUEUE_NAME",
    "DeploymentSpec",
    "by_flow_name",
]

DEPLOYMENT_NAME = "ctrl"
POOL_NAME = "ctrl"
WORK_QUEUE_NAME = "default"
# The code is already on the worker's machine (a checkout, the Docker image): the pull step
# only moves into it. CTRL_WORKER_DIR is resolved in the flow-run process.
PULL_STEPS: list[dict[str, Any]] = [
    {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $CTRL_WORKER_DIR }}"}}
]
# Every flow-run process, whichever worker starts it, sends heartbeats: the reconciler marks
# a run without them for 90 s Crashed (stock workers do not set this themselves).
JOB_VARIABLES: dict[str, Any] = {"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}}


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment: which flow, under which name, on which schedule."""

    entrypoint: str  # "flows/versioning.py:next_version" (prefect.yaml's form)
    cron: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def module(self) -> str:
        return self.entrypoint.split(":")[0].removesuffix(".py").replace("/", ".")

    @property
    def function(self) -> str:
        return self.entrypoint.split(":")[1]

    @property
    def flow_name(self) -> str:
        # Every service flow is named after its function (worker.kernel.service.service_flow).
        return self.function

    @property
    def full_name(self) -> str:
        return f"{self.flow_name}/{DEPLOYMENT_NAME}"

    def load(self) -> Flow[..., Any]:
        from prefect import Flow

        flow = getattr(importlib.import_module(self.module), self.function)
        if not isinstance(flow, Flow):
            raise TypeError(f"{self.entrypoint} is not a Prefect flow")
        return flow


CATALOGUE: tuple[DeploymentSpec, ...] = (
    DeploymentSpec("flows/versioning.py:next_version"),
    DeploymentSpec("flows/versioning.py:get_version"),
    DeploymentSpec("flows/deployment.py:schedule_desired_state_change"),
    DeploymentSpec("flows/deployment.py:change_desired_state"),
    DeploymentSpec("flows/deployment.py:clear_scheduled_state_changes"),
    DeploymentSpec("flows/routing.py:assign_frontline_routes"),
    DeploymentSpec("flows/deploy.py:deploy"),
    DeploymentSpec("flows/deploy.py:promote"),
    DeploymentSpec("flows/deploy.py:rollback"),
    DeploymentSpec("flows/deploy.py:scale_down_idle_preview_deployments", cron="*/15 * * * *"),
    DeploymentSpec("flows/certificate.py:process_challenge"),
    DeploymentSpec("flows/certificate.py:renew_expiring_certificates", cron="0 3 * * *"),
    DeploymentSpec("flows/custom_domain.py:add_custom_domain"),
    DeploymentSpec("flows/custom_domain.py:verify_domain"),
    DeploymentSpec("flows/custom_domain.py:retry_verification"),
    DeploymentSpec("flows/custom_domain.py:delete_custom_domain"),
    DeploymentSpec("flows/clickhouse_user.py:configure_clickhouse_user"),
    DeploymentSpec("flows/quota_check.py:run_quota_check", cron="0 15 * * *"),
    DeploymentSpec("flows/key_refill.py:run_key_refill", cron="0 0 * * *"),
)


def by_flow_name(name: str) -> DeploymentSpec:
    """The catalogue entry of a flow.

    Raises:
        KeyError: no such flow in the catalogue (the message lists the known ones).
    """
    for spec in CATALOGUE:
        if spec.flow_name == name:
            return spec
    known = ", ".join(spec.flow_name for spec in CATALOGUE)
    raise KeyError(f"unknown flow '{name}' (known: {known})")
