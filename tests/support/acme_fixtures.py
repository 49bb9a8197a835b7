"""Session fixtures: a real pebble ACME server and the pebble-challtestsrv DNS it resolves with.

One pair per test session (each starts in under a second, but tests share them): tests must
use their own domain names and clear the DNS records they set. HTTP-01 validation goes to
``http://127.0.0.1:<pebble.http01_port>``, a free port chosen here where nothing listens until
a test starts its responder there. A missing binary fails the test with how to install it
(``scripts/ensure-servers.sh``): never a silent skip.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.support.acme_servers import (
    CHALLTESTSRV,
    PEBBLE,
    Challtestsrv,
    Pebble,
    start_challtestsrv,
    start_pebble,
)
from worker.local_server import free_port


def _require_binaries() -> None:
    """Fail (not skip: CI installs them) when pebble's binaries are missing."""
    missing = [path for path in (PEBBLE, CHALLTESTSRV) if shutil.which(path) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed (run scripts/ensure-servers.sh)")


@pytest.fixture(scope="session")
def challtestsrv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Challtestsrv]:
    """A running pebble-challtestsrv (DNS only: every A is 127.0.0.1), for the whole session."""
    _require_binaries()
    server = start_challtestsrv(tmp_path_factory.mktemp("challtestsrv"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pebble(
    tmp_path_factory: pytest.TempPathFactory, challtestsrv: Challtestsrv
) -> Iterator[Pebble]:
    """A running pebble resolving through ``challtestsrv``, validating HTTP-01 on
    127.0.0.1:``pebble.http01_port``, for the whole session."""
    _require_binaries()
    server = start_pebble(tmp_path_factory.mktemp("pebble"), challtestsrv, free_port())
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fast_acme_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The acme library sleeps 1 s between its authorization and finalization polls (hard
    coded) and pebble answers at once: cap its sleeps at 50 ms in this process."""
    from acme import client as acme_client

    real_sleep = acme_client.time.sleep
    monkeypatch.setattr(acme_client.time, "sleep", lambda seconds: real_sleep(min(seconds, 0.05)))
