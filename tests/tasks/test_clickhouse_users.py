"""The SQL of ClickhouseUserService (tasks/clickhouse/users.py): the original's password tests
(reference §8.4), the defaults, the identifier whitelist, every statement through ClickHouse's
own parser (chdb ``formatQuery``, in a child process), and the row-policy predicates evaluated
for real in chdb on two workspaces' rows.

chdb cannot create users, quotas or row policies (clickhouse-local has no writable access
storage, ../shared/reference/infra.md §4), so the policies are not *enforced* here: their
``USING`` expressions run as the ``WHERE`` of a query on tables holding both workspaces' rows.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import pytest

from blocks.clickhouse import clickhouse_from_url
from tasks.clickhouse.users import (
    ALLOWED_TABLES,
    DEFAULT_LIMITS,
    MIN_PASSWORD_LENGTH,
    PASSWORD_LENGTH,
    REDACTED,
    UserLimits,
    generate_password,
    limits_with_defaults,
    retention_filter,
    row_policy_predicate,
    user_statements,
    validate_identifier,
)
from tests.support.chdb_parser import format_queries

PASSWORD = "Abc-def_ghi.jkl~0123"  # a fixed, fake password of the generator's alphabet
LIMITS = UserLimits(quota_duration_seconds=60, max_queries_per_window=2000)

# Written out here, not derived from the module: the family of each table and its filter.
RAW = "(time >= (toUnixTimestamp(toStartOfDay(now() - toIntervalDay(7))) * 1000))"
MINUTE_HOUR = "(time >= toStartOfDay(now() - toIntervalDay(7)))"
DAY_MONTH = "(time >= (today() - toIntervalDay(7)))"
TABLE_FILTERS = {
    "default.key_verifications_raw_v2": RAW,
    "default.key_verifications_per_minute_v2": MINUTE_HOUR,
    "default.key_verifications_per_minute_v3": MINUTE_HOUR,
    "default.key_verifications_per_hour_v2": MINUTE_HOUR,
    "default.key_verifications_per_hour_v3": MINUTE_HOUR,
    "default.key_verifications_per_day_v2": DAY_MONTH,
    "default.key_verifications_per_day_v3": DAY_MONTH,
    "default.key_verifications_per_month_v2": DAY_MONTH,
    "default.key_verifications_per_month_v3": DAY_MONTH,
}


def test_passwords_survive_a_dsn_round_trip() -> None:
    """1000 generated passwords need no escaping in a DSN and come back unchanged from one
    (the original's DSN round-trip test), also through the worker's own URL parsing."""
    for _ in range(1000):
        password = generate_password()
        assert quote(password, safe="") == password
        parts = urlsplit(f"http://ws_1:{password}@clickhouse.test:8123/default")
        assert unquote(parts.password or "") == password
        assert parts.hostname == "clickhouse.test" and parts.port == 8123
    client = clickhouse_from_url(f"http://ws_1:{password}@clickhouse.test:8123/default")
    assert password not in repr(client)


def test_passwords_meet_the_clickhouse_cloud_rules() -> None:
    """Every password has 64 characters of ``A-Za-z0-9-_.~`` with at least one upper, lower,
    digit and special character (the original's ClickHouse Cloud rules test)."""
    allowed = set(string.ascii_letters + string.digits + "-_.~")
    seen = set()
    for _ in range(500):
        password = generate_password()
        assert len(password) == PASSWORD_LENGTH == 64
        assert set(password) <= allowed
        assert any(c.isupper() for c in password)
        assert any(c.islower() for c in password)
        assert any(c.isdigit() for c in password)
        assert any(c in "-_.~" for c in password)
        seen.add(password)
    assert len(seen) == 500
    short = generate_password(MIN_PASSWORD_LENGTH)
    assert len(short) == 12 and any(c in "-_.~" for c in short)


def test_the_minimum_password_length_is_enforced() -> None:
    """A password shorter than 12 characters is refused (the original's minimum-length test)."""
    with pytest.raises(ValueError, match="at least 12"):
        generate_password(11)


def test_unset_or_non_positive_limits_take_the_defaults() -> None:
    """Unset, 0 and negative limits fall back to the original's defaults (0 would mean
    unlimited in ClickHouse); positive ones are kept."""
    assert (
        limits_with_defaults() == DEFAULT_LIMITS == UserLimits(3600, 1000, 1800, 30, 10**9, 10**7)
    )
    assert limits_with_defaults(
        quota_duration_seconds=0,
        max_queries_per_window=-5,
        max_execution_time_per_window=None,
        max_query_execution_time=1,
        max_query_memory_bytes=2**40,
        max_query_result_rows=-1,
    ) == UserLimits(3600, 1000, 1800, 1, 2**40, 10**7)


def test_statements_are_the_originals_with_the_stored_password_reapplied() -> None:
    """The exact statements, in order: the user (created if absent, then its password set to
    the stored one), a row policy per allowed table, the quota, the settings profile, then
    REVOKE ALL and a GRANT SELECT per allowed table; names quoted."""
    statements = user_statements("ws_test1", PASSWORD, LIMITS, 7)
    sql = [s.sql for s in statements]
    assert sql[0] == (
        f"CREATE USER IF NOT EXISTS `ws_test1` IDENTIFIED WITH sha256_password BY '{PASSWORD}'"
    )
    assert sql[1] == f"ALTER USER `ws_test1` IDENTIFIED WITH sha256_password BY '{PASSWORD}'"
    assert sql[2] == (
        "CREATE ROW POLICY OR REPLACE `workspace_ws_test1_rls` ON "
        "`default`.`key_verifications_raw_v2` FOR SELECT USING workspace_id = 'ws_test1' AND "
        "time >= toUnixTimestamp(toStartOfDay(now() - INTERVAL 7 DAY)) * 1000 TO `ws_test1`"
    )
    assert sql[11] == (
        "CREATE QUOTA OR REPLACE `workspace_ws_test1_quota` FOR INTERVAL 60 SECOND "
        "MAX queries = 2000, MAX execution_time = 1800 TO `ws_test1`"
    )
    assert sql[12] == (
        "CREATE SETTINGS PROFILE OR REPLACE `workspace_ws_test1_profile` SETTINGS "
        "max_execution_time = 30, max_memory_usage = 1000000000, max_result_rows = 10000000, "
        "readonly = 2 TO `ws_test1`"
    )
    assert sql[13] == "REVOKE ALL ON *.* FROM `ws_test1`"
    assert sql[14:] == [
        f"GRANT SELECT ON `{t.split('.')[0]}`.`{t.split('.')[1]}` TO `ws_test1`"
        for t in TABLE_FILTERS
    ]
    assert len(statements) == 2 + 9 + 3 + 9
    assert [s.may_fail for s in statements].count(True) == 1 and statements[13].may_fail


def test_every_statement_passes_clickhouses_parser_as_expected() -> None:
    """Each generated statement is accepted by ClickHouse 26.9's parser (chdb ``formatQuery``)
    and normalises to the expected text: catches syntax and version drift."""
    statements = user_statements("ws_test1", PASSWORD, LIMITS, 7)
    expected = [
        f"CREATE USER IF NOT EXISTS ws_test1 IDENTIFIED WITH sha256_password BY '{PASSWORD}'",
        f"ALTER USER ws_test1 IDENTIFIED WITH sha256_password BY '{PASSWORD}'",
        *(
            f"CREATE ROW POLICY OR REPLACE workspace_ws_test1_rls ON {table} FOR SELECT "
            f"USING (workspace_id = 'ws_test1') AND {time_filter} TO ws_test1"
            for table, time_filter in TABLE_FILTERS.items()
        ),
        "CREATE QUOTA OR REPLACE workspace_ws_test1_quota FOR INTERVAL 1 minute "
        "MAX queries = 2000, execution_time = 1800 TO ws_test1",
        "CREATE SETTINGS PROFILE OR REPLACE `workspace_ws_test1_profile` SETTINGS "
        "max_execution_time = 30, max_memory_usage = 1000000000, max_result_rows = 10000000, "
        "readonly = 2 TO ws_test1",
        "REVOKE ALL ON *.* FROM ws_test1",
        *(f"GRANT SELECT ON {table} TO ws_test1" for table in TABLE_FILTERS),
    ]
    assert format_queries([s.sql for s in statements]) == expected


def test_a_name_that_needs_quoting_still_parses() -> None:
    """A workspace id of digits only is a valid name once quoted (the original, unquoted,
    would have produced ``CREATE USER 123``)."""
    statements = user_statements("123", PASSWORD, DEFAULT_LIMITS, 30)
    formatted = format_queries([statements[0].sql, statements[2].sql])
    assert formatted[0].startswith("CREATE USER IF NOT EXISTS `123` IDENTIFIED")
    assert "TO `123`" in formatted[1]


@pytest.mark.parametrize(
    "name",
    ["", "ws-1", "ws 1", "ws'1", "ws`1", "ws\\1", "ws;DROP", "ws.1", "wś", "a" * 257, "ws\n"],
)
def test_identifiers_outside_the_whitelist_are_refused(name: str) -> None:
    """A workspace id that is not ``[A-Za-z0-9_]+`` never reaches SQL: every builder refuses it
    without repeating it."""
    with pytest.raises(ValueError) as caught:
        validate_identifier(name)
    assert "A-Z" in str(caught.value)
    with pytest.raises(ValueError):
        user_statements(name, PASSWORD, DEFAULT_LIMITS, 30)
    with pytest.raises(ValueError):
        row_policy_predicate(ALLOWED_TABLES[0], name, 30)


def test_tables_retention_and_limits_are_checked_before_splicing() -> None:
    """Only the allowed tables, non-negative integer days and limits (not bools, not strings)
    are spliced into SQL."""
    with pytest.raises(ValueError, match="workspace-readable"):
        retention_filter("default.keys", 30)
    with pytest.raises(ValueError, match="workspace-readable"):
        retention_filter("default.key_verifications_raw_v2; DROP TABLE x", 30)
    for days in (-1, True, "7"):
        with pytest.raises(ValueError, match="retention days"):
            retention_filter(ALLOWED_TABLES[0], days)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_queries_per_window"):
        user_statements("ws_1", PASSWORD, UserLimits(max_queries_per_window=-1), 30)


@pytest.mark.parametrize(
    "password", ["short-1A", "has'quote-123456", "back\\slash-12345", "é" * 20]
)
def test_a_password_outside_the_alphabet_is_refused_without_echoing_it(password: str) -> None:
    """A stored password that could break out of its literal is refused, and the message does
    not contain it."""
    with pytest.raises(ValueError) as caught:
        user_statements("ws_1", password, DEFAULT_LIMITS, 30)
    assert password not in str(caught.value)


def test_redacted_statements_never_hold_the_password() -> None:
    """What is logged (``redacted``) and the statements' reprs hide the password; only the two
    statements that carry it name it as the secret to mask."""
    statements = user_statements("ws_1", PASSWORD, DEFAULT_LIMITS, 30)
    for statement in statements:
        assert PASSWORD not in statement.redacted
        assert PASSWORD not in repr(statement)
    carrying = [s for s in statements if PASSWORD in s.sql]
    assert [s.secret for s in carrying] == [PASSWORD, PASSWORD]
    assert all(REDACTED in s.redacted for s in carrying)
    assert all(s.secret == "" for s in statements if s not in carrying)


# -- the row-policy predicates, evaluated in chdb ----------------------------------------------

_TIME_TYPES = {"raw": "Int64", "minute_hour": "DateTime", "day_month": "Date"}


def _family(table: str) -> str:
    if "_raw_" in table:
        return "raw"
    return "day_month" if re.search(r"_per_(day|month)_", table) else "minute_hour"


def _time_expr(family: str, days_ago: int) -> str:
    moment = f"now() - INTERVAL {days_ago} DAY"
    if family == "raw":
        return f"toUnixTimestamp({moment}) * 1000"
    if family == "day_month":
        return f"today() - INTERVAL {days_ago} DAY"
    return moment


def test_row_policy_predicates_show_each_workspace_only_its_recent_rows(tmp_path: Path) -> None:
    """On a copy of every allowed table holding rows of two workspaces, 1 and 30 days old, the
    workspace's row-policy predicate (run as the WHERE, since chdb cannot enforce a policy)
    keeps exactly its own rows within the 7-day retention, for each time-column family."""
    client = clickhouse_from_url(f"chdb://{tmp_path / 'policies'}")
    for table in ALLOWED_TABLES:
        family = _family(table)
        client.command(
            f"CREATE TABLE {table} (workspace_id String, time {_TIME_TYPES[family]}, n UInt32) "
            "ENGINE = MergeTree ORDER BY (workspace_id, time)"
        )
        client.command(
            f"INSERT INTO {table} (workspace_id, time, n) VALUES "
            f"('ws_a', {_time_expr(family, 1)}, 1), ('ws_a', {_time_expr(family, 30)}, 2), "
            f"('ws_b', {_time_expr(family, 1)}, 3), ('ws_b', {_time_expr(family, 30)}, 4)"
        )
    try:
        for table in ALLOWED_TABLES:
            for workspace, visible in (("ws_a", [("ws_a", 1)]), ("ws_b", [("ws_b", 3)])):
                rows = client.query(
                    f"SELECT workspace_id, n FROM {table} "
                    f"WHERE {row_policy_predicate(table, workspace, 7)} ORDER BY n"
                )
                assert rows == visible, (table, workspace, rows)
            # A longer retention lets the old row through, still only the workspace's own.
            rows = client.query(
                f"SELECT n FROM {table} WHERE {row_policy_predicate(table, 'ws_a', 60)} ORDER BY n"
            )
            assert rows == [(1,), (2,)], table
    finally:
        client.close()
