"""Steps that generate identifiers: journaled, so a replay sees the same value."""

from __future__ import annotations

import uuid

from worker.kernel.steps import step

__all__ = ["new_nonce"]


@step(retries=0)
def new_nonce() -> str:
    """A fresh nonce (Restate's deterministic ``restate.UUID``): replays return the same one."""
    return uuid.uuid4().hex
