"""Fixtures around a real local Prefect server and the worker running as a subprocess."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from worker import local_server


@dataclass
class PrefectApi:
    """The session's Prefect server and the state dir shared with the workers it serves."""

    server: local_server.LocalServer
    state_dir: Path

    @property
    def url(self) -> str:
        return self.server.api_url


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> Iterator[PrefectApi]:
    """A real Prefect server (SQLite, filesystem lease storage), for the whole session.

    The test process and every worker subprocess share its state dir, so a worker's step
    records (and flow results) are readable by the tests that wait for them.
    """
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_LOCAL_STORAGE_PATH,
        PREFECT_LOGGING_TO_API_ENABLED,
        PREFECT_RESULTS_PERSIST_BY_DEFAULT,
        temporary_settings,
    )

    state = tmp_path_factory.mktemp("ctrl-state")
    server = local_server.start(state)
    env = {
        "PREFECT_API_URL": server.api_url,
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(state / "results"),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "UNKEY_STATE_DIR": str(state),
    }
    previous = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        with temporary_settings(
            updates={
                PREFECT_API_URL: server.api_url,
                PREFECT_LOCAL_STORAGE_PATH: str(state / "results"),
                PREFECT_RESULTS_PERSIST_BY_DEFAULT: True,
                # The server stops before the log handler's last flush at exit.
                PREFECT_LOGGING_TO_API_ENABLED: False,
            }
        ):
            yield PrefectApi(server, state)
    finally:
        # Send queued events while the server is up: at exit Prefect would retry them
        # against a dead server for minutes.
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=30)
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        local_server.stop(state, server)


@pytest.fixture(scope="session")
def control_db(mysql_url: str, prefect_api: PrefectApi) -> Iterator[str]:
    """The session's MariaDB control-plane DB, with the kernel tests' log table, installed as
    this process's worker settings (flows called in-process use it)."""
    from tasks.db.engine import engine_for
    from tests.support.kernel_flows import test_metadata
    from worker.settings import Settings, use_settings

    test_metadata.create_all(engine_for(mysql_url))
    use_settings(
        Settings(_env_file=None, database_primary=mysql_url, state_dir=prefect_api.state_dir)
    )
    try:
        yield mysql_url
    finally:
        use_settings(None)


def step_log(url: str, tag: str) -> list[sa.Row]:
    """The kernel_step_log rows of ``tag``, in insertion order."""
    from tasks.db.engine import engine_for
    from tests.support.kernel_flows import kernel_step_log

    with engine_for(url).connect() as connection:
        return list(
            connection.execute(
                sa.select(kernel_step_log)
                .where(kernel_step_log.c.tag == tag)
                .order_by(kernel_step_log.c.pk)
            )
        )


@pytest.fixture
def worker_factory(prefect_api: PrefectApi, control_db: str, tmp_path: Path):
    """Start real workers (``tests.support.worker_main``) on the session's server and DB;
    every one still running at the end of the test is SIGKILLed."""
    from tests.support.worker_process import WorkerProcess

    started: list[WorkerProcess] = []

    def make(**env: str) -> WorkerProcess:
        worker = WorkerProcess(
            prefect_api.url,
            control_db,
            prefect_api.state_dir,
            tmp_path / f"worker{len(started)}.log",
            **env,
        )
        started.append(worker)
        return worker.start()

    yield make
    for worker in started:
        worker.kill()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on loopback (a real S3 HTTP API; it checks no signatures here)."""
    import subprocess
    import sys
    import time

    import httpx

    port = local_server.free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/moto-api/", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        server.kill()
        pytest.fail("moto server did not start")
    yield url
    server.kill()
    server.wait()


def s3_results_env(endpoint: str, bucket: str) -> dict[str, str]:
    """The worker settings that put step records in ``bucket`` (created here) on ``endpoint``."""
    import boto3

    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    ).create_bucket(Bucket=bucket)
    return {
        "UNKEY_RESULTS_S3_BUCKET": bucket,
        "UNKEY_RESULTS_S3_ENDPOINT_URL": endpoint,
        "UNKEY_RESULTS_S3_ACCESS_KEY_ID": "test",
        "UNKEY_RESULTS_S3_SECRET_ACCESS_KEY": "test-secret-value",
    }


@pytest.fixture
def chdb_analytics(tmp_path: Path) -> Iterator[Any]:
    """A real ClickHouse engine (chdb, in a temporary directory) with the analytics tables,
    installed as this process's ``UNKEY_CLICKHOUSE_URL`` on top of the settings already
    installed (the session's control DB, when a test uses it)."""
    from pydantic import SecretStr

    from blocks.clickhouse import analytics_client, close_cached_clients
    from tasks.clickhouse.schema import ensure_analytics_tables
    from tests.support.settings import installed_settings
    from worker.settings import worker_settings

    url = SecretStr(f"chdb://{tmp_path / 'analytics'}")
    with installed_settings(worker_settings().model_copy(update={"clickhouse_url": url})):
        client = analytics_client()
        assert client is not None
        ensure_analytics_tables(client)
        try:
            yield client
        finally:
            close_cached_clients()
