"""The durable kernel: how a service call keeps Restate's guarantees on Prefect.

Modules (each opens with the guarantee it gives):

- ``service``: ``@service_flow``, ``parse`` and ``critical_section`` — how a call is written.
- ``steps``: durable steps (a finished step never runs again for the same call).
- ``locks``: per-key locks (Restate's exclusive virtual-object handlers).
- ``sleep``: ``durable_sleep`` (a long wait frees the process and the key).
- ``hooks``: give-up hooks (a call that ends without success always runs its hook).
- ``calls``: starting a call of a deployment by flow name (idempotency keys, re-runs).
- ``resume``: the reconciler (crashed runs resumed as the same flow run, bounded).
- ``run_records``: which local process runs which flow run, holding which leases.
- ``errors``, ``clock``, ``metrics``: the one error tree, the one clock, the counters.
- ``prefect_private``: every private Prefect name the kernel relies on, in one place.

The kernel imports neither ``tasks/`` nor ``blocks/``: services build on it, never the
other way round. Nothing is re-exported here, so importing one module stays cheap.
"""
