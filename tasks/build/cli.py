"""Build an image from a git commit with the backend's CLI, and push it.

Guarantees: the image is named as in the original, ``<registry>/<depot project>:<project>-
<deployment>``; with the docker backend there is no Depot project, so the repository part is
``unkey-<project id>`` (lowercased: image repositories must be lowercase; the tag keeps the
ids as they are, so names stay unique). The build context is
``https://github.com/<repository>.git#<commit sha>[:<context path>]`` and the Dockerfile
defaults to ``Dockerfile``. Commands (``UNKEY_BUILD_BACKEND``)::

    docker buildx build --push --platform P --file F --tag IMAGE --progress plain [SECRET] CONTEXT
    depot build --push --platform P --file F --tag IMAGE --project DEPOT_PROJECT \
        --progress plain [SECRET] CONTEXT

where SECRET is ``--secret id=GIT_AUTH_TOKEN.github.com,env=GIT_AUTH_TOKEN`` when there is a
GitHub token. Pushing the same tag again is harmless, so a build step re-run after a crash
just builds again (mostly from cache).

Security: the GitHub token reaches the builder only through the child's environment variable
``GIT_AUTH_TOKEN`` (named by ``--secret``), never on its command line; the Depot token
(``UNKEY_REGISTRY_PASSWORD``) only as ``DEPOT_TOKEN``. Registry credentials go into a
``config.json`` in a temporary ``DOCKER_CONFIG`` directory (mode 0600, removed afterwards),
never through ``docker login -p``. The child does not inherit the worker's ``UNKEY_*`` and
``PREFECT_*`` variables. Every line of output is redacted of those secrets before the caller
sees it. ``BuildRequest`` hides its token from ``repr``; never persist one.

Error handling: a missing CLI is a ``ConfigError`` naming ``UNKEY_BUILD_BACKEND``; a non-zero
exit is a terminal ``BuildFailedError`` carrying the last lines of output; a timeout, or the
CLI killed by a signal, is a retryable ``BuildInterruptedError``. The CLI runs as an asyncio
subprocess in its own process group, stopped on a timeout or cancellation before the error
(or the ``CancelledError``) propagates (``tasks.build.process``).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from tasks.build.process import ProcessStartError, run_process_group
from tasks.build.progress import BuildProgress, BuildStep, depot_build_id
from tasks.build.registry import registry_config_dir, registry_reference
from tasks.http import redact
from worker.kernel.clock import now_ms
from worker.kernel.errors import (
    ConfigError,
    InvalidParameterError,
    RetryableError,
    TerminalError,
)
from worker.settings import Settings, env_name, worker_settings

__all__ = [
    "GIT_AUTH_SECRET",
    "BuildBackend",
    "BuildFailedError",
    "BuildInterruptedError",
    "BuildRequest",
    "BuildResult",
    "build_command",
    "build_context_url",
    "build_request",
    "dockerfile_or_default",
    "image_name",
    "run_build",
]

BuildBackend = Literal["docker", "depot"]

# BuildKit looks up the token for a git context on github.com under this secret id.
GIT_AUTH_SECRET = "GIT_AUTH_TOKEN.github.com"
_TOKEN_ENV = "GIT_AUTH_TOKEN"
_TAIL_LINES = 20
_TAIL_LINE_CHARS = 1000
# Characters that cannot change what the context URL means (no '#', ':', '?', spaces).
_REPOSITORY = re.compile(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+")
_COMMIT = re.compile(r"[A-Za-z0-9_./-]+")


class BuildFailedError(TerminalError):
    """The build CLI exited non-zero: the build itself failed (the message has the output's
    last lines, redacted). Retrying the same commit would fail the same way."""


class BuildInterruptedError(RetryableError):
    """The build did not finish: it timed out or the CLI was killed by a signal."""


@dataclass(frozen=True)
class BuildRequest:
    """One build. Holds the GitHub token (hidden from ``repr``): never persist or log it."""

    backend: BuildBackend
    platform: str
    context_url: str
    dockerfile: str
    image: str
    depot_project_id: str | None
    token: str | None = field(repr=False)
    timeout_seconds: float


@dataclass(frozen=True)
class BuildResult:
    """What a finished build tells (no secret: safe to persist as a step result).

    Attributes:
        image: the pushed image.
        build_id: Depot's build id, or ``build_<uuid hex>`` (docker, or depot not saying).
        steps: the BuildKit steps, for ClickHouse.
        log_lines: how many lines of output the build printed.
    """

    image: str
    build_id: str
    steps: list[BuildStep]
    log_lines: int


def image_name(
    registry_url: str, project_id: str, deployment_id: str, depot_project_id: str | None
) -> str:
    """The image a build pushes: ``<registry>/<depot project>:<project>-<deployment>``.

    Args:
        registry_url: ``UNKEY_REGISTRY_URL`` (a scheme and trailing ``/`` are dropped).
        project_id: the Unkey project id.
        deployment_id: the deployment id.
        depot_project_id: the Depot project; ``None``/empty (docker backend) uses
            ``unkey-<project id>`` (lowercased) as the repository instead.

    Returns:
        The full image reference.
    """
    registry = registry_reference(registry_url)
    repository = depot_project_id or f"unkey-{project_id}".lower()
    return f"{registry}/{repository}:{project_id}-{deployment_id}"


def build_context_url(repository: str, commit_sha: str, context_path: str = "") -> str:
    """BuildKit's git context: ``https://github.com/<repo>.git#<sha>[:<context path>]``.

    The context path is trimmed, one leading ``/`` is removed and a bare ``.`` means none.

    Args:
        repository: ``owner/repo``.
        commit_sha: the commit to build.
        context_path: the directory in the repository to build from (``""``: the root).

    Returns:
        The context URL.

    Raises:
        InvalidParameterError: ``repository`` is not ``owner/repo``, or ``commit_sha`` has
            characters that would change the URL's meaning.
    """
    if not _REPOSITORY.fullmatch(repository):
        raise InvalidParameterError("repository", "must be 'owner/repo'")
    if not _COMMIT.fullmatch(commit_sha):
        raise InvalidParameterError("commit_sha", "must be a commit SHA")
    path = context_path.strip().removeprefix("/")
    if path == ".":
        path = ""
    suffix = f":{path}" if path else ""
    return f"https://github.com/{repository}.git#{commit_sha}{suffix}"


def dockerfile_or_default(dockerfile_path: str) -> str:
    """The Dockerfile to build: ``dockerfile_path`` trimmed, or ``Dockerfile`` when empty.

    Args:
        dockerfile_path: the deploy's ``dockerfile_path`` (relative to the context).

    Returns:
        The path passed to ``--file``.
    """
    return dockerfile_path.strip() or "Dockerfile"


def build_request(
    settings: Settings,
    *,
    project_id: str,
    deployment_id: str,
    repository: str,
    commit_sha: str,
    context_path: str,
    dockerfile_path: str,
    depot_project_id: str | None,
    token: str | None,
) -> BuildRequest:
    """The build of a deploy's git source, named by the rules above.

    Args:
        settings: the worker's settings (backend, platform, registry, timeout).
        project_id: the Unkey project id.
        deployment_id: the deployment id.
        repository: ``owner/repo``.
        commit_sha: the commit to build.
        context_path: the deploy's ``context_path``.
        dockerfile_path: the deploy's ``dockerfile_path``.
        depot_project_id: the project's Depot project (required by the depot backend).
        token: the GitHub installation token, or None (public repositories).

    Returns:
        The request for ``run_build``.

    Raises:
        ConfigError: ``UNKEY_REGISTRY_URL`` is not set, or the depot backend has no project.
        InvalidParameterError: a bad repository or commit (see ``build_context_url``).
    """
    if not settings.registry_url:
        raise ConfigError(f"{env_name('registry_url')} is required to build from git")
    if settings.build_backend == "depot" and not depot_project_id:
        raise ConfigError(f"{env_name('build_backend')}=depot needs the project's Depot project")
    depot_project = depot_project_id if settings.build_backend == "depot" else None
    return BuildRequest(
        backend=settings.build_backend,
        platform=settings.build_platform,
        context_url=build_context_url(repository, commit_sha, context_path),
        dockerfile=dockerfile_or_default(dockerfile_path),
        image=image_name(settings.registry_url, project_id, deployment_id, depot_project),
        depot_project_id=depot_project,
        token=token,
        timeout_seconds=settings.build_timeout_seconds,
    )


def build_command(request: BuildRequest) -> list[str]:
    """The CLI's argv (``argv[0]`` is the command's name; no secret is ever in it).

    Args:
        request: the build.

    Returns:
        The command line.

    Raises:
        ConfigError: the depot backend without a Depot project.
    """
    if request.backend == "depot":
        if not request.depot_project_id:
            raise ConfigError(f"{env_name('build_backend')}=depot needs a Depot project")
        head = ["depot", "build"]
        project = ["--project", request.depot_project_id]
    else:
        head, project = ["docker", "buildx", "build"], []
    secret = ["--secret", f"id={GIT_AUTH_SECRET},env={_TOKEN_ENV}"] if request.token else []
    return [
        *head,
        "--push",
        *("--platform", request.platform),
        *("--file", request.dockerfile),
        *("--tag", request.image),
        *project,
        *("--progress", "plain"),
        *secret,
        request.context_url,
    ]


async def run_build(
    request: BuildRequest, on_line: Callable[[str], None], settings: Settings | None = None
) -> BuildResult:
    """Run the build CLI to the end, streaming its (redacted) output to ``on_line``.

    Args:
        request: the build.
        on_line: called with each line of stdout and stderr (the caller logs them); an
            exception it raises stops the build.
        settings: the worker's settings (registry credentials); default: this process's.

    Returns:
        The pushed image, the build id, the steps and the number of lines.

    Raises:
        ConfigError: the CLI is not on PATH, or the depot backend without a token.
        BuildFailedError: the CLI exited non-zero (terminal).
        BuildInterruptedError: timeout, or the CLI was killed by a signal (retryable).
        asyncio.CancelledError: the coroutine was cancelled (the CLI is stopped first).
    """
    if settings is None:
        settings = worker_settings()
    argv = build_command(request)
    executable = shutil.which(argv[0])
    if executable is None:
        raise ConfigError(
            f"{env_name('build_backend')}={request.backend}: the '{argv[0]}' command is not on PATH"
        )
    password = settings.registry_password.get_secret_value() if settings.registry_password else ""
    if request.backend == "depot" and not password:
        raise ConfigError(f"{env_name('registry_password')} (the Depot token) is required")
    output = _Output(on_line, secrets=(request.token, password))
    with registry_config_dir(settings.registry_url, settings.registry_username, password) as cfg:
        env = _child_env(request, depot_token=password, docker_config=cfg)
        try:
            returncode = await run_process_group(
                [executable, *argv[1:]], env, output.line, request.timeout_seconds
            )
        except TimeoutError:
            raise BuildInterruptedError(
                f"build of {request.image} interrupted: no result after "
                f"{request.timeout_seconds:g} s"
            ) from None
        except ProcessStartError as exc:
            raise ConfigError(f"{env_name('build_backend')}={request.backend}: {exc}") from None
    if returncode < 0:
        raise BuildInterruptedError(
            f"build of {request.image} interrupted: {argv[0]} was killed by signal {-returncode}"
        )
    if returncode != 0:
        tail = "\n".join(output.tail)
        raise BuildFailedError(f"build failed: {argv[0]} exited with status {returncode}:\n{tail}")
    build_id = output.build_id if request.backend == "depot" else None
    return BuildResult(
        image=request.image,
        build_id=build_id or f"build_{uuid.uuid4().hex}",
        steps=output.progress.steps(),
        log_lines=output.lines,
    )


class _Output:
    """The CLI's output: redacted, passed on, parsed, counted, and its tail kept."""

    def __init__(self, on_line: Callable[[str], None], secrets: tuple[str | None, ...]) -> None:
        self._on_line = on_line
        self._secrets = secrets
        self.progress = BuildProgress()
        self.tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self.lines = 0
        self.build_id: str | None = None

    def line(self, raw: bytes) -> None:
        text = redact(raw.decode("utf-8", errors="replace").rstrip("\r"), self._secrets)
        self.lines += 1
        self.tail.append(text[:_TAIL_LINE_CHARS])
        self.progress.feed(text, now_ms())
        if self.build_id is None:
            self.build_id = depot_build_id(text)
        self._on_line(text)


def _child_env(
    request: BuildRequest, *, depot_token: str, docker_config: str | None
) -> dict[str, str]:
    """The CLI's environment: the worker's, without its own secrets, plus the build's."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("UNKEY_", "PREFECT_")) and name not in (_TOKEN_ENV, "DEPOT_TOKEN")
    }
    if request.token:
        env[_TOKEN_ENV] = request.token
    if request.backend == "depot":
        env["DEPOT_TOKEN"] = depot_token
    if docker_config is not None:
        env["DOCKER_CONFIG"] = docker_config
    return env
