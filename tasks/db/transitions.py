"""DeploymentService state in the control-plane DB: the pending desired-state transition and
the writes that apply one.

``deployment_transitions`` is Restate's per-deployment ``transition`` K/V state: one row per
deployment holding the nonce of the newest scheduled change (last writer wins) and the flow
run that will apply it, so a newer schedule or a clear can cancel that run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

from sqlalchemy import Connection, Row, Select, delete, select, update

from tasks.db.engine import is_mysql
from tasks.db.schema import deployment_topology, deployment_transitions, deployments, projects
from tasks.db.session import control_plane_transaction
from tasks.db.versions import increment_region_version
from worker.kernel.clock import now_ms
from worker.kernel.errors import RefusedError
from worker.kernel.steps import step

__all__ = [
    "APPLIED",
    "DELETED",
    "REFUSED",
    "SUPERSEDED",
    "ImmediateChange",
    "Transition",
    "apply_desired_state",
    "apply_desired_state_now_to_batch",
    "clear_transition",
    "find_deployment_regions",
    "remember_scheduled_run",
    "set_transition",
    "update_topology_status",
]


@dataclass(frozen=True)
class Transition:
    nonce: str
    state: str
    scheduled_flow_run_id: str | None


def _row(deployment_id: str, lock: bool = False) -> Select[Any]:
    query = select(
        deployment_transitions.c.nonce,
        deployment_transitions.c.state,
        deployment_transitions.c.scheduled_flow_run_id,
    ).where(deployment_transitions.c.deployment_id == deployment_id)
    return query.with_for_update() if lock else query


@step(key=("nonce",))
def set_transition(deployment_id: str, nonce: str, state: str) -> str | None:
    """Make ``nonce`` the deployment's pending transition; return the superseded run's id."""
    at = now_ms()
    with control_plane_transaction() as connection:
        previous: Row[Any] | None = connection.execute(
            _row(deployment_id, lock=is_mysql(connection))
        ).first()
        if previous is None:
            connection.execute(
                deployment_transitions.insert().values(
                    deployment_id=deployment_id, nonce=nonce, state=state, created_at=at
                )
            )
            return None
        if previous.nonce == nonce:  # a replay of this very step after a crash
            return None
        connection.execute(
            update(deployment_transitions)
            .where(deployment_transitions.c.deployment_id == deployment_id)
            .values(nonce=nonce, state=state, scheduled_flow_run_id=None, updated_at=at)
        )
        return previous.scheduled_flow_run_id


@step(key=("nonce",))
def remember_scheduled_run(deployment_id: str, nonce: str, flow_run_id: str) -> None:
    """Record which flow run applies transition ``nonce`` (only if it is still the pending one)."""
    with control_plane_transaction() as connection:
        connection.execute(
            update(deployment_transitions)
            .where(
                deployment_transitions.c.deployment_id == deployment_id,
                deployment_transitions.c.nonce == nonce,
            )
            .values(scheduled_flow_run_id=flow_run_id, updated_at=now_ms())
        )


@step(key=("nonce",))
def clear_transition(deployment_id: str, nonce: str | None = None) -> str | None:
    """Delete the pending transition (only ``nonce``'s if given); return its scheduled run id."""
    with control_plane_transaction() as connection:
        row: Row[Any] | None = connection.execute(
            _row(deployment_id, lock=is_mysql(connection))
        ).first()
        if row is None or (nonce is not None and row.nonce != nonce):
            return None
        connection.execute(
            delete(deployment_transitions).where(
                deployment_transitions.c.deployment_id == deployment_id
            )
        )
        return row.scheduled_flow_run_id


APPLIED, SUPERSEDED, DELETED, REFUSED = "applied", "superseded", "deleted", "refused"


def _write_desired_state(connection: Connection, deployment_id: str, desired_state: str) -> str:
    """Set ``deployments.desired_state`` unless the deployment is gone (``deleted``) or live.

    Raises:
        RefusedError: the deployment is its project's live deployment.
    """
    found = connection.execute(
        select(deployments.c.project_id).where(deployments.c.id == deployment_id)
    ).first()
    if found is None:
        return DELETED
    live = connection.execute(
        select(projects.c.live_deployment_id).where(projects.c.id == found.project_id)
    ).scalar_one_or_none()
    if live == deployment_id:
        raise RefusedError(f"not allowed to modify the current live deployment '{deployment_id}'")
    connection.execute(
        update(deployments)
        .where(deployments.c.id == deployment_id)
        .values(desired_state=desired_state, updated_at=now_ms())
    )
    return APPLIED


def _write_topology_status(
    connection: Connection, deployment_id: str, region: str, status: str, version: int
) -> None:
    connection.execute(
        update(deployment_topology)
        .where(
            deployment_topology.c.deployment_id == deployment_id,
            deployment_topology.c.region == region,
        )
        .values(desired_status=status, version=version, updated_at=now_ms())
    )


@step(key=("nonce",))
def apply_desired_state(deployment_id: str, nonce: str, desired_state: str) -> str:
    """Set the deployment's desired state if ``nonce`` is still its pending transition.

    A compare-and-set on the pending nonce, in the transaction of the write: a resumed call
    whose change was superseded or cleared meanwhile (while its key was free) writes nothing.

    Returns:
        ``applied``; ``superseded`` (the nonce is no longer pending: nothing written); or
        ``deleted`` (the deployment no longer exists).

    Raises:
        RefusedError: the deployment is its project's live deployment.
    """
    with control_plane_transaction() as connection:
        pending: Row[Any] | None = connection.execute(
            _row(deployment_id, lock=is_mysql(connection))
        ).first()
        if pending is None or pending.nonce != nonce:
            return SUPERSEDED
        return _write_desired_state(connection, deployment_id, desired_state)


class ImmediateChange(TypedDict):
    outcome: str
    superseded_run: str | None


def _apply_now(
    connection: Connection, deployment_id: str, desired_state: str, topology_status: str
) -> ImmediateChange:
    pending: Row[Any] | None = connection.execute(
        _row(deployment_id, lock=is_mysql(connection))
    ).first()
    superseded = pending.scheduled_flow_run_id if pending is not None else None
    outcome = _write_desired_state(connection, deployment_id, desired_state)
    if pending is not None:
        connection.execute(
            delete(deployment_transitions).where(
                deployment_transitions.c.deployment_id == deployment_id
            )
        )
    if outcome == APPLIED:
        regions = connection.execute(
            select(deployment_topology.c.region)
            .where(deployment_topology.c.deployment_id == deployment_id)
            .order_by(deployment_topology.c.region)
        ).scalars()
        for region in list(regions):
            version = increment_region_version(connection, region)
            _write_topology_status(connection, deployment_id, region, topology_status, version)
    return ImmediateChange(outcome=outcome, superseded_run=superseded)


@step(
    name="applying desired state now to a batch",
    key=("batch", "desired_state"),
    run_name="applying desired state {desired_state} to batch {batch}",
)
def apply_desired_state_now_to_batch(
    batch: str, deployment_ids: list[str], desired_state: str, topology_status: str
) -> dict[str, ImmediateChange]:
    """Change the deployments' desired state now, each in its own transaction, superseding
    any pending transition.

    Per deployment, one transaction: the pending transition is dropped (an immediate change is
    the newest writer), the desired state written, and every region's topology status set with
    a new region version taken in the same transaction.

    A deployment the change is refused for (the live one) gets the outcome ``refused`` and
    nothing written; the others change. A re-run after a crash applies the change again to
    deployments that already have it (the same state, newer versions): harmless.

    Returns:
        Each deployment's ``ImmediateChange`` (``outcome``: applied, deleted or refused).
    """
    changes: dict[str, ImmediateChange] = {}
    for deployment_id in deployment_ids:
        try:
            with control_plane_transaction() as connection:
                changes[deployment_id] = _apply_now(
                    connection, deployment_id, desired_state, topology_status
                )
        except RefusedError:
            changes[deployment_id] = ImmediateChange(outcome=REFUSED, superseded_run=None)
    return changes


@step
def find_deployment_regions(deployment_id: str) -> list[str]:
    """The regions the deployment has a topology row in, sorted."""
    with control_plane_transaction() as connection:
        rows = connection.execute(
            select(deployment_topology.c.region)
            .where(deployment_topology.c.deployment_id == deployment_id)
            .order_by(deployment_topology.c.region)
        )
        return [row.region for row in rows]


@step(key=("region",))
def update_topology_status(deployment_id: str, region: str, status: str, version: int) -> None:
    """Set the deployment's topology status in ``region`` with a new version."""
    with control_plane_transaction() as connection:
        _write_topology_status(connection, deployment_id, region, status, version)
