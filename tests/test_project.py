"""The project as others use it: the deployment files, the installed command, the docs.

These protect the public contract (SPEC §1, §2.1, §2.3): ``prefect.yaml`` deploys exactly what
``ctrl-worker run`` serves, every entrypoint loads, the environment installs cleanly, the
console script answers, and the README names every setting.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments import (
    CATALOGUE,
    DEPLOYMENT_NAME,
    JOB_VARIABLES,
    POOL_NAME,
    PULL_STEPS,
    WORK_QUEUE_NAME,
    DeploymentSpec,
)

REPO = Path(__file__).resolve().parents[1]
CTRL_WORKER = str(Path(sys.executable).parent / "ctrl-worker")
POOL = {"name": POOL_NAME, "work_queue_name": WORK_QUEUE_NAME, "job_variables": JOB_VARIABLES}


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any UNKEY_* or PREFECT_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UNKEY_", "PREFECT_"))}
    env.update(extra)
    return env


def _ctrl_worker(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The installed console script, run with no UNKEY_/PREFECT_ variable but ``env``."""
    return subprocess.run(
        [CTRL_WORKER, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=clean_env(**env),
        timeout=60,
    )


def _prefect_yaml() -> dict[str, Any]:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def _expected_schedules(spec: DeploymentSpec) -> list[dict[str, Any]]:
    return [{"cron": spec.cron, "timezone": "UTC", "active": True}] if spec.cron else []


def test_prefect_yaml_deploys_exactly_the_catalogue() -> None:
    """prefect.yaml and deployments.CATALOGUE (what `ctrl-worker run` registers) list the same
    deployments: names, entrypoints, work pool and its job variables, schedules (UTC),
    parameters, unenforced parameter schema, each once."""
    config = _prefect_yaml()
    assert config["name"] == "ctrl-worker"
    assert config["prefect-version"] == "3.8.8"
    deployments = config["deployments"]
    entrypoints = [d["entrypoint"] for d in deployments]
    assert len(entrypoints) == len(set(entrypoints)), "an entrypoint is deployed twice"
    assert sorted(entrypoints) == sorted(spec.entrypoint for spec in CATALOGUE)

    by_entrypoint = {d["entrypoint"]: d for d in deployments}
    for spec in CATALOGUE:
        deployment = by_entrypoint[spec.entrypoint]
        assert deployment["name"] == DEPLOYMENT_NAME, spec.entrypoint
        assert deployment["work_pool"] == POOL, spec.entrypoint
        assert deployment["enforce_parameter_schema"] is False, spec.entrypoint
        assert (deployment.get("schedules") or []) == _expected_schedules(spec), spec.entrypoint
        assert (deployment.get("parameters") or {}) == spec.parameters, spec.entrypoint
        if spec.description:
            assert deployment.get("description") == spec.description, spec.entrypoint


def test_prefect_yaml_pull_step_enters_the_code_directory() -> None:
    """A pool worker's flow-run process moves into the code already on its disk (no upload)."""
    assert (
        _prefect_yaml()["pull"]
        == PULL_STEPS
        == [
            {
                "prefect.deployments.steps.set_working_directory": {
                    "directory": "{{ $CTRL_WORKER_DIR }}"
                }
            }
        ]
    )


@pytest.mark.parametrize("spec", CATALOGUE, ids=lambda spec: spec.full_name)
def test_every_entrypoint_loads_its_flow(spec: DeploymentSpec, monkeypatch) -> None:
    """Each entrypoint loads as `prefect deploy` and a pool worker load it (a file path from
    the repository root) and gives a flow named as the deployment's flow."""
    from prefect import Flow
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(REPO)
    flow = load_flow_from_entrypoint(spec.entrypoint)
    assert isinstance(flow, Flow)
    assert flow.name == spec.flow_name
    assert spec.load().name == spec.flow_name


def test_installed_dependencies_are_consistent() -> None:
    """`pip check` is clean: the pins (prefect 3.8.8, SQLAlchemy < 2.1, FastAPI) hold together."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "args",
    [[], ["run"], ["check-config"], ["db"], ["db", "init"], ["trigger"]],
    ids=lambda args: " ".join(args) or "ctrl-worker",
)
def test_every_subcommand_has_help(args: list[str], tmp_path: Path) -> None:
    """The console script is installed and every (sub)command answers `--help` with exit 0."""
    result = _ctrl_worker(*args, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ctrl-worker")


def test_check_config_passes_with_no_configuration(tmp_path: Path) -> None:
    """Embedded defaults need no configuration at all: `check-config` exits 0."""
    result = _ctrl_worker("check-config", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "configuration ok" in result.stdout


def test_check_config_names_the_bad_variable(tmp_path: Path) -> None:
    """A bad setting makes `check-config` exit 1 with a message naming the variable."""
    result = _ctrl_worker("check-config", cwd=tmp_path, UNKEY_BUILD_PLATFORM="windows/amd64")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "UNKEY_BUILD_PLATFORM" in result.stdout
    assert "windows" in result.stdout


def test_trigger_of_an_unknown_flow_is_bad_usage_even_without_a_server(tmp_path: Path) -> None:
    """`ctrl-worker trigger` with an unknown flow exits 2 (bad usage) and names the known
    flows, even where no Prefect server runs; a malformed --param is bad usage too."""
    for args in (["nope"], ["next_version", "--param", "no-equals-sign"]):
        result = _ctrl_worker("trigger", *args, cwd=tmp_path)
        assert result.returncode == 2, result.stdout + result.stderr
    assert "next_version" in result.stderr or "K=V" in result.stderr


def test_trigger_without_a_server_is_an_error_not_bad_usage(tmp_path: Path) -> None:
    """A known flow with no Prefect API to reach: exit 1, saying how to start one."""
    result = _ctrl_worker("trigger", "next_version", "--param", "region=x", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "ctrl-worker run" in result.stderr


def test_readme_documents_every_setting() -> None:
    """Every field of worker.settings.Settings appears in the README as its UNKEY_ variable."""
    from worker.settings import Settings, env_name

    readme = (REPO / "README.md").read_text()
    missing = [
        env_name(field)
        for field in Settings.model_fields
        if not re.search(rf"`{env_name(field)}`", readme)
    ]
    assert not missing, f"README.md does not document {missing}"


@pytest.mark.parametrize("script", [".ci/run", "scripts/ensure-servers.sh"])
def test_scripts_are_executable_bash(script: str) -> None:
    """CI calls these directly: they must be executable and parse as bash."""
    path = REPO / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
