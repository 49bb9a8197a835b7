"""A stand-in ``docker`` / ``depot`` CLI for build tests (the real ones cannot build here).

``install_fake_build_cli(directory, "docker")`` writes an executable ``directory/docker``;
put ``directory`` first on ``PATH`` and ``tasks.build.cli.run_build`` runs it instead of the
real CLI. Each run appends one JSON line to the record file it returns: its argv, its
environment, its pid and the pid of the child it starts (so tests can check the whole
process group is gone), and the ``config.json`` of its ``DOCKER_CONFIG`` with that file's
mode and the directory's entries. Then it prints BuildKit plain-progress lines
(``$GIT_AUTH_TOKEN`` in a line becomes the token it was given, to test redaction), waits
``sleep`` seconds in a child ``sleep`` process and exits with ``exit_code`` (a negative
one: killed by that signal).
"""

from __future__ import annotations

import json
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_LINES",
    "DEPOT_BUILD_ID",
    "DEPOT_LINES",
    "install_fake_build_cli",
    "read_build_records",
]

DEPOT_BUILD_ID = "b7x9k2m4p1"

DEFAULT_LINES: tuple[str, ...] = (
    '#0 building with "default" instance using docker driver',
    "",
    "#1 [internal] load build definition from Dockerfile",
    "#1 transferring dockerfile: 92B done",
    "#1 DONE 0.1s",
    "",
    "#2 [internal] load metadata for docker.io/library/alpine:3.20",
    "#2 DONE 0.4s",
    "",
    "#3 [1/2] FROM docker.io/library/alpine:3.20",
    "#3 CACHED",
    "",
    "#4 [2/2] RUN echo built",
    "#4 0.215 built",
    "#4 DONE 0.3s",
    "",
    "#5 exporting to image",
    "#5 pushing layers 0.5s done",
    "#5 DONE 0.9s",
)

DEPOT_LINES: tuple[str, ...] = (
    f"[depot] build: https://depot.dev/orgs/org1/projects/proj1/builds/{DEPOT_BUILD_ID}",
    *DEFAULT_LINES,
)

_SCRIPT = """#!{python}
import json, os, subprocess, sys

record = {{"argv": sys.argv, "env": dict(os.environ), "pid": os.getpid(), "child_pid": None}}
child = subprocess.Popen(["sleep", "{sleep}"]) if {sleep} > 0 else None
if child is not None:
    record["child_pid"] = child.pid
config = os.path.join(os.environ.get("DOCKER_CONFIG", "/nonexistent"), "config.json")
if os.path.exists(config):
    with open(config) as file:
        record["docker_config"] = json.load(file)
    record["docker_config_mode"] = os.stat(config).st_mode & 0o777
    record["docker_config_dir"] = os.environ["DOCKER_CONFIG"]
    record["docker_config_entries"] = sorted(os.listdir(os.environ["DOCKER_CONFIG"]))
with open({record!r}, "a") as file:
    file.write(json.dumps(record) + "\\n")
token = os.environ.get("GIT_AUTH_TOKEN", "")
for line in {lines!r}:
    print(line.replace("$GIT_AUTH_TOKEN", token), flush=True)
if child is not None:
    child.wait()
if {exit_code} < 0:
    os.kill(os.getpid(), -({exit_code}))
sys.exit({exit_code})
"""


def install_fake_build_cli(
    directory: Path,
    name: str,
    exit_code: int = 0,
    lines: Sequence[str] | None = None,
    sleep: float = 0,
) -> Path:
    """Write the stand-in CLI ``directory/name``; return the file its runs are recorded in.

    Args:
        directory: where to put it (put this directory first on ``PATH``).
        name: ``docker`` or ``depot``.
        exit_code: the status it exits with; negative: it kills itself with that signal.
        lines: what it prints (default: ``DEPOT_LINES`` for depot, else ``DEFAULT_LINES``).
        sleep: seconds it waits (in a child process) after printing, before exiting.

    Returns:
        The record file (JSON lines, one per run; see ``read_build_records``).
    """
    if lines is None:
        lines = DEPOT_LINES if name == "depot" else DEFAULT_LINES
    directory.mkdir(parents=True, exist_ok=True)
    record = directory / f"{name}.record.jsonl"
    script = directory / name
    script.write_text(
        _SCRIPT.format(
            python=sys.executable,
            record=str(record),
            lines=list(lines),
            sleep=sleep,
            exit_code=exit_code,
        )
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return record


def read_build_records(record: Path) -> list[dict[str, Any]]:
    """Every run of a stand-in CLI, oldest first (empty if it never ran)."""
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines() if line]
