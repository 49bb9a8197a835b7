"""Per-key locks: Restate's exclusive virtual-object handlers on Prefect.

A key (``versioning:region:local.dev``) is a Prefect global concurrency limit of the same name
with limit 1, created on demand and acquired strictly (a missing limit is created, never an
unguarded run) with a lease: a holder that dies without releasing loses the key when the lease
expires (``UNKEY_LOCK_LEASE_SECONDS``, >= 60 s; the server's repossessor adds <= 15 s). The
server must keep leases in the filesystem lease storage, or a server restart leaks slots
forever (../shared/reference/prefect-mechanics.md §4).

**Handoff.** Prefect's own acquisition retries after the server's ``Retry-After`` (up to 30 s
under contention, 2 s with the embedded server's cap). Here a holder announces its release
with a ``prefect.concurrency-limit.released`` event, and a waiter, subscribed to that event
for its limit, tries again at once: a key changes hands in tens of milliseconds. The
``Retry-After`` stays the fallback (a holder that died announces nothing).

A holder records its lease in its local run record (``worker.kernel.run_records``), so a
worker on the same host that finds the holder's process dead releases the key at once instead
of waiting for the lease to expire. A durable sleep releases the keys of its run early
(``release_held_keys``); the block then does not release them a second time.

Only public client methods are used (``increment_concurrency_slots_with_lease``,
``renew_concurrency_lease``, ``release_concurrency_slots_with_lease``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import anyio
import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from worker.kernel import metrics, run_records
from worker.kernel.events import watch_events

__all__ = [
    "HeldKey",
    "KeyLostError",
    "ensure_key_limit",
    "held_keys",
    "key_lock",
    "key_locks",
    "lock_name",
    "release_held_keys",
]

log = logging.getLogger("ctrl.worker.locks")

RELEASED_EVENT = "prefect.concurrency-limit.released"
# A waiter that hears nothing (a dead holder, a lost event) asks again after this long at most.
MAX_WAIT_BETWEEN_ATTEMPTS = 2.0

_limit_ids: dict[str, UUID] = {}
_GATES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)
# Prefect refuses these in limit names.
_BANNED = str.maketrans({c: "_" for c in "/%&<>"})


class _LimitGone(Exception):
    """The limit of a key does not exist (any more)."""


class KeyLostError(RuntimeError):
    """The lease of a held key could not be renewed: exclusivity is no longer guaranteed."""


@dataclass
class HeldKey:
    """One key (or, from ``key_locks``, several under one lease) held by the current call."""

    name: str
    limit_id: UUID
    lease_id: UUID
    released: bool = False
    renewer: asyncio.Task[None] | None = field(default=None, repr=False)
    # Every (limit name, limit id) of the lease; just (name, limit_id) for one key.
    limits: tuple[tuple[str, UUID], ...] = ()

    def __post_init__(self) -> None:
        if not self.limits:
            self.limits = ((self.name, self.limit_id),)

    async def release(self) -> None:
        """Give the key back (idempotent) and tell waiters."""
        if self.released:
            return
        self.released = True
        if self.renewer is not None:
            self.renewer.cancel()
        async with get_client() as client:
            try:
                await client.release_concurrency_slots_with_lease(self.lease_id)
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 404:  # expired meanwhile: nothing to release
                    raise
        run_records.remove_lease(self.lease_id)
        for name, limit_id in self.limits:
            _announce(RELEASED_EVENT, name, limit_id)


_HELD: contextvars.ContextVar[tuple[HeldKey, ...]] = contextvars.ContextVar(
    "ctrl_held_keys", default=()
)


def lock_name(key: str) -> str:
    """The global concurrency limit name for a key."""
    return key.translate(_BANNED)


def held_keys() -> tuple[HeldKey, ...]:
    """The keys the current call holds, outermost first."""
    return _HELD.get()


async def release_held_keys() -> None:
    """Release every key the current call holds now (a durable sleep frees its keys)."""
    for held in reversed(_HELD.get()):
        await held.release()


async def _create_limit(name: str) -> None:
    """Create the limit ``name`` (limit 1); another caller creating it first is fine."""
    async with get_client() as client:
        try:
            await client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=1, active=True)
            )
        except ObjectAlreadyExists:
            pass
        except httpx.HTTPStatusError as exc:  # older servers answer 409 without mapping
            if exc.response.status_code != 409:
                raise


async def ensure_key_limit(key: str) -> UUID:
    """Create the limit for ``key`` (limit 1) unless it exists; returns its id."""
    name = lock_name(key)
    known = _limit_ids.get(name)
    if known is not None:
        return known
    async with get_client() as client:
        try:
            # Look first: creating an existing limit makes the server log a traceback.
            limit = await client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            await _create_limit(name)
            limit = await client.read_global_concurrency_limit_by_name(name)
    _limit_ids[name] = limit.id
    return limit.id


def _holder() -> ConcurrencyLeaseHolder | None:
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return None
    return ConcurrencyLeaseHolder(type="flow_run", id=ctx.flow_run.id)


def _announce(event: str, name: str, limit_id: UUID) -> None:
    from prefect.events import emit_event

    with contextlib.suppress(Exception):  # an announcement is an optimisation, never a failure
        emit_event(
            event=event,
            resource={
                "prefect.resource.id": f"prefect.concurrency-limit.{limit_id}",
                "prefect.resource.name": name,
                "slots-acquired": "1",
                "limit": "1",
            },
        )


class _ReleaseWatch:
    """Release events of the limits waited for, opened on the first refused attempt only."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.heard = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
        from prefect.events.schemas.events import ResourceSpecification

        filter = EventFilter(
            event=EventNameFilter(name=[RELEASED_EVENT]),
            resource=EventResourceFilter(
                labels=ResourceSpecification({"prefect.resource.name": list(self.names)})
            ),
        )
        await watch_events(filter, lambda _event: self.heard.set())

    async def wait(self, seconds: float) -> None:
        self.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.heard.wait(), seconds)
        self.heard.clear()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


async def _acquire(names: list[str], lease_seconds: float) -> tuple[UUID, dict[str, UUID]]:
    """Wait until every key is free and take them all at once (the server's increment is
    all-or-nothing); returns the lease id and each limit's id.

    Raises:
        _LimitGone: some limits do not exist (nothing is held then).
    """
    watch = _ReleaseWatch(names)
    try:
        async with get_client() as client:
            while True:
                try:
                    response = await client.increment_concurrency_slots_with_lease(
                        names=names,
                        slots=1,
                        mode="concurrency",
                        lease_duration=lease_seconds,
                        holder=_holder(),
                    )
                except httpx.HTTPStatusError as exc:
                    if exc.response.status_code != 423:
                        raise
                    retry_after = float(exc.response.headers.get("Retry-After", 1.0))
                    await watch.wait(min(retry_after, MAX_WAIT_BETWEEN_ATTEMPTS))
                    continue
                body: dict[str, Any] = response.json()
                lease_id = UUID(body["lease_id"])
                found = {
                    str(limit["name"]): UUID(limit["id"]) for limit in body.get("limits") or []
                }
                missing = [name for name in names if name not in found]
                if missing:
                    # The server skips missing limits: give back what this lease did take.
                    if found:
                        await client.release_concurrency_slots_with_lease(lease_id)
                    raise _LimitGone(missing)
                return lease_id, found
    finally:
        await watch.close()


async def _renew_forever(held: HeldKey, lease_seconds: float, owner: asyncio.Task[Any]) -> None:
    # Renew well before expiry; a lease that cannot be renewed means another call may take
    # the key: stop the holder rather than let it run unguarded.
    interval = max(1.0, lease_seconds / 4)
    failures = 0
    while True:
        await asyncio.sleep(interval)
        try:
            async with get_client() as client:
                await client.renew_concurrency_lease(held.lease_id, lease_seconds)
            failures = 0
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures += 1
            if failures * interval >= lease_seconds * 0.75:
                log.error("lost the lease of key %s: %s", held.name, exc)
                owner.cancel(f"lost the lease of key {held.name}")
                return


@asynccontextmanager
async def key_lock(key: str, *, lease_seconds: float = 60.0) -> AsyncIterator[HeldKey]:
    """Hold the per-key lock for the body of the block; yields the held key (its lease id).

    Raises:
        KeyLostError: the lease could not be renewed while the body ran.
    """
    async with key_locks([key], lease_seconds=lease_seconds) as held:
        yield held


@asynccontextmanager
async def key_locks(keys: Sequence[str], *, lease_seconds: float = 60.0) -> AsyncIterator[HeldKey]:
    """Hold several per-key locks at once, under one lease, for the body of the block.

    The server takes every key or none (one all-or-nothing increment), so a caller holding
    some keys never waits for the others while blocking them: bulk work on many keys (the
    idle-preview scale-down puts a page of deployments on standby) costs one acquisition,
    not one per key. Each key still excludes every other holder of that key.

    Args:
        keys: the keys (duplicates are taken once).
        lease_seconds: the lease, renewed while the block runs.

    Yields:
        The held keys (``HeldKey.limits`` names each).

    Raises:
        KeyLostError: the lease could not be renewed while the body ran.
    """
    names = sorted({lock_name(key) for key in keys})
    if not names:
        raise ValueError("key_locks needs at least one key")
    if len(names) > 1:
        # No local gates: a bulk caller queued on one key's gate would block this process's
        # callers of its other keys while it waits; the server's increment is all-or-nothing.
        async with _key_locks(names, lease_seconds) as held:
            yield held
        return
    # Callers in this process queue here first: only the head of the queue asks the server,
    # so 50 local waiters are one contender, not 50 (each woken by every release).
    async with _local_gate(names[0]), _key_locks(names, lease_seconds) as held:
        yield held


def _local_gate(name: str) -> asyncio.Lock:
    gates = _GATES.setdefault(asyncio.get_running_loop(), {})
    return gates.setdefault(name, asyncio.Lock())


async def _create_limits(names: list[str]) -> None:
    gate = asyncio.Semaphore(8)

    async def create(name: str) -> None:
        async with gate:
            _limit_ids.pop(name, None)
            await _create_limit(name)

    await asyncio.gather(*(create(name) for name in names))


@asynccontextmanager
async def _key_locks(names: list[str], lease_seconds: float) -> AsyncIterator[HeldKey]:
    waited_from = time.monotonic()
    try:
        # The limits usually exist already: ask for the keys first, create missing ones after.
        lease_id, limit_ids = await _acquire(names, lease_seconds)
    except _LimitGone as gone:
        await _create_limits(list(gone.args[0]))
        lease_id, limit_ids = await _acquire(names, lease_seconds)
    metrics.LOCK_WAIT_SECONDS.observe(time.monotonic() - waited_from)
    label = names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} more)"
    held = HeldKey(
        name=label,
        limit_id=limit_ids[names[0]],
        lease_id=lease_id,
        limits=tuple((name, limit_ids[name]) for name in names),
    )
    run_records.add_lease(lease_id)
    owner = asyncio.current_task()
    assert owner is not None
    held.renewer = asyncio.get_running_loop().create_task(
        _renew_forever(held, lease_seconds, owner)
    )
    token = _HELD.set((*_HELD.get(), held))
    try:
        yield held
    except asyncio.CancelledError:
        if held.renewer.done() and not held.released:
            raise KeyLostError(f"lost the lease of key {label}") from None
        raise
    finally:
        _HELD.reset(token)
        with anyio.CancelScope(shield=True):
            await held.release()
