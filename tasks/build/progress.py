"""BuildKit's plain progress output (``--progress plain``), read into build step records.

``docker buildx build`` and ``depot build`` print the same format: every line of a vertex
(a build step) starts with ``#<n> ``; its first line is the step's name, then come status
lines, log lines (``#5 0.215 <output>``) and one terminal line (``#5 DONE 0.4s``,
``#5 CACHED``, ``#5 ERROR: <reason>``, ``#5 CANCELED``). The name line is printed again
whenever the output switches back to a step; that repeat is not a new step. ``#0`` is
buildx's note about the builder it uses, not a step.

Times are the worker's clock (unix ms) when a step's first and terminal lines were read: the
plain format has durations, not timestamps. A step still open when the build ended has no
``completed_at``. Lines are parsed as given: redact them before they reach the parser.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["BuildProgress", "BuildStep", "depot_build_id"]

_VERTEX = re.compile(r"^#(\d+) (.*)$")
_LOG = re.compile(r"^\d+\.\d+ ")
_DONE = re.compile(r"^DONE(?: [\d.]+s)?$")
_ERROR = re.compile(r"^ERROR:? ?(.*)$")
# `depot build` prints a link to the build (`https://depot.dev/orgs/<org>/projects/<p>/builds/
# <id>`); older versions print `Build ID: <id>`.
_DEPOT_BUILD_URL = re.compile(r"depot\.dev/orgs/[^/\s]+/projects/[^/\s]+/builds/([A-Za-z0-9_-]+)")
_DEPOT_BUILD_ID = re.compile(r"\bBuild ID:\s*([A-Za-z0-9_-]+)")


@dataclass(frozen=True)
class BuildStep:
    """One BuildKit vertex as ClickHouse stores it (the original's ``BuildStepV1``).

    Attributes:
        number: the vertex number of the plain output (``#3`` -> 3), unique per build.
        name: the vertex name (``[2/3] RUN make``).
        started_at: unix ms when its first line was read.
        completed_at: unix ms when its terminal line was read; None if it never ended.
        cached: the step was a cache hit.
        error: BuildKit's error text when the step failed, else None.
        has_logs: the step printed output of its own (log lines).
    """

    number: int
    name: str
    started_at: int
    completed_at: int | None
    cached: bool
    error: str | None
    has_logs: bool


@dataclass
class _OpenStep:
    name: str
    started_at: int
    completed_at: int | None = None
    cached: bool = False
    error: str | None = None
    has_logs: bool = False


class BuildProgress:
    """Reads plain progress lines one at a time; ``steps()`` is what was seen so far."""

    def __init__(self) -> None:
        self._steps: dict[int, _OpenStep] = {}

    def feed(self, line: str, at_ms: int) -> int | None:
        """Read one line of output.

        Args:
            line: the line, without its newline (already redacted).
            at_ms: when it was read (unix ms).

        Returns:
            The step number the line belongs to, or None for a line of no step.
        """
        match = _VERTEX.match(line)
        if match is None:
            return None
        number, rest = int(match.group(1)), match.group(2).strip()
        if number == 0:
            # buildx's own note (`#0 building with "default" instance ...`), not a vertex.
            return None
        step = self._steps.get(number)
        if step is None:
            self._steps[number] = _OpenStep(name=rest, started_at=at_ms)
            return number
        if rest == "CACHED":
            step.cached, step.completed_at = True, at_ms
        elif rest == "CANCELED" or _DONE.match(rest):
            step.completed_at = at_ms
        elif (error := _ERROR.match(rest)) is not None:
            step.error, step.completed_at = error.group(1).strip() or "error", at_ms
        elif _LOG.match(rest):
            step.has_logs = True
        return number

    def steps(self) -> list[BuildStep]:
        """Every step seen, in vertex order."""
        return [
            BuildStep(
                number=number,
                name=step.name,
                started_at=step.started_at,
                completed_at=step.completed_at,
                cached=step.cached,
                error=step.error,
                has_logs=step.has_logs,
            )
            for number, step in sorted(self._steps.items())
        ]


def depot_build_id(line: str) -> str | None:
    """The Depot build id a line of ``depot build`` output names, if any.

    Args:
        line: one line of output.

    Returns:
        The build id (from a ``depot.dev/orgs/.../builds/<id>`` link or ``Build ID: <id>``).
    """
    match = _DEPOT_BUILD_URL.search(line) or _DEPOT_BUILD_ID.search(line)
    return match.group(1) if match else None
