"""The SQL of ClickhouseUserService (reference §8.2-8.3): a workspace's read-only ClickHouse user.

Pure functions: they validate and return statements, the flow runs them. A workspace gets

- a user named after the workspace (``CREATE USER IF NOT EXISTS``), then **(fix)** ``ALTER USER
  ... IDENTIFIED`` with the stored password, so a user that was lost, or whose password was
  changed behind our back, ends with the stored password (the original's ``IF NOT EXISTS`` alone
  left a changed password changed);
- one row policy per allowed table, ``workspace_id = '<ws>' AND <retention>``, where the
  retention filter depends on the table's time column (unix ms, DateTime or Date) and the
  workspace's ``quota.logs_retention_days``;
- a quota (queries and execution time per window) and a settings profile (per-query time,
  memory and result rows, ``readonly = 2``);
- ``REVOKE ALL`` then ``GRANT SELECT`` on each allowed table. The grants come last (the
  original granted before the policies): a new user never holds SELECT without its policies.

Security: names are whitelisted (``^[A-Za-z0-9_]+$``; tables ``db.table`` of the allowed list)
and quoted with backticks, numbers are checked to be plain non-negative integers, so nothing a
caller passes becomes SQL. The password is spliced as a quoted literal only after it matched
the generator's alphabet (``A-Za-z0-9-_.~``: no quote, no backslash); it is not sent as a
``{password:String}`` parameter because clickhouse-connect sends server-side parameters in the
request URL (``?param_password=...``), where proxies and the server's HTTP trace log record
them, while the statement itself travels in the POST body and ClickHouse hides a literal
password in its query log. ``Statement.redacted`` is the text to log; ``Statement.secret`` is
what any error text must be masked with.
"""

from __future__ import annotations

import re
import secrets
import string
from dataclasses import dataclass, field

__all__ = [
    "ALLOWED_TABLES",
    "DEFAULT_LIMITS",
    "MIN_PASSWORD_LENGTH",
    "PASSWORD_ALPHABET",
    "PASSWORD_LENGTH",
    "REDACTED",
    "Statement",
    "UserLimits",
    "generate_password",
    "limits_with_defaults",
    "retention_filter",
    "row_policy_predicate",
    "user_statements",
    "validate_identifier",
    "validate_table",
]

PASSWORD_LENGTH = 64
MIN_PASSWORD_LENGTH = 12
_SPECIAL = "-_.~"  # unreserved in URLs: a password survives a DSN without escaping
PASSWORD_ALPHABET = string.ascii_letters + string.digits + _SPECIAL
_PASSWORD = re.compile(r"[A-Za-z0-9._~-]{12,256}")
_NAME = re.compile(r"[A-Za-z0-9_]+")
_TABLE = re.compile(r"([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)")
REDACTED = "[HIDDEN]"

ALLOWED_TABLES: tuple[str, ...] = (
    "default.key_verifications_raw_v2",
    *(
        f"default.key_verifications_per_{period}_{version}"
        for period in ("minute", "hour", "day", "month")
        for version in ("v2", "v3")
    ),
)


@dataclass(frozen=True)
class UserLimits:
    """A workspace's quota window and per-query limits (the ``clickhouse_workspace_settings``
    columns of the same names)."""

    quota_duration_seconds: int = 3600
    max_queries_per_window: int = 1000
    max_execution_time_per_window: int = 1800
    max_query_execution_time: int = 30
    max_query_memory_bytes: int = 1_000_000_000
    max_query_result_rows: int = 10_000_000

    def as_row(self) -> dict[str, int]:
        """The limits as column values."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


DEFAULT_LIMITS = UserLimits()


def limits_with_defaults(**requested: int | None) -> UserLimits:
    """The limits of a request: a field that is unset **or <= 0** takes its default, because 0
    means unlimited in ClickHouse (the original's ``ptr.PositiveOr``).

    Args:
        **requested: any of ``UserLimits``' fields.

    Returns:
        The limits to apply.

    Raises:
        TypeError: a name that is not a limit.
    """
    unknown = set(requested) - set(UserLimits.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown limits: {sorted(unknown)}")
    return UserLimits(
        **{
            name: value if value is not None and value > 0 else getattr(DEFAULT_LIMITS, name)
            for name, value in requested.items()
        }
    )


def generate_password(length: int = PASSWORD_LENGTH) -> str:
    """A random password for ClickHouse Cloud's rules, safe inside a DSN (reference §8.2).

    One character of each class (upper, lower, digit, special), the rest from the whole
    alphabet, then a Fisher-Yates shuffle. Draws use ``secrets.randbelow`` (unbiased; the
    original took crypto/rand bytes modulo the alphabet size).

    Args:
        length: at least ``MIN_PASSWORD_LENGTH``.

    Returns:
        The password.

    Raises:
        ValueError: ``length`` is below the minimum.
    """
    if length < MIN_PASSWORD_LENGTH:
        raise ValueError(f"password length must be at least {MIN_PASSWORD_LENGTH}, got {length}")
    classes = (string.ascii_uppercase, string.ascii_lowercase, string.digits, _SPECIAL)
    chars = [secrets.choice(group) for group in classes]
    chars += [secrets.choice(PASSWORD_ALPHABET) for _ in range(length - len(chars))]
    for i in range(len(chars) - 1, 0, -1):
        j = secrets.randbelow(i + 1)
        chars[i], chars[j] = chars[j], chars[i]
    return "".join(chars)


def validate_identifier(name: str) -> str:
    """``name`` if it is a plain ClickHouse name (``^[A-Za-z0-9_]+$``).

    Raises:
        ValueError: anything else (the message does not repeat the value).
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > 256:
        raise ValueError("must be 1-256 characters of A-Z, a-z, 0-9 and _")
    return name


def validate_table(table: str) -> str:
    """``table`` if it is ``db.table`` of plain names and one of ``ALLOWED_TABLES``.

    Raises:
        ValueError: a malformed or not allowed table.
    """
    if not _TABLE.fullmatch(table) or table not in ALLOWED_TABLES:
        raise ValueError(f"table {table!r} is not one of the workspace-readable tables")
    return table


def _quoted(name: str) -> str:
    return f"`{validate_identifier(name)}`"


def _quoted_table(table: str) -> str:
    database, name = validate_table(table).split(".")
    return f"`{database}`.`{name}`"


def _count(value: int, what: str) -> int:
    # bool is an int: refuse it, and anything negative, before it is spliced into SQL.
    if type(value) is not int or value < 0:
        raise ValueError(f"{what} must be a non-negative integer")
    return value


def retention_filter(table: str, retention_days: int) -> str:
    """The row filter keeping the last ``retention_days`` days of ``table`` (by its family).

    ``_raw_`` tables keep unix-ms times, ``_per_day_``/``_per_month_`` tables dates, the others
    (``_per_minute_``, ``_per_hour_``) DateTimes.
    """
    days = _count(retention_days, "retention days")
    name = validate_table(table).split(".")[1]
    if "_raw_" in name:
        return f"time >= toUnixTimestamp(toStartOfDay(now() - INTERVAL {days} DAY)) * 1000"
    if "_per_day_" in name or "_per_month_" in name:
        return f"time >= today() - INTERVAL {days} DAY"
    return f"time >= toStartOfDay(now() - INTERVAL {days} DAY)"


def row_policy_predicate(table: str, workspace_id: str, retention_days: int) -> str:
    """The ``USING`` expression of the workspace's row policy on ``table``."""
    workspace = validate_identifier(workspace_id)  # a whitelisted name cannot close the quote
    return f"workspace_id = '{workspace}' AND {retention_filter(table, retention_days)}"


@dataclass(frozen=True)
class Statement:
    """One statement to run on the admin connection.

    Args:
        sql: the statement (it may hold the password).
        redacted: the same statement with the password replaced; the only text to log.
        secret: what to mask in any error text about this statement ("" when none).
        may_fail: a failure is logged and the next statement runs (the original's REVOKE).
    """

    sql: str = field(repr=False)
    redacted: str
    secret: str = field(default="", repr=False)
    may_fail: bool = False


def _password_literal(password: str) -> str:
    if not isinstance(password, str) or not _PASSWORD.fullmatch(password):
        # Never echo it: it came from the vault.
        raise ValueError("the stored password is not of the generator's alphabet and length")
    return f"'{password}'"


def _identified(head: str, user: str, password: str) -> Statement:
    sql = f"{head} {user} IDENTIFIED WITH sha256_password BY "
    return Statement(
        sql=sql + _password_literal(password), redacted=f"{sql}'{REDACTED}'", secret=password
    )


def user_statements(
    username: str, password: str, limits: UserLimits, retention_days: int
) -> list[Statement]:
    """Every statement that makes ``username`` the workspace's read-only user, in order.

    Args:
        username: the ClickHouse user, which is the workspace id (also the row filter).
        password: the stored password (decrypted).
        limits: the quota and settings-profile limits.
        retention_days: the workspace's ``quota.logs_retention_days``.

    Returns:
        The statements; each is idempotent, so the list can be run again from the start.

    Raises:
        ValueError: a name, number or the password is not of the allowed shape.
    """
    user = _quoted(username)
    lim = {name: _count(value, name) for name, value in limits.as_row().items()}
    statements = [
        _identified("CREATE USER IF NOT EXISTS", user, password),
        _identified("ALTER USER", user, password),
    ]
    policy = _quoted(f"workspace_{username}_rls")
    for table in ALLOWED_TABLES:
        predicate = row_policy_predicate(table, username, retention_days)
        sql = (
            f"CREATE ROW POLICY OR REPLACE {policy} ON {_quoted_table(table)} "
            f"FOR SELECT USING {predicate} TO {user}"
        )
        statements.append(Statement(sql=sql, redacted=sql))
    quota = (
        f"CREATE QUOTA OR REPLACE {_quoted(f'workspace_{username}_quota')} "
        f"FOR INTERVAL {lim['quota_duration_seconds']} SECOND "
        f"MAX queries = {lim['max_queries_per_window']}, "
        f"MAX execution_time = {lim['max_execution_time_per_window']} TO {user}"
    )
    profile = (
        f"CREATE SETTINGS PROFILE OR REPLACE {_quoted(f'workspace_{username}_profile')} "
        f"SETTINGS max_execution_time = {lim['max_query_execution_time']}, "
        f"max_memory_usage = {lim['max_query_memory_bytes']}, "
        f"max_result_rows = {lim['max_query_result_rows']}, readonly = 2 TO {user}"
    )
    revoke = f"REVOKE ALL ON *.* FROM {user}"
    statements += [
        Statement(sql=quota, redacted=quota),
        Statement(sql=profile, redacted=profile),
        Statement(sql=revoke, redacted=revoke, may_fail=True),
    ]
    for table in ALLOWED_TABLES:
        grant = f"GRANT SELECT ON {_quoted_table(table)} TO {user}"
        statements.append(Statement(sql=grant, redacted=grant))
    return statements
