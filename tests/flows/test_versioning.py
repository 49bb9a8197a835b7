"""VersioningService (flows/versioning.py): strictly increasing versions per region.

In-process flow calls against the session's real Prefect server (per-key locks) and MariaDB;
the SQLite counter is checked on its own. Every test uses a region no other test touches.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import pytest
import sqlalchemy as sa

from flows.versioning import get_version, next_version
from tasks.db.engine import transaction
from tasks.db.schema import init_schema, region_versions
from tasks.db.versions import increment_region_version, read_region_version
from tests.flows.helpers import fails_at_once
from tests.support.seed import fresh_region, region_counters
from worker.kernel.errors import InvalidParameterError
from worker.kernel.steps import durable_call


@pytest.fixture
def region(control_db):
    """A fresh region; its counter row is removed at the end."""
    name = fresh_region()
    yield name
    with transaction(control_db) as connection:
        connection.execute(sa.delete(region_versions).where(region_versions.c.region == name))


def test_first_version_of_a_fresh_region_is_1_then_2(region):
    """A region's versions start at 1 and go up by one per call."""
    assert asyncio.run(next_version(region)) == 1
    assert asyncio.run(next_version(region)) == 2


def test_get_version_reads_without_incrementing(region):
    """get_version is 0 before the first version, then the last one taken, and takes none."""
    assert asyncio.run(get_version(region)) == 0
    assert asyncio.run(next_version(region)) == 1
    assert asyncio.run(get_version(region)) == 1
    assert asyncio.run(get_version(region)) == 1
    assert asyncio.run(next_version(region)) == 2


def test_concurrent_callers_get_unique_increasing_versions(control_db, region):
    """8 concurrent callers x 3 calls on one region: each caller sees strictly increasing
    values, no value is handed out twice, and the counter ends at the number of calls."""
    callers, calls = 8, 3

    async def caller() -> list[int]:
        return [await next_version(region) for _ in range(calls)]

    async def main() -> list[list[int]]:
        return list(await asyncio.gather(*(caller() for _ in range(callers))))

    seen = asyncio.run(main())
    for values in seen:
        assert values == sorted(values) and len(set(values)) == calls, values
    every = [value for values in seen for value in values]
    assert sorted(every) == list(range(1, callers * calls + 1))
    assert region_counters(control_db)[region] == callers * calls
    assert asyncio.run(get_version(region)) == callers * calls


def test_replayed_call_returns_the_same_version(control_db, region):
    """A call repeated under the same key replays its step: same version, counter moved once."""
    key = f"versioning-replay-{region}"
    with durable_call(key):
        first = asyncio.run(next_version(region))
    with durable_call(key):
        again = asyncio.run(next_version(region))
    assert first == again == 1
    assert region_counters(control_db)[region] == 1
    assert asyncio.run(next_version(region)) == 2  # a new call takes a new version


@pytest.mark.parametrize("bad", ["", " x", "a/b", "a" * 65, 123, None])
def test_bad_region_fails_at_once_and_writes_nothing(control_db, bad):
    """A bad region is terminal before any step: InvalidParameterError naming 'region', no
    counter created or moved."""
    before = region_counters(control_db)
    for flow in (next_version, get_version):
        error = fails_at_once(InvalidParameterError, flow, region=bad)
        assert error.parameter == "region"
        assert "'region'" in str(error)
    assert region_counters(control_db) == before


def test_sqlite_increment_is_atomic_across_threads(sqlite_url):
    """On SQLite, 4 threads x 50 increments of one region hand out 1..200, each once."""
    init_schema(sqlite_url)
    threads, increments = 4, 50
    region = "local.dev"
    taken: list[int] = []
    taken_lock = threading.Lock()
    start = threading.Barrier(threads)

    def work() -> None:
        start.wait()
        for _ in range(increments):
            with transaction(sqlite_url) as connection:
                value = increment_region_version(connection, region)
            with taken_lock:
                taken.append(value)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    duplicates = [value for value, count in Counter(taken).items() if count > 1]
    assert not duplicates, f"versions handed out twice: {duplicates}"
    assert sorted(taken) == list(range(1, threads * increments + 1))
    with transaction(sqlite_url) as connection:
        assert read_region_version(connection, region) == threads * increments
