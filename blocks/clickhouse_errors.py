"""How ClickHouse failures map onto the worker's error tree, without leaking a secret.

- ``ClickHouseQueryError`` (terminal): the statement or the credentials are wrong: a server
  error code in ``TERMINAL_CODES`` (syntax, unknown table/column/function, type mismatch, bad
  or missing parameter, access denied, authentication failed), or an HTTP 4xx other than
  408/429. Retrying the same statement cannot succeed.
- ``ClickHouseUnavailableError`` (retryable): the server or the chdb directory could not answer
  now: network errors, timeouts, 5xx/408/429, a busy directory, and every other server code
  (memory limit, too many parts, Keeper, timeouts), which are about load, not about the SQL.

Texts from the server or the engine can quote the SQL and parameter values ("Value ... cannot
be parsed as Int64 for query parameter 'x'"), so every detail goes through ``mask``: the
connection password and every string parameter of 8 characters or more are replaced with
``***`` (passwords reach ClickHouse as parameters of ``CREATE USER``), and the text is cut to
400 characters. Insert batches are checked before they are sent: table and column names are
spliced into the statement, so only plain identifiers pass.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from worker.kernel.errors import InvalidParameterError, RetryableError, TerminalError

__all__ = [
    "TERMINAL_CODES",
    "ClickHouseQueryError",
    "ClickHouseUnavailableError",
    "check_insert",
    "classify",
    "error_code",
    "mask",
    "secrets_in",
]

_CODE = re.compile(r"\bCode:? (\d+)")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?")
_MAX_DETAIL = 400
_MIN_MASKED = 8
TERMINAL_CODES = frozenset(
    {1, 2, 6, 16, 20, 26, 27, 35, 36, 38, 41, 42, 43, 44, 46, 47, 48, 50, 53, 57, 60, 62, 69}
    | {70, 72, 73, 80, 81, 82, 115, 117, 164, 184, 190, 192, 194, 215, 344, 352, 386, 403}
    | {407, 456, 457, 497, 511, 514, 516}
)


class ClickHouseQueryError(TerminalError):
    """ClickHouse refused the statement (syntax, unknown table, bad parameter, access denied).

    Args:
        message: what failed, with the server's text (secrets masked).
        code: the ClickHouse error code, when known.
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self) -> tuple[type[ClickHouseQueryError], tuple[str, int | None]]:
        return (type(self), (str(self), self.code))


class ClickHouseUnavailableError(RetryableError):
    """ClickHouse could not answer now (network, timeout, 5xx, a busy chdb directory)."""


def error_code(text: str) -> int | None:
    """The ClickHouse error code quoted in ``text`` (``Code: 60. DB::Exception: …``), if any."""
    match = _CODE.search(text)
    return int(match.group(1)) if match else None


def secrets_in(password: str, parameters: dict[str, Any] | None) -> list[str]:
    """What ``mask`` must hide for one call: the password and the long string parameters.

    Args:
        password: the connection's password ("" for chdb).
        parameters: the call's parameters.

    Returns:
        The strings to hide, longest first (so a secret containing another is hidden whole).
    """
    values = [
        v for v in (parameters or {}).values() if isinstance(v, str) and len(v) >= _MIN_MASKED
    ]
    return sorted({s for s in (password, *values) if s}, key=len, reverse=True)


def mask(text: str, secrets: Sequence[str]) -> str:
    """``text`` on one line, each of ``secrets`` replaced with ``***``, cut to 400 characters.

    Args:
        text: a server or engine message.
        secrets: from ``secrets_in``.

    Returns:
        The text, safe to log and to persist.
    """
    for secret in secrets:
        text = text.replace(secret, "***")
    text = " ".join(text.split())
    return text if len(text) <= _MAX_DETAIL else text[:_MAX_DETAIL] + "…"


def classify(
    where: str, code: int | None, detail: str, status: int | None = None
) -> ClickHouseQueryError | ClickHouseUnavailableError:
    """The error for a failed call, from the server's code or else the HTTP status.

    Args:
        where: the server or directory (``ClickHouse at http://ch:8123``), never the URL.
        code: the ClickHouse error code, if the server gave one.
        detail: the masked message.
        status: the HTTP status, if known.

    Returns:
        A ``ClickHouseQueryError`` for terminal codes and 4xx (not 408/429), else a
        ``ClickHouseUnavailableError``.
    """
    if code is not None:
        if code in TERMINAL_CODES:
            return ClickHouseQueryError(f"{where} refused the statement: {detail}", code)
        return ClickHouseUnavailableError(f"{where} failed (code {code}): {detail}")
    if status is not None and 400 <= status < 500 and status not in (408, 429):
        return ClickHouseQueryError(f"{where} refused the request (HTTP {status}): {detail}")
    return ClickHouseUnavailableError(f"{where} is unavailable: {detail}")


def check_insert(table: str, rows: Sequence[Sequence[Any]], column_names: Sequence[str]) -> None:
    """Refuse an insert whose names are not plain identifiers or whose rows have the wrong width.

    Args:
        table: ``table`` or ``database.table``.
        rows: the values of each row, in ``column_names`` order.
        column_names: the columns the rows fill.

    Raises:
        InvalidParameterError: a name is not ``[A-Za-z_][A-Za-z0-9_]*``, or a row's width differs.
    """
    for name in (table, *column_names):
        if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
            raise InvalidParameterError("table/column", f"{name!r} is not a plain identifier")
    for index, row in enumerate(rows):
        if len(row) != len(column_names):
            raise InvalidParameterError(
                "rows", f"row {index} has {len(row)} values for {len(column_names)} columns"
            )
