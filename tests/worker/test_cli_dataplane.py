"""``ctrl-worker seed-demo`` and ``ctrl-worker dataplane`` as real subprocesses.

``seed-demo`` runs on the embedded SQLite default of a temporary directory (``UNKEY_STATE_DIR``,
cwd there). ``dataplane`` runs against the session's MariaDB, serving only a region of its own
(``UNKEY_AVAILABLE_REGIONS``), so it never touches another test's rows; its seeded rows are
deleted after.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from tasks.db.engine import engine_for
from tasks.db.schema import (
    deployments,
    environment_runtime_settings,
    environments,
    projects,
    workspaces,
)
from tests.support.processes import ReadyProcess
from tests.support.seed import (
    SeedIds,
    cleanup,
    delete_dataplane_rows,
    fresh_region,
    insert_deployment,
    insert_topology,
    instances_of,
    seed_project,
)
from tests.support.waits import wait_for

CTRL_WORKER = str(Path(sys.executable).parent / "ctrl-worker")
ID_NAMES = ("workspace_id", "project_id", "environment_id", "deployment_id")


def _env(**extra: str) -> dict[str, str]:
    """This environment without UNKEY_*/PREFECT_* variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UNKEY_", "PREFECT_"))}
    return {**env, **extra}


def _ctrl_worker(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CTRL_WORKER, *args],
        cwd=state,
        env=_env(UNKEY_STATE_DIR=str(state)),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _printed_ids(stdout: str) -> dict[str, str]:
    pairs = (line.partition("=") for line in stdout.splitlines())
    return {name: value for name, sep, value in pairs if sep and name in ID_NAMES}


def test_seed_demo_writes_a_deployable_demo_and_prints_its_ids(tmp_path: Path) -> None:
    """After ``db init``, ``seed-demo`` prints the four ids (``name=value``) and the exact
    deploy command, and the rows exist: a ``production`` environment whose runtime settings
    mean every region x 1, and a ``pending`` deployment. Run again, it writes new rows."""
    assert _ctrl_worker("db", "init", state=tmp_path).returncode == 0
    result = _ctrl_worker("seed-demo", state=tmp_path)
    assert result.returncode == 0, result.stderr
    ids = _printed_ids(result.stdout)
    assert set(ids) == set(ID_NAMES)
    command = (
        f"ctrl-worker trigger deploy --param deployment_id={ids['deployment_id']} "
        "--param docker_image=nginx:1.27 --wait"
    )
    assert command in result.stdout.splitlines()

    url = f"sqlite:///{tmp_path / 'ctrl.db'}"
    with engine_for(url).connect() as connection:

        def one(table: sa.Table, row_id: str) -> sa.Row:
            return connection.execute(sa.select(table).where(table.c.id == row_id)).one()

        assert one(workspaces, ids["workspace_id"]).enabled
        assert one(projects, ids["project_id"]).workspace_id == ids["workspace_id"]
        environment = one(environments, ids["environment_id"])
        assert (environment.slug, environment.project_id) == ("production", ids["project_id"])
        deployment = one(deployments, ids["deployment_id"])
        assert (deployment.status, deployment.environment_id) == (
            "pending",
            ids["environment_id"],
        )
        region_config = connection.execute(
            sa.select(environment_runtime_settings.c.region_config).where(
                environment_runtime_settings.c.environment_id == ids["environment_id"]
            )
        ).scalar_one()
        assert (
            json.loads(region_config) if isinstance(region_config, str) else region_config
        ) == {}

    again = _printed_ids(_ctrl_worker("seed-demo", state=tmp_path).stdout)
    assert set(again) == set(ID_NAMES) and not set(again.values()) & set(ids.values())


def test_seed_demo_without_tables_exits_1_naming_db_init(tmp_path: Path) -> None:
    """``seed-demo`` on a database without tables writes nothing, exits 1 and says to run
    ``ctrl-worker db init``."""
    result = _ctrl_worker("seed-demo", state=tmp_path)
    assert result.returncode == 1
    assert "ctrl-worker db init" in result.stderr
    assert "Traceback" not in result.stderr
    assert "deployment_id=" not in result.stdout


def test_dataplane_reports_instances_then_exits_on_sigterm(mysql_url: str, tmp_path: Path) -> None:
    """``ctrl-worker dataplane`` says it is a simulation and which database (password
    masked), reports a seeded topology's instances ``running``, and exits 0 on SIGTERM."""
    ids = SeedIds()
    region = fresh_region()
    project = seed_project(mysql_url, ids)
    deployment_id = insert_deployment(mysql_url, ids, project)
    insert_topology(mysql_url, ids, project, deployment_id, region, desired_status="starting")
    dataplane = ReadyProcess(
        [CTRL_WORKER, "dataplane"],
        cwd=tmp_path,
        env=_env(
            UNKEY_STATE_DIR=str(tmp_path),
            UNKEY_DATABASE_PRIMARY=mysql_url,
            UNKEY_AVAILABLE_REGIONS=region,
            UNKEY_DATAPLANE_START_SECONDS="0",
        ),
        log_path=tmp_path / "dataplane.log",
        name="ctrl-worker dataplane",
    )
    try:
        dataplane.launch()
        rows = wait_for(
            lambda: instances_of(mysql_url, deployment_id), 60, "the simulated instance"
        )
        assert [row.status for row in rows] == ["running"]
        assert dataplane.stop(timeout=30) == 0
    finally:
        dataplane.kill()
        delete_dataplane_rows(mysql_url, ids.deployments)
        cleanup(mysql_url, ids)
    output = dataplane.tail(lines=200)
    assert "local data plane (simulation)" in output and "not for production" in output
    assert make_url(mysql_url).render_as_string(hide_password=True) in output
    password = make_url(mysql_url).password
    assert not password or f":{password}@" not in output
