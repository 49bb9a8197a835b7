"""The SQL of the local data plane: a simulation of krane for one machine and for tests.

The worker never talks to Kubernetes (SPEC §4, "The data plane contract"): it writes desired
rows and waits for the data plane to report ``instances``. These functions are what the
simulation (``worker.dataplane``) does in place of krane, each on a caller's connection and
limited to the regions it serves:

- ``topologies_needing_instances``: topologies that should run (``starting``/``started``) and
  have fewer ``running`` instances than ``desired_replicas``;
- ``report_instances``: one ``running`` instance per replica, idempotent (an instance is
  identified by ``UNIQUE(k8s_name, region)``; reporting again only sets ``running``);
- ``remove_stopped_instances``: instances of ``stopping``/``stopped`` topologies are gone;
- ``mark_sentinels_healthy``: sentinels still ``unknown`` become ``healthy`` with every
  desired replica available.

They are plain functions, not durable steps: the simulation is not a service call and simply
tries again on its next pass. MariaDB/MySQL and SQLite differ only in the upsert's spelling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, and_, delete, exists, func, select, update
from sqlalchemy.dialects import mysql, sqlite

from tasks.db.engine import is_mysql
from tasks.db.schema import deployment_topology, deployments, instances, sentinels
from worker.kernel.clock import new_id, now_ms

__all__ = [
    "DesiredTopology",
    "mark_sentinels_healthy",
    "remove_stopped_instances",
    "report_instances",
    "topologies_needing_instances",
]

RUNNING_STATUSES = ("starting", "started")
STOPPED_STATUSES = ("stopping", "stopped")


@dataclass(frozen=True)
class DesiredTopology:
    """A topology row that should run, with what its instances copy from the deployment."""

    deployment_id: str
    region: str
    desired_replicas: int
    workspace_id: str
    project_id: str
    k8s_name: str
    port: int
    cpu_millicores: int
    memory_mib: int

    @property
    def key(self) -> tuple[str, str]:
        """``(deployment_id, region)``, the topology's identity (its unique constraint)."""
        return (self.deployment_id, self.region)

    def instance_names(self) -> list[str]:
        """``<k8s name>-0`` … ``<k8s name>-<n-1>``, as a StatefulSet names its pods."""
        base = self.k8s_name or self.deployment_id
        return [f"{base}-{n}" for n in range(self.desired_replicas)]


def topologies_needing_instances(
    connection: Connection, regions: Sequence[str]
) -> list[DesiredTopology]:
    """Topologies in ``regions`` that should run but lack ``running`` instances.

    A topology counts when its ``desired_status`` is ``starting`` or ``started``, its
    deployment row exists, and fewer than ``desired_replicas`` of its instances in its region
    are ``running``.

    Args:
        connection: a connection to the control-plane database.
        regions: the regions the data plane serves.

    Returns:
        The topologies, ordered by deployment id and region.
    """
    topology, deployment = deployment_topology.c, deployments.c
    running = (
        select(
            instances.c.deployment_id,
            instances.c.region,
            func.count().label("running"),
        )
        .where(instances.c.status == "running", instances.c.region.in_(regions))
        .group_by(instances.c.deployment_id, instances.c.region)
        .subquery()
    )
    joined = deployment_topology.join(
        deployments, deployment.id == topology.deployment_id
    ).outerjoin(
        running,
        and_(
            running.c.deployment_id == topology.deployment_id,
            running.c.region == topology.region,
        ),
    )
    query = (
        select(
            topology.deployment_id,
            topology.region,
            topology.desired_replicas,
            deployment.workspace_id,
            deployment.project_id,
            deployment.k8s_name,
            deployment.port,
            deployment.cpu_millicores,
            deployment.memory_mib,
        )
        .select_from(joined)
        .where(
            topology.desired_status.in_(RUNNING_STATUSES),
            topology.region.in_(regions),
            func.coalesce(running.c.running, 0) < topology.desired_replicas,
        )
        .order_by(topology.deployment_id, topology.region)
    )
    return [DesiredTopology(**row._asdict()) for row in connection.execute(query)]


def report_instances(connection: Connection, topology: DesiredTopology) -> list[str]:
    """Report one ``running`` instance per desired replica of ``topology`` (what krane does).

    Idempotent: an instance that exists already (same ``k8s_name`` and region) keeps its id and
    only has its status set to ``running``, so reporting twice adds no row.

    Args:
        connection: a connection to the control-plane database (in a transaction).
        topology: the topology, as ``topologies_needing_instances`` returned it.

    Returns:
        The ``k8s_name`` of every instance reported.
    """
    names = topology.instance_names()
    if not names:
        return []
    rows = [
        {
            "id": new_id("inst"),
            "deployment_id": topology.deployment_id,
            "workspace_id": topology.workspace_id,
            "project_id": topology.project_id,
            "region": topology.region,
            "k8s_name": name,
            "address": f"{name}.{topology.region}.local:{topology.port}",
            "cpu_millicores": topology.cpu_millicores,
            "memory_mib": topology.memory_mib,
            "status": "running",
        }
        for name in names
    ]
    if is_mysql(connection):
        upsert = mysql.insert(instances).values(rows)
        connection.execute(upsert.on_duplicate_key_update(status=upsert.inserted.status))
    else:
        lite = sqlite.insert(instances).values(rows)
        connection.execute(
            lite.on_conflict_do_update(
                index_elements=[instances.c.k8s_name, instances.c.region],
                set_={"status": lite.excluded.status},
            )
        )
    return names


def remove_stopped_instances(connection: Connection, regions: Sequence[str]) -> int:
    """Delete the instances of topologies in ``regions`` that are ``stopping`` or ``stopped``.

    Args:
        connection: a connection to the control-plane database.
        regions: the regions the data plane serves.

    Returns:
        How many instances are gone.
    """
    topology = deployment_topology.c
    stopped = exists().where(
        topology.deployment_id == instances.c.deployment_id,
        topology.region == instances.c.region,
        topology.desired_status.in_(STOPPED_STATUSES),
    )
    result = connection.execute(delete(instances).where(instances.c.region.in_(regions), stopped))
    return int(result.rowcount)


def mark_sentinels_healthy(connection: Connection, regions: Sequence[str]) -> int:
    """Report every sentinel in ``regions`` whose health is ``unknown`` as ``healthy``.

    Its ``available_replicas`` becomes its ``desired_replicas``. Sentinels with a known health
    (``healthy``, ``paused``, ``unhealthy``) are left as they are.

    Args:
        connection: a connection to the control-plane database.
        regions: the regions the data plane serves.

    Returns:
        How many sentinels were marked healthy.
    """
    result = connection.execute(
        update(sentinels)
        .where(sentinels.c.health == "unknown", sentinels.c.region.in_(regions))
        .values(
            health="healthy",
            available_replicas=sentinels.c.desired_replicas,
            updated_at=now_ms(),
        )
    )
    return int(result.rowcount)
