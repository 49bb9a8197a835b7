"""Building from git (tasks/build): naming, the progress output, the build CLI.

These protect SPEC §4 DeployService "build backends" and reference §13 items 16-18: the
original's image and context naming, the GitHub token reaching the builder only through the
child's environment, and build failures terminal while interrupted builds retry. The
``docker``/``depot`` CLIs are stand-in scripts (tests/support/build_cli.py) first on PATH.
The Depot project is tested in test_build_depot.py.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
from pathlib import Path

import pytest

from tasks.build import (
    BuildFailedError,
    BuildInterruptedError,
    BuildProgress,
    BuildRequest,
    BuildResult,
    build_context_url,
    build_request,
    depot_build_id,
    dockerfile_or_default,
    image_name,
    run_build,
)
from tests.support.build_cli import DEPOT_BUILD_ID, install_fake_build_cli, read_build_records
from tests.support.waits import wait_for
from worker.kernel.errors import (
    ConfigError,
    InvalidParameterError,
    RetryableError,
    TerminalError,
)
from worker.settings import Settings

TOKEN = "ghs_buildTokenValue0123456789abcdef"
DEPOT_TOKEN = "depot-secret-token-0123456789"
SHA = "0123456789abcdef0123456789abcdef01234567"


# -- naming ---------------------------------------------------------------------------------


def test_image_name_is_registry_depot_project_and_project_deployment_tag() -> None:
    """The image is the original's ``<registry>/<depot project>:<project>-<deployment>``."""
    assert (
        image_name("registry.depot.dev", "proj_1", "d_2", "abc123")
        == "registry.depot.dev/abc123:proj_1-d_2"
    )
    assert image_name("https://ghcr.io/acme/", "p", "d", "x") == "ghcr.io/acme/x:p-d"


def test_image_name_without_depot_project_uses_lowercase_unkey_repository() -> None:
    """The docker backend has no Depot project: the repository is ``unkey-<project>``,
    lowercased (repositories must be), while the tag keeps the ids exactly."""
    assert (
        image_name("localhost:5000", "proj_AbC", "d_Xy", None)
        == "localhost:5000/unkey-proj_abc:proj_AbC-d_Xy"
    )


@pytest.mark.parametrize(
    ("context_path", "suffix"),
    [
        ("", ""),
        ("services/api", ":services/api"),
        ("/services/api", ":services/api"),
        ("  /app  ", ":app"),
        (".", ""),
        (" . ", ""),
        ("/", ""),
        ("/.", ""),
        ("./app", ":./app"),
    ],
)
def test_build_context_url_trims_context_path_like_the_original(context_path, suffix) -> None:
    """The context is ``https://github.com/<repo>.git#<sha>[:<path>]``; the path is
    trimmed, a leading ``/`` and a bare ``.`` are removed."""
    assert (
        build_context_url("acme/app", SHA, context_path)
        == f"https://github.com/acme/app.git#{SHA}{suffix}"
    )


@pytest.mark.parametrize(
    ("repository", "commit"),
    [("acme", SHA), ("acme/app#main", SHA), ("acme/app", "abc:evil"), ("acme/app", "")],
)
def test_build_context_url_refuses_input_that_changes_the_url(repository, commit) -> None:
    """A repository that is not ``owner/repo`` or a commit with URL syntax is refused."""
    with pytest.raises(InvalidParameterError):
        build_context_url(repository, commit, "")


def test_dockerfile_defaults_to_dockerfile() -> None:
    """An empty dockerfile path means ``Dockerfile``."""
    assert dockerfile_or_default("") == "Dockerfile"
    assert dockerfile_or_default("  ") == "Dockerfile"
    assert dockerfile_or_default(" docker/prod.Dockerfile ") == "docker/prod.Dockerfile"


def test_package_exports_every_public_name() -> None:
    """``tasks.build`` re-exports the public names of its modules, and only real ones."""
    import tasks.build as package
    from tasks.build import cli, depot, progress

    assert set(cli.__all__) | set(depot.__all__) | set(progress.__all__) == set(package.__all__)
    assert all(hasattr(package, name) for name in package.__all__)


def test_build_request_repr_hides_the_token() -> None:
    """A BuildRequest's repr (logs, tracebacks) never shows the GitHub token."""
    request = make_request(settings_for("docker"))
    assert TOKEN not in repr(request) and TOKEN not in str(request)


# -- the progress output --------------------------------------------------------------------


def test_progress_parser_reads_done_cached_error_and_repeated_headers() -> None:
    """Plain progress becomes one record per vertex: cached, done, failed, and a header
    printed again on interleaving is not a second step."""
    progress = BuildProgress()
    lines = [
        "#1 [internal] load build definition from Dockerfile",
        "#1 DONE 0.1s",
        "#2 [1/2] FROM alpine",
        "#2 CACHED",
        "#3 [2/2] RUN make",
        "#3 0.101 compiling",
        "#3 [2/2] RUN make",
        '#3 ERROR: process "/bin/sh -c make" did not complete successfully: exit code: 2',
        "#4 [internal] load .dockerignore",
        "------",
    ]
    for at, line in enumerate(lines, start=1000):
        progress.feed(line, at)
    steps = {step.number: step for step in progress.steps()}
    assert [s.name for s in steps.values()] == [
        "[internal] load build definition from Dockerfile",
        "[1/2] FROM alpine",
        "[2/2] RUN make",
        "[internal] load .dockerignore",
    ]
    assert (steps[1].started_at, steps[1].completed_at, steps[1].cached) == (1000, 1001, False)
    assert steps[2].cached and steps[2].completed_at == 1003
    assert steps[3].has_logs and steps[3].error is not None and "exit code: 2" in steps[3].error
    assert steps[4].completed_at is None


def test_depot_build_id_is_read_from_link_or_label() -> None:
    """Depot's build id comes from its build link or a ``Build ID:`` line."""
    link = "[depot] build: https://depot.dev/orgs/o1/projects/p1/builds/abc123XYZ"
    assert depot_build_id(link) == "abc123XYZ"
    assert depot_build_id("Build ID: k9k9k9") == "k9k9k9"
    assert depot_build_id("#1 DONE 0.1s") is None


# -- the build CLI --------------------------------------------------------------------------


def settings_for(backend: str) -> Settings:
    return Settings(
        _env_file=None,
        build_backend=backend,
        build_platform="linux/arm64",
        registry_url="registry.example.test",
        registry_username="x-token",
        registry_password=DEPOT_TOKEN,
        build_timeout_seconds=120,
    )


def make_request(
    settings: Settings, token: str | None = TOKEN, timeout: float | None = None
) -> BuildRequest:
    request = build_request(
        settings,
        project_id="proj_Ab1",
        deployment_id="d_Xy2",
        repository="acme/app",
        commit_sha=SHA,
        context_path="/services/api",
        dockerfile_path="",
        depot_project_id="dprj1" if settings.build_backend == "depot" else None,
        token=token,
    )
    return dataclasses.replace(request, timeout_seconds=timeout) if timeout else request


@pytest.fixture
def bin_dir(tmp_path: Path, monkeypatch) -> Path:
    """A directory first on PATH for the stand-in CLIs; the worker has a secret in its env."""
    directory = tmp_path / "bin"
    directory.mkdir()
    monkeypatch.setenv("PATH", f"{directory}:{os.environ['PATH']}")
    monkeypatch.setenv("UNKEY_GITHUB_PRIVATE_KEY_PEM", "worker-private-key")
    return directory


def build(request: BuildRequest, settings: Settings, lines: list[str]) -> BuildResult:
    return asyncio.run(run_build(request, lines.append, settings))


CONTEXT = f"https://github.com/acme/app.git#{SHA}:services/api"
SECRET_FLAG = ["--secret", "id=GIT_AUTH_TOKEN.github.com,env=GIT_AUTH_TOKEN"]


def test_docker_build_command_and_token_only_in_environment(bin_dir) -> None:
    """The docker backend runs exactly ``docker buildx build --push ...`` with the context
    URL, platform, image and secret flag; the token is in GIT_AUTH_TOKEN and nowhere in
    argv; the worker's UNKEY_* variables are not passed on."""
    record = install_fake_build_cli(bin_dir, "docker")
    settings = settings_for("docker")
    lines: list[str] = []
    result = build(make_request(settings), settings, lines)

    [run] = read_build_records(record)
    image = "registry.example.test/unkey-proj_ab1:proj_Ab1-d_Xy2"
    assert run["argv"][1:] == [
        "buildx", "build", "--push", "--platform", "linux/arm64", "--file", "Dockerfile",
        "--tag", image, "--progress", "plain", *SECRET_FLAG, CONTEXT,
    ]  # fmt: skip
    assert run["env"]["GIT_AUTH_TOKEN"] == TOKEN
    assert not any(TOKEN in arg for arg in run["argv"])
    assert "DEPOT_TOKEN" not in run["env"]
    assert not any(name.startswith("UNKEY_") for name in run["env"])
    assert result.image == image
    assert result.build_id.startswith("build_") and len(result.build_id) == 38


def test_registry_credentials_go_through_a_temporary_docker_config(
    bin_dir, tmp_path, monkeypatch
) -> None:
    """Registry login is a config.json (mode 0600) in a temporary DOCKER_CONFIG, removed
    after the build; no password on the command line. The user's CLI plugins and current
    context still apply."""
    user_config = tmp_path / "user-docker"
    (user_config / "cli-plugins").mkdir(parents=True)
    (user_config / "config.json").write_text(json.dumps({"currentContext": "remote"}))
    monkeypatch.setenv("DOCKER_CONFIG", str(user_config))
    record = install_fake_build_cli(bin_dir, "docker")
    settings = settings_for("docker")
    build(make_request(settings), settings, [])

    [run] = read_build_records(record)
    auth = base64.b64encode(f"x-token:{DEPOT_TOKEN}".encode()).decode()
    assert run["docker_config"]["auths"] == {"registry.example.test": {"auth": auth}}
    assert run["docker_config_mode"] == 0o600
    assert run["docker_config"]["currentContext"] == "remote"
    assert run["docker_config_entries"] == ["cli-plugins", "config.json"]
    assert not Path(run["docker_config_dir"]).exists()
    assert not any(DEPOT_TOKEN in arg for arg in run["argv"])


def test_depot_build_command_project_token_and_build_id(bin_dir) -> None:
    """The depot backend runs exactly ``depot build --push ... --project <id> ...`` with
    DEPOT_TOKEN in its environment, and the build id is the one depot printed."""
    record = install_fake_build_cli(bin_dir, "depot")
    settings = settings_for("depot")
    result = build(make_request(settings), settings, [])

    [run] = read_build_records(record)
    image = "registry.example.test/dprj1:proj_Ab1-d_Xy2"
    assert run["argv"][1:] == [
        "build", "--push", "--platform", "linux/arm64", "--file", "Dockerfile",
        "--tag", image, "--project", "dprj1", "--progress", "plain", *SECRET_FLAG, CONTEXT,
    ]  # fmt: skip
    assert run["env"]["DEPOT_TOKEN"] == DEPOT_TOKEN
    assert run["env"]["GIT_AUTH_TOKEN"] == TOKEN
    assert not any(TOKEN in arg or DEPOT_TOKEN in arg for arg in run["argv"])
    assert result.build_id == DEPOT_BUILD_ID


def test_build_without_token_has_no_secret(bin_dir, monkeypatch) -> None:
    """An unauthenticated build (no token) passes no --secret and no GIT_AUTH_TOKEN, not
    even one inherited from the worker's environment."""
    monkeypatch.setenv("GIT_AUTH_TOKEN", "inherited-token")
    record = install_fake_build_cli(bin_dir, "docker")
    settings = settings_for("docker")
    build(make_request(settings, token=None), settings, [])

    [run] = read_build_records(record)
    assert "--secret" not in run["argv"]
    assert "GIT_AUTH_TOKEN" not in run["env"]


def test_output_is_streamed_and_steps_are_parsed(bin_dir) -> None:
    """Every output line reaches the caller, and the BuildKit steps come back with their
    cache hits and completion times."""
    install_fake_build_cli(bin_dir, "docker")
    settings = settings_for("docker")
    lines: list[str] = []
    result = build(make_request(settings), settings, lines)

    assert "#3 CACHED" in lines and result.log_lines == len(lines)
    names = {step.name: step for step in result.steps}
    assert names["[1/2] FROM docker.io/library/alpine:3.20"].cached
    run_step = names["[2/2] RUN echo built"]
    assert not run_step.cached and run_step.has_logs and run_step.error is None
    assert all(step.completed_at is not None for step in result.steps)


def test_nonzero_exit_is_a_terminal_build_failure_with_redacted_output(bin_dir) -> None:
    """A CLI exiting non-zero is a terminal BuildFailedError carrying the last lines, with
    the token redacted there and in what the caller saw."""
    lines = ["#1 [1/1] RUN git clone", "#1 ERROR: auth failed for $GIT_AUTH_TOKEN"]
    install_fake_build_cli(bin_dir, "docker", exit_code=1, lines=lines)
    settings = settings_for("docker")
    seen: list[str] = []
    with pytest.raises(BuildFailedError, match="build failed") as caught:
        build(make_request(settings), settings, seen)

    assert isinstance(caught.value, TerminalError)
    assert "auth failed for [redacted]" in str(caught.value)
    assert TOKEN not in str(caught.value) and not any(TOKEN in line for line in seen)


def test_cli_killed_by_a_signal_is_an_interrupted_build(bin_dir) -> None:
    """A CLI killed from outside (OOM killer, an operator) did not fail the build: the
    error is the retryable BuildInterruptedError, not a terminal failure."""
    install_fake_build_cli(bin_dir, "docker", exit_code=-9)
    settings = settings_for("docker")
    with pytest.raises(BuildInterruptedError, match="signal 9"):
        build(make_request(settings), settings, [])


def gone(pid: int) -> bool:
    """The process no longer runs (exited and reaped, or a zombie nobody reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def test_timeout_stops_the_process_group_and_is_retryable(bin_dir) -> None:
    """A build past its timeout is a retryable BuildInterruptedError, and the CLI and
    what it started are gone."""
    record = install_fake_build_cli(bin_dir, "docker", sleep=120)
    settings = settings_for("docker")
    with pytest.raises(BuildInterruptedError, match="interrupted") as caught:
        build(make_request(settings, timeout=1.0), settings, [])

    assert isinstance(caught.value, RetryableError)
    [run] = read_build_records(record)
    assert gone(run["pid"])
    wait_for(lambda: gone(run["child_pid"]), 10, "the CLI's child to be killed")


def test_cancellation_stops_the_cli_and_propagates(bin_dir) -> None:
    """Cancelling the build coroutine stops the CLI's process group and re-raises
    CancelledError."""
    record = install_fake_build_cli(bin_dir, "docker", sleep=120)
    settings = settings_for("docker")

    async def cancel_after_first_line() -> None:
        started = asyncio.Event()
        task = asyncio.create_task(
            run_build(make_request(settings), lambda _line: started.set(), settings)
        )
        await asyncio.wait_for(started.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_after_first_line())
    [run] = read_build_records(record)
    assert gone(run["pid"])
    wait_for(lambda: gone(run["child_pid"]), 10, "the CLI's child to be killed")


@pytest.mark.parametrize("backend", ["docker", "depot"])
def test_missing_cli_is_a_config_error_naming_the_backend(tmp_path, monkeypatch, backend) -> None:
    """No ``docker``/``depot`` on PATH is a ConfigError naming UNKEY_BUILD_BACKEND."""
    monkeypatch.setenv("PATH", str(tmp_path))
    settings = settings_for(backend)
    with pytest.raises(ConfigError, match="UNKEY_BUILD_BACKEND"):
        build(make_request(settings), settings, [])


def test_build_request_needs_a_registry() -> None:
    """Building from git without UNKEY_REGISTRY_URL is a ConfigError naming it."""
    settings = Settings(_env_file=None)
    with pytest.raises(ConfigError, match="UNKEY_REGISTRY_URL"):
        make_request(settings)
