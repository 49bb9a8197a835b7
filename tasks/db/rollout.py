"""The desired rows of a rollout (reference §2.1 steps 7-10): topologies, sentinels, Cilium
policies, and the wait for the data plane's instances.

The worker never talks to the data plane: it writes these rows, and the data plane (krane, or
``ctrl-worker dataplane``) reports ``instances``. Every write is idempotent by a unique key of
its table, so a step interrupted after its commit and run again writes nothing twice: a
topology per (deployment, region), a sentinel per (environment, region), a policy per
(deployment, region, name).
"""

from __future__ import annotations

import asyncio
from typing import Any, TypedDict

from sqlalchemy import Connection, and_, func, select, update

from tasks.db.schema import cilium_network_policies, deployment_topology, instances, sentinels
from tasks.db.session import control_plane_transaction
from worker.kernel.clock import new_dns_label, new_id, now_ms
from worker.kernel.errors import TerminalError
from worker.kernel.steps import step

__all__ = [
    "InstanceWaitTimeout",
    "SentinelSpec",
    "TopologyRow",
    "ensure_sentinel",
    "find_existing_policies",
    "find_existing_sentinels",
    "insert_topologies",
    "record_wait_deadline",
    "upsert_network_policy",
    "wait_for_instances",
]

SENTINEL_PORT = 8040
SENTINEL_CPU_MILLICORES = 256
SENTINEL_MEMORY_MIB = 256


class InstanceWaitTimeout(TerminalError):
    """The data plane did not report the deployment's instances running in time."""


class TopologyRow(TypedDict):
    region: str
    replicas: int
    version: int


class SentinelSpec(TypedDict):
    workspace_id: str
    project_id: str
    environment_id: str
    image: str
    replicas: int


@step(name="insert deployment topologies")
def insert_topologies(workspace_id: str, deployment_id: str, rows: list[TopologyRow]) -> int:
    """Insert one ``starting`` topology row per region, in one transaction.

    Regions that already have a row for this deployment are skipped (a re-run after a crash).

    Returns:
        How many rows were inserted.
    """
    at = now_ms()
    with control_plane_transaction() as connection:
        existing = set(
            connection.execute(
                select(deployment_topology.c.region).where(
                    deployment_topology.c.deployment_id == deployment_id
                )
            ).scalars()
        )
        new = [
            {
                "workspace_id": workspace_id,
                "deployment_id": deployment_id,
                "region": row["region"],
                "desired_replicas": row["replicas"],
                "version": row["version"],
                "desired_status": "starting",
                "created_at": at,
            }
            for row in rows
            if row["region"] not in existing
        ]
        if new:
            connection.execute(deployment_topology.insert(), new)
        return len(new)


@step(name="find existing sentinels", fresh=True)
def find_existing_sentinels(environment_id: str) -> list[str]:
    """The regions that already have a sentinel for the environment, sorted."""
    with control_plane_transaction() as connection:
        return sorted(
            connection.execute(
                select(sentinels.c.region).where(sentinels.c.environment_id == environment_id)
            ).scalars()
        )


def _insert_ignoring_duplicate(
    connection: Connection, table: Any, values: dict[str, Any], exists: Any
) -> bool:
    """Insert ``values`` unless a row matching ``exists`` is there (checked in the same
    transaction; a concurrent insert loses on the unique key and is retried by the step)."""
    if connection.execute(select(func.count()).select_from(table).where(exists)).scalar_one():
        return False
    connection.execute(table.insert().values(**values))
    return True


@step(name="ensure sentinel exists in db", key=("region",), run_name="ensure sentinel in {region}")
def ensure_sentinel(spec: SentinelSpec, region: str, version: int) -> bool:
    """One sentinel per environment and region (duplicates ignored).

    Returns:
        Whether this call inserted it.
    """
    name = new_dns_label()
    values = {
        "id": new_id("sntl"),
        "workspace_id": spec["workspace_id"],
        "project_id": spec["project_id"],
        "environment_id": spec["environment_id"],
        "k8s_name": name,
        "k8s_address": f"{name}.sentinel.svc.cluster.local:{SENTINEL_PORT}",
        "region": region,
        "image": spec["image"],
        "desired_state": "running",
        "health": "unknown",
        "desired_replicas": spec["replicas"],
        "available_replicas": 0,
        "cpu_millicores": SENTINEL_CPU_MILLICORES,
        "memory_mib": SENTINEL_MEMORY_MIB,
        "version": version,
        "created_at": now_ms(),
    }
    exists = and_(
        sentinels.c.environment_id == spec["environment_id"], sentinels.c.region == region
    )
    with control_plane_transaction() as connection:
        return _insert_ignoring_duplicate(connection, sentinels, values, exists)


@step(name="find existing cilium policies", fresh=True)
def find_existing_policies(deployment_id: str) -> dict[str, Any]:
    """The deployment's policy documents, by ``<region>/<k8s name>``."""
    with control_plane_transaction() as connection:
        rows = connection.execute(
            select(
                cilium_network_policies.c.region,
                cilium_network_policies.c.k8s_name,
                cilium_network_policies.c.policy,
            ).where(cilium_network_policies.c.deployment_id == deployment_id)
        )
        return {f"{row.region}/{row.k8s_name}": row.policy for row in rows}


@step(
    name="upsert network policy",
    key=("region", "k8s_name"),
    run_name="upsert network policy {k8s_name} in {region}",
)
def upsert_network_policy(
    row: dict[str, Any], region: str, k8s_name: str, document: dict[str, Any], version: int
) -> None:
    """Write one policy: update it by (deployment, region, name) if it exists, else insert it
    (the original always inserted after updating; one or the other is enough).

    Args:
        row: ``id``, ``workspace_id``, ``project_id``, ``environment_id``, ``deployment_id``,
            ``k8s_namespace`` of the policy.
        region: the region.
        k8s_name: the policy's name.
        document: the CiliumNetworkPolicy document.
        version: the region version this write takes.
    """
    at = now_ms()
    match = and_(
        cilium_network_policies.c.deployment_id == row["deployment_id"],
        cilium_network_policies.c.region == region,
        cilium_network_policies.c.k8s_name == k8s_name,
    )
    with control_plane_transaction() as connection:
        updated = connection.execute(
            update(cilium_network_policies)
            .where(match)
            .values(policy=document, version=version, updated_at=at)
        ).rowcount
        if not updated:
            values = {**row, "region": region, "k8s_name": k8s_name, "policy": document}
            values.update(version=version, created_at=at)
            _insert_ignoring_duplicate(connection, cilium_network_policies, values, match)


@step(name="wait deadline", key=("purpose",))
def record_wait_deadline(purpose: str, seconds: float) -> int:
    """When a wait of this call must give up (unix ms), fixed at its first start: a resumed
    call keeps the deadline instead of waiting the whole timeout again."""
    return now_ms() + int(seconds * 1000)


def _running_instances(deployment_id: str, region: str) -> tuple[int, int]:
    with control_plane_transaction() as connection:
        rows = connection.execute(
            select(instances.c.status, func.count())
            .where(instances.c.deployment_id == deployment_id, instances.c.region == region)
            .group_by(instances.c.status)
        ).all()
    counts = {str(status): int(count) for status, count in rows}
    return counts.get("running", 0), sum(counts.values())


@step(
    name="wait for instances",
    key=("region",),
    run_name="wait for instances in {region}",
    retries=10,
)
async def wait_for_instances(
    deployment_id: str, region: str, replicas: int, deadline_ms: int, poll_seconds: float
) -> int:
    """Wait until the region has at least ``replicas`` instances and all of them run.

    Polls the ``instances`` rows the data plane reports, every ``poll_seconds``, without
    blocking the event loop (the key's lease keeps being renewed).

    Returns:
        The number of running instances.

    Raises:
        InstanceWaitTimeout: the deadline passed first (terminal: the deploy fails).
    """
    while True:
        running, total = await asyncio.to_thread(_running_instances, deployment_id, region)
        if total >= replicas and running == total:
            return running
        left = deadline_ms - now_ms()
        if left <= 0:
            raise InstanceWaitTimeout(
                f"deployment '{deployment_id}' has {running} of {replicas} instance(s) running "
                f"in region '{region}' ({total} reported) at its wait deadline"
            )
        await asyncio.sleep(min(poll_seconds, left / 1000))
