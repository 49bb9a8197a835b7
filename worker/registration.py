"""Registering the catalogue with a Prefect server: the ``ctrl`` work pool and its deployments.

``prefect.yaml`` + ``prefect deploy --all`` is the registration an operator runs; on a fresh
server (the embedded one of ``make run``, a test's) ``ctrl-worker run`` makes the very same
registration itself from ``deployments.CATALOGUE``: the same pool (type ``process``), names,
entrypoints, pull step, job variables, schedules and parameters (a test keeps the two equal),
so whichever ran last, the deployments are identical.

Parameters are not validated by the server (``enforce_parameter_schema: false``): every flow
parses its own parameters at the boundary (``worker.kernel.service.parse``), so a bad one
fails the call at once with a message naming it, whoever triggered it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import DeploymentScheduleCreate, WorkPoolCreate
from prefect.client.schemas.schedules import CronSchedule
from prefect.exceptions import ObjectNotFound
from prefect.utilities.callables import parameter_schema

from deployments import (
    DEPLOYMENT_NAME,
    JOB_VARIABLES,
    POOL_NAME,
    PULL_STEPS,
    WORK_QUEUE_NAME,
    DeploymentSpec,
)

__all__ = ["ensure_pool", "register_deployments"]

log = logging.getLogger("ctrl.worker.registration")


async def ensure_pool(client: PrefectClient, name: str = POOL_NAME) -> UUID:
    """Create the ``process`` work pool ``name`` unless it exists; returns its id."""
    try:
        return (await client.read_work_pool(name)).id
    except ObjectNotFound:
        pass
    from prefect.workers.process import ProcessWorker

    pool = await client.create_work_pool(
        WorkPoolCreate(
            name=name,
            type=ProcessWorker.type,
            base_job_template=ProcessWorker.get_default_base_job_template(),
            description="ctrl-worker service calls (created by ctrl-worker run)",
        ),
        overwrite=False,
    )
    log.info("created work pool %r", name)
    return pool.id


async def register_deployments(
    client: PrefectClient, specs: Sequence[DeploymentSpec]
) -> dict[UUID, DeploymentSpec]:
    """Create or update the ``<flow>/ctrl`` deployment of each spec on the ``ctrl`` pool.

    Returns:
        The deployment id of each spec.
    """
    await ensure_pool(client)
    registered: dict[UUID, DeploymentSpec] = {}
    for spec in specs:
        flow = spec.load()
        flow_id = await client.create_flow_from_name(flow.name)
        schedules = (
            [DeploymentScheduleCreate(schedule=CronSchedule(cron=spec.cron, timezone="UTC"))]
            if spec.cron
            else []
        )
        deployment_id = await client.create_deployment(
            flow_id=flow_id,
            name=DEPLOYMENT_NAME,
            work_pool_name=POOL_NAME,
            work_queue_name=WORK_QUEUE_NAME,
            entrypoint=spec.entrypoint,
            pull_steps=PULL_STEPS,
            job_variables=JOB_VARIABLES,
            parameters=spec.parameters,
            parameter_openapi_schema=parameter_schema(flow).model_dump_for_openapi(),
            enforce_parameter_schema=False,
            schedules=schedules,
            description=spec.description or flow.description,
        )
        registered[deployment_id] = spec
    return registered
