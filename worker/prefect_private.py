"""Every private Prefect name the worker relies on, in one place.

Prefect's runner and worker internals change between releases (the runner was refactored in
early 2026). Whatever this project uses that is not public API is named here, checked by
``tests/test_prefect_private.py`` (an upgrade that renames or reshapes one fails there, in
one place), and used only when ``available()`` says the name still exists; otherwise the
stock behaviour stays, a little slower.

Today that is one name:

- ``BaseWorker._give_worker_labels_to_flow_run(self, flow_run_id)``: called by BaseWorker
  between claiming a run and starting it, one API round trip (~30 ms) on the critical path
  of every run, for labels that only the UI reads. The warm worker sends them in the
  background instead.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["LABELS_METHOD", "available", "signature_of"]

LABELS_METHOD = "_give_worker_labels_to_flow_run"
# The parameters each name is expected to take (self included).
EXPECTED: dict[str, list[str]] = {LABELS_METHOD: ["self", "flow_run_id"]}


def signature_of(name: str) -> list[str] | None:
    """The parameter names of ``BaseWorker.<name>``, or None when it no longer exists."""
    from prefect.workers.base import BaseWorker

    member: Any = getattr(BaseWorker, name, None)
    if member is None or not callable(member):
        return None
    return list(inspect.signature(member).parameters)


def available(name: str) -> bool:
    """True when ``BaseWorker.<name>`` exists with the expected parameters."""
    return signature_of(name) == EXPECTED[name]
