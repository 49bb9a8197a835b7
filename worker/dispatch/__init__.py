"""Warm, push-driven dispatch of the ``ctrl`` work pool's flow runs (the ``ctrl-warm`` worker).

- ``worker_type``: the Prefect worker type (``WarmProcessWorker``), registered through the
  ``prefect.collections`` entry point, so ``prefect worker start --pool ctrl --type ctrl-warm``
  works as well as ``ctrl-worker run``.
- ``forkserver``: the pre-imported process that forks one child per run.
- ``child``: what a forked child does to run its flow.
- ``push``: the event subscription that starts a run when it becomes due.

Importing this package imports nothing: ``load_prefect_collections()`` imports the entry-point
module in every Prefect process (even the server), so it must stay light.
"""
