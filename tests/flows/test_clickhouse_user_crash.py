"""ClickhouseUserService (flows/clickhouse_user.py) interrupted between storing the credentials
and creating the user: by ClickHouse refusing the CREATE USER, and by SIGKILL of a real process
while its CREATE USER is in flight at the stand-in admin connection
(``tests.support.clickhouse_standin``). Either way the resumed call creates the user with the
password stored the first time: never a second password.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pytest
from pytest_httpserver import HTTPServer

from blocks.clickhouse import ClickHouseQueryError
from flows.clickhouse_user import configure_clickhouse_user
from tests.flows.clickhouse_user_support import (
    admin_url,
    configure,
    created_with,
    stored,
)
from tests.flows.helpers import fails_at_once
from tests.support.clickhouse_standin import ClickHouseStandIn, Failure
from tests.support.fixtures import PrefectApi
from worker.kernel import run_records
from worker.kernel.steps import durable_call
from worker.settings import Settings

pytestmark = pytest.mark.mysql


def test_a_failure_after_the_insert_resumes_with_the_same_password(
    admin_settings: Settings, standin: ClickHouseStandIn, workspace: str
) -> None:
    """ClickHouse refuses the user once the credentials are stored: the call fails at once;
    the same call again (same idempotency key) replays the recorded ``store credentials``
    step (``created`` still true) and creates the user with the password stored the first
    time: one row, one ciphertext, one password in every CREATE USER."""
    standin.failures["CREATE USER"] = Failure(400, "62", "Code: 62. Syntax error ({sql})")
    key = f"test-{workspace}"
    with durable_call(key):
        fails_at_once(ClickHouseQueryError, configure_clickhouse_user, workspace_id=workspace)
    first, password = stored(workspace)

    del standin.failures["CREATE USER"]
    with durable_call(key):
        result = configure(workspace_id=workspace)

    assert result["created"] is True
    again, same = stored(workspace)
    assert again.password_encrypted == first.password_encrypted and same == password
    assert created_with(standin.statements) == [password, password]
    assert standin.users == {workspace: password}


_CHILD = """
import asyncio, sys
from flows.clickhouse_user import configure_clickhouse_user
from worker.kernel.steps import durable_call

with durable_call(sys.argv[1]):
    asyncio.run(configure_clickhouse_user(workspace_id=sys.argv[2]))
"""


async def _release_keys_of(pid: int) -> None:
    """What the worker's reconciler does for a dead local run: release its key leases."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        for record in run_records.list_records():
            if record.pid == pid:
                for lease in record.leases:
                    await client.release_concurrency_slots_with_lease(UUID(lease))
                run_records.delete_record(record.flow_run_id)


@pytest.mark.slow
def test_killed_between_insert_and_user_creation_resumes_without_a_second_password(
    prefect_api: PrefectApi,
    control_db: str,
    httpserver: HTTPServer,
    admin_settings: Settings,
    standin: ClickHouseStandIn,
    workspace: str,
    tmp_path: Path,
) -> None:
    """A real process runs the call and is SIGKILLed while its CREATE USER is in flight (the
    credentials are stored, the user not yet created). The same call resumed in another
    process creates the user with the password the killed one sent: the stored one, never a
    second password."""
    standin.hold_prefix = "CREATE USER"
    key = f"test-kill-{workspace}"
    env = {
        **os.environ,
        "UNKEY_DATABASE_PRIMARY": control_db,
        "UNKEY_STATE_DIR": str(prefect_api.state_dir),
        "UNKEY_CLICKHOUSE_ADMIN_URL": admin_url(httpserver),
    }
    log = tmp_path / "child.log"
    with log.open("wb") as out:
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, key, workspace],
            env=env,
            cwd=Path(__file__).resolve().parents[2],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 240
        while not standin.held.wait(0.5):
            if child.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the call never reached CREATE USER:\n{log.read_text()[-3000:]}")
        killed_with = created_with(standin.statements)
        first, password = stored(workspace)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        standin.hold_prefix = None
        standin.release.set()
    assert killed_with == [password]
    asyncio.run(_release_keys_of(child.pid))

    with durable_call(key):
        result = configure(workspace_id=workspace)

    assert result["created"] is True  # the killed attempt's recorded step, replayed
    again, same = stored(workspace)
    assert again.password_encrypted == first.password_encrypted and same == password
    assert created_with(standin.statements) == [password, password]
    assert standin.users == {workspace: password}
