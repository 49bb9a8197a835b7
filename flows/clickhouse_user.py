"""ClickhouseUserService (reference §8): give a workspace its own read-only ClickHouse user.

Guarantees: calls on one workspace run one at a time (key ``clickhouse-user:{workspace_id}``).
The user is named after the workspace and can only SELECT the allowed analytics tables, only
its own rows of the last ``quota.logs_retention_days`` days (a row policy per table), within a
quota and a settings profile built from the call's limits (unset or <= 0: the default; SQL in
``tasks.clickhouse.users``). The password is generated once per workspace and stored only as
the vault's ciphertext (keyring = the workspace id) in ``clickhouse_workspace_settings``; the
plaintext exists only inside the ``configure clickhouse`` step, which decrypts it from the row.
A later call keeps the password and updates the limits. **(fix)** Every call re-applies the
stored password (``CREATE USER IF NOT EXISTS`` then ``ALTER USER ... IDENTIFIED``), so a user
that was lost in ClickHouse, or whose password was reset there, ends with the stored password.
Result: ``{"workspace_id", "username", "created"}`` (``created``: this call stored the
credentials); never the password.

Side-effect steps: ``store credentials`` (insert the row with a new password, or keep the
stored one and update the limits; crash-safe: a replay after the insert finds the row, or the
unique key refuses a second one, and keeps its password) and ``configure clickhouse`` (the
statements on the admin connection, each idempotent, so a retry runs them all again).

Failure: bad parameters (an empty or non-``[A-Za-z0-9_]`` workspace id, a limit beyond the
original's int32/int64 fields, a wrong type) are terminal before anything is written; so is a
missing ``UNKEY_CLICKHOUSE_ADMIN_URL`` or a remote vault without its token (``ConfigError``
naming the variable). A workspace without a ``quota`` row is retried (the original waited for
it); ClickHouse or vault outages are retried by the steps; ClickHouse refusing a statement is
terminal. A failed ``REVOKE ALL`` is only logged (the original). Logs name the statements with
the password replaced by ``[HIDDEN]``; error texts are masked the same way.
"""

from __future__ import annotations

from typing import Annotated, Any

from prefect import get_run_logger
from pydantic import Field, field_validator

from blocks.clickhouse import ClickHouseClient, ClickHouseQueryError, admin_client
from blocks.clickhouse_errors import ClickHouseUnavailableError, mask
from blocks.vault import vault_from_settings
from flows.params import Id, Params
from tasks.clickhouse.users import (
    Statement,
    UserLimits,
    generate_password,
    limits_with_defaults,
    user_statements,
    validate_identifier,
)
from tasks.db import clickhouse_users as users_db
from worker.kernel.errors import (
    ConfigError,
    NotFoundError,
    RefusedError,
    RetryableError,
    is_terminal,
)
from worker.kernel.service import critical_section, parse, service_flow
from worker.kernel.steps import step
from worker.settings import env_name, worker_settings

__all__ = ["QuotaMissingError", "configure_clickhouse_user"]

# The original's request fields are int32 (the memory limit int64): larger values never
# reached it, and the settings columns are INT / BIGINT.
Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class QuotaMissingError(RetryableError):
    """The workspace has no ``quota`` row yet (the original retried until it appeared)."""


class ClickhouseUserParams(Params):
    workspace_id: Id
    quota_duration_seconds: Int32 | None = None
    max_queries_per_window: Int32 | None = None
    max_execution_time_per_window: Int32 | None = None
    max_query_execution_time: Int32 | None = None
    max_query_memory_bytes: Int64 | None = None
    max_query_result_rows: Int32 | None = None

    @field_validator("workspace_id")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        # It becomes the user's name and the row filter's literal: only whitelisted names.
        return validate_identifier(value)

    def limits(self) -> UserLimits:
        return limits_with_defaults(
            **{name: getattr(self, name) for name in UserLimits.__dataclass_fields__}
        )


def _key(workspace_id: str) -> str:
    return f"clickhouse-user:{workspace_id}"


def _require_enabled() -> ClickHouseClient:
    """The admin client, or the ConfigError that says what to set (before anything is written)."""
    client = admin_client()  # a malformed URL: a ConfigError naming the variable
    if client is None:
        raise ConfigError(
            f"configure_clickhouse_user is disabled: set {env_name('clickhouse_admin_url')} "
            "(the ClickHouse admin connection that creates users)"
        )
    vault_from_settings(worker_settings())  # a remote vault without its token
    return client


@step(name="store credentials")
def store_credentials(workspace_id: str, limits: dict[str, int]) -> dict[str, bool]:
    """Keep the workspace's stored password and set its limits, or store a new password.

    Returns only whether this step stored it: the ciphertext stays in the database and the
    plaintext never leaves this function.
    """
    wanted = UserLimits(**limits)
    if users_db.find_workspace_settings(workspace_id) is None:
        if users_db.find_logs_retention_days(workspace_id) is None:
            raise QuotaMissingError(f"workspace '{workspace_id}' has no quota row yet")
        vault = vault_from_settings(worker_settings())
        encrypted = vault.encrypt(workspace_id, generate_password()).encrypted
        if users_db.insert_workspace_settings(workspace_id, workspace_id, encrypted, wanted):
            return {"created": True}
        # An earlier attempt of this step inserted the row, then died before its record was
        # written: its password stands, this one is dropped unused.
    users_db.update_limits(workspace_id, wanted)
    return {"created": False}


@step(name="configure clickhouse")
def configure_clickhouse(workspace_id: str) -> int:
    """Run the user's statements with the stored password and limits; how many ran."""
    stored = users_db.find_workspace_settings(workspace_id)
    if stored is None:
        raise NotFoundError(f"clickhouse settings of workspace '{workspace_id}' not found")
    if stored.logs_retention_days is None:
        raise QuotaMissingError(f"workspace '{workspace_id}' has no quota row yet")
    client = _require_enabled()
    password = vault_from_settings(worker_settings()).decrypt(
        workspace_id, stored.password_encrypted
    )
    try:
        statements = user_statements(
            stored.username, password, stored.limits, stored.logs_retention_days
        )
    except ValueError as exc:
        raise RefusedError(f"clickhouse user of workspace '{workspace_id}': {exc}") from None
    for statement in statements:
        _execute(client, statement)
    return len(statements)


def _execute(client: ClickHouseClient, statement: Statement) -> None:
    log = get_run_logger()
    log.debug("clickhouse: %s", statement.redacted)
    failure: Exception | None = None
    try:
        client.command(statement.sql)
    except Exception as exc:
        failure = _masked(exc, statement)
    if failure is None:
        return
    if statement.may_fail:
        log.warning("%s failed (continuing): %s", statement.redacted, failure)
        return
    # Raised outside the ``except``: the original error (whose text may quote the statement)
    # is not even attached as the context.
    raise failure


def _masked(exc: Exception, statement: Statement) -> Exception:
    secrets = [statement.secret] if statement.secret else []
    detail = mask(f"{type(exc).__name__}: {exc}", secrets)
    what = statement.redacted.split(" IDENTIFIED ", 1)[0][:80]
    message = f"{what}: {detail}"
    if isinstance(exc, ClickHouseQueryError):
        return ClickHouseQueryError(message, exc.code)
    if is_terminal(exc):
        return RefusedError(message)
    return ClickHouseUnavailableError(message)


@service_flow("configure_clickhouse_user", run_name="clickhouse-user-{workspace_id}")
async def configure_clickhouse_user(
    workspace_id: str,
    quota_duration_seconds: int | None = None,
    max_queries_per_window: int | None = None,
    max_execution_time_per_window: int | None = None,
    max_query_execution_time: int | None = None,
    max_query_memory_bytes: int | None = None,
    max_query_result_rows: int | None = None,
) -> dict[str, Any]:
    """Create or update a workspace's read-only ClickHouse user, its row policies, quota and
    settings profile.

    Args:
        workspace_id: the workspace (also the user's name), ``[A-Za-z0-9_]+``.
        quota_duration_seconds: the quota window (default 3600).
        max_queries_per_window: queries per window (default 1000).
        max_execution_time_per_window: execution seconds per window (default 1800).
        max_query_execution_time: seconds per query (default 30).
        max_query_memory_bytes: memory per query (default 1e9).
        max_query_result_rows: result rows per query (default 1e7).

    Returns:
        ``{"workspace_id", "username", "created"}``.

    Raises:
        InvalidParameterError: a bad workspace id or limit (nothing written).
        ConfigError: the admin URL is not set or the vault is misconfigured.
        ClickHouseQueryError: ClickHouse refused a statement.
    """
    params = parse(
        ClickhouseUserParams,
        workspace_id=workspace_id,
        quota_duration_seconds=quota_duration_seconds,
        max_queries_per_window=max_queries_per_window,
        max_execution_time_per_window=max_execution_time_per_window,
        max_query_execution_time=max_query_execution_time,
        max_query_memory_bytes=max_query_memory_bytes,
        max_query_result_rows=max_query_result_rows,
    )
    _require_enabled()
    async with critical_section(_key(params.workspace_id)):
        stored = store_credentials(params.workspace_id, params.limits().as_row())
        count = configure_clickhouse(params.workspace_id)
    get_run_logger().info(
        "clickhouse user %s configured (%d statements)", params.workspace_id, count
    )
    return {
        "workspace_id": params.workspace_id,
        "username": params.workspace_id,
        "created": stored["created"],
    }
