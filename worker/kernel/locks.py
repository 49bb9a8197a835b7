"""Per-key locks: Restate's exclusive virtual-object handlers on Prefect.

A key (``versioning:region:local.dev``) is a Prefect global concurrency limit of the same
name with limit 1, created on demand, acquired strictly (a missing limit is an error, never
an unguarded run) with a lease: a holder that dies without releasing loses the key when the
lease expires (``UNKEY_LOCK_LEASE_SECONDS``, >= 60 s; the server's repossessor adds <= 15 s).
The server must keep leases in the filesystem lease storage, or a server restart leaks
slots forever (../shared/reference/prefect-mechanics.md §4).

A holder records its lease in its local run record (``worker.kernel.run_records``), so a
worker on the same host that finds the holder's process dead releases the key at once instead
of waiting for the lease to expire.

This mirrors ``prefect.concurrency.asyncio.concurrency`` (Prefect 3.8.8) with one addition:
it needs the lease id, which the public context manager does not expose.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from uuid import UUID

import anyio
import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency._asyncio import (
    ConcurrencySlotAcquisitionError,
    aacquire_concurrency_slots_with_lease,
    arelease_concurrency_slots_with_lease,
)
from prefect.concurrency._events import (
    emit_concurrency_acquisition_events,
    emit_concurrency_release_events,
)
from prefect.concurrency._leases import amaintain_concurrency_lease
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from worker.kernel import metrics, run_records

__all__ = ["ensure_key_limit", "key_lock", "lock_name"]

_created: set[str] = set()
# Prefect refuses these in limit names.
_BANNED = str.maketrans({c: "_" for c in "/%&<>"})


def lock_name(key: str) -> str:
    """The global concurrency limit name for a key."""
    return key.translate(_BANNED)


async def ensure_key_limit(key: str) -> None:
    """Create the limit for ``key`` (limit 1) unless this process already knows it exists."""
    name = lock_name(key)
    if name in _created:
        return
    async with get_client() as client:
        try:
            # Look first: every new flow-run process would otherwise try a create that the
            # server refuses (and logs with a traceback) when the key already exists.
            await client.read_global_concurrency_limit_by_name(name)
            _created.add(name)
            return
        except ObjectNotFound:
            pass
        try:
            await client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=1, active=True)
            )
        except ObjectAlreadyExists:
            pass
        except httpx.HTTPStatusError as exc:  # older servers answer 409 without the mapping
            if exc.response.status_code != 409:
                raise
    _created.add(name)


def _holder() -> ConcurrencyLeaseHolder | None:
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return None
    return ConcurrencyLeaseHolder(type="flow_run", id=ctx.flow_run.id)


@asynccontextmanager
async def key_lock(key: str, *, lease_seconds: float = 60.0) -> AsyncIterator[UUID]:
    """Hold the per-key lock for the body of the block; yields the lease id.

    Raises:
        ConcurrencySlotAcquisitionError: the Prefect API refused the acquisition.
    """
    name = lock_name(key)
    await ensure_key_limit(key)
    waited_from = time.monotonic()
    try:
        response = await aacquire_concurrency_slots_with_lease(
            names=[name], slots=1, lease_duration=lease_seconds, strict=True, holder=_holder()
        )
    except ConcurrencySlotAcquisitionError:
        # Deleted behind our back (an operator cleaning up limits): create it and try once more.
        _created.discard(name)
        await ensure_key_limit(key)
        response = await aacquire_concurrency_slots_with_lease(
            names=[name], slots=1, lease_duration=lease_seconds, strict=True, holder=_holder()
        )
    metrics.LOCK_WAIT_SECONDS.observe(time.monotonic() - waited_from)
    lease_id = response.lease_id
    run_records.add_lease(lease_id)
    events = emit_concurrency_acquisition_events(response.limits, 1)
    try:
        # Losing the lease means losing exclusivity: stop the holder rather than run unguarded.
        async with amaintain_concurrency_lease(
            lease_id, lease_seconds, raise_on_lease_renewal_failure=True
        ):
            yield lease_id
    finally:
        with anyio.CancelScope(shield=True):
            await arelease_concurrency_slots_with_lease(lease_id=lease_id)
            run_records.remove_lease(lease_id)
            emit_concurrency_release_events(response.limits, 1, events)
