"""What a long call shows in the Prefect UI: a progress artifact advanced per phase, and result
tables.

Artifacts are for people watching the UI, not part of the call's outcome: a failure to publish
one is logged and never fails or retries the call. They carry ids, names and counts only, never
a secret.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from prefect.artifacts import (
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)

__all__ = ["Progress", "publish_table"]

log = logging.getLogger("ctrl.worker.artifacts")


def _artifact_key(text: str) -> str:
    # Artifact keys allow lowercase letters, digits and dashes only.
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:100]


class Progress:
    """A progress artifact over named phases (``Progress(["build", "topology", ...])``).

    ``done(phase)`` marks a phase finished; the percentage is the share of finished phases and
    the description says which phase ran last and what comes next.
    """

    def __init__(self, title: str, phases: Sequence[str]) -> None:
        self.title = title
        self.phases = list(phases)
        self.finished: list[str] = []
        self._artifact: UUID | None = None

    def _description(self, note: str) -> str:
        waiting = [p for p in self.phases if p not in self.finished]
        nxt = f"; next: {waiting[0]}" if waiting else ""
        return f"{self.title}: {note}{nxt}"

    async def start(self) -> None:
        """Publish the artifact at 0 %."""
        try:
            self._artifact = await acreate_progress_artifact(
                progress=0.0, description=self._description("started")
            )
        except Exception as exc:  # the UI is not the call: never fail it for this
            log.warning("could not publish the progress artifact: %s", exc)

    async def done(self, phase: str, note: str = "") -> None:
        """Mark ``phase`` finished (``note`` says what it did)."""
        if phase not in self.finished:
            self.finished.append(phase)
        percent = 100.0 * len(self.finished) / max(len(self.phases), 1)
        await self.report(percent, f"{phase} done" + (f" ({note})" if note else ""))

    async def report(self, percent: float, note: str) -> None:
        """Set the percentage directly, for work counted in items rather than phases (keys
        refilled); ``note`` says how far it got."""
        if self._artifact is None:
            return
        try:
            await aupdate_progress_artifact(
                self._artifact,
                progress=min(max(percent, 0.0), 100.0),
                description=self._description(note),
            )
        except Exception as exc:
            log.warning("could not update the progress artifact: %s", exc)


async def publish_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    """Publish ``rows`` as a table artifact under ``key`` (made artifact-key safe)."""
    try:
        await acreate_table_artifact(table=rows, key=_artifact_key(key), description=description)
    except Exception as exc:
        log.warning("could not publish the table artifact %s: %s", key, exc)
