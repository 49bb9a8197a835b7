"""The control-plane schema: the original's tables, kept by name and type, plus the worker's own.

The original tables (reference appendix) keep their names, columns, types, nullability, defaults
and unique constraints, so the worker can run against an existing Unkey database. The worker's
own tables (`region_versions`, `deployment_transitions`, `deployment_failures`,
`acme_challenge_failures`, `quota_notifications`, `key_refill_progress`) hold state the original
kept in Restate (and, for the two `*_failures` tables, the reason a call failed).

One definition serves MariaDB/MySQL (PyMySQL) and SQLite: MySQL-only types (`bigint unsigned`,
`longblob`, `datetime(3)`, `tinyint`) are variants of portable ones, enums are native `ENUM` on
MySQL and a named CHECK constraint on SQLite, so both reject unknown values. Every constraint and
index has a fixed name. `init_schema` (what `ctrl-worker db init` runs) creates missing tables and
never alters existing ones; `missing_tables` lets the runtime refuse an uninitialised database.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Enum,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    inspect,
    text,
    true,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.schema import CreateIndex, CreateTable
from sqlalchemy.types import TypeEngine

from tasks.db.engine import engine_for

__all__ = [
    "CHALLENGE_TYPES",
    "DESIRED_STATES",
    "SHUTDOWN_SIGNALS",
    "acme_challenge_failures",
    "acme_challenges",
    "acme_users",
    "audit_log",
    "audit_log_target",
    "certificates",
    "cilium_network_policies",
    "clickhouse_workspace_settings",
    "custom_domains",
    "deployment_failures",
    "deployment_topology",
    "deployment_transitions",
    "deployments",
    "environment_runtime_settings",
    "environments",
    "frontline_routes",
    "init_schema",
    "instances",
    "key_refill_progress",
    "keys",
    "metadata",
    "missing_tables",
    "projects",
    "quota",
    "quota_notifications",
    "region_versions",
    "sentinels",
    "workspaces",
]

# Enum names become the SQLite CHECK constraint names through this convention; uniques and
# indexes are named by hand below.
metadata = MetaData(
    naming_convention={"ck": "ck_%(table_name)s_%(constraint_name)s", "pk": "pk_%(table_name)s"}
)

_MYSQL = ("mysql", "mariadb")
_MYSQL_TABLE: dict[str, Any] = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"}

# SQLite only auto-increments an `INTEGER PRIMARY KEY` (the rowid alias), not a BIGINT one.
_PK = (
    BigInteger().with_variant(mysql.BIGINT(unsigned=True), *_MYSQL).with_variant(Integer, "sqlite")
)
_BIGINT_UNSIGNED = BigInteger().with_variant(mysql.BIGINT(unsigned=True), *_MYSQL)
_LONGBLOB = LargeBinary().with_variant(mysql.LONGBLOB(), *_MYSQL)
_DATETIME3 = DateTime().with_variant(mysql.DATETIME(fsp=3), *_MYSQL)
_TINYINT = SmallInteger().with_variant(mysql.TINYINT(), *_MYSQL)

# MariaDB (>= 10.2) and SQLite both accept a parenthesised expression default on JSON/TEXT.
_JSON_EMPTY_LIST = text("('[]')")
_JSON_EMPTY_OBJECT = text("('{}')")

DESIRED_STATES = ("running", "standby", "archived")
SHUTDOWN_SIGNALS = ("SIGTERM", "SIGINT", "SIGQUIT", "SIGKILL")
CHALLENGE_TYPES = ("HTTP-01", "DNS-01")


def _req(name: str, type_: TypeEngine[Any] | type[TypeEngine[Any]], **kw: Any) -> Column[Any]:
    """A NOT NULL column (the appendix's columns without `?`)."""
    return Column(name, type_, nullable=False, **kw)


def _opt(name: str, type_: TypeEngine[Any] | type[TypeEngine[Any]], **kw: Any) -> Column[Any]:
    """A nullable column (the appendix's `?`)."""
    return Column(name, type_, nullable=True, **kw)


def _enum(name: str, values: tuple[str, ...]) -> Enum:
    """Native ENUM on MySQL; on SQLite a CHECK constraint named `ck_<table>_<name>`."""
    return Enum(*values, name=name, native_enum=True, create_constraint=True)


def _pk() -> Column[int]:
    """The auto-increment `pk` every original table has."""
    return Column("pk", _PK, primary_key=True, autoincrement=True)


def _timestamps() -> list[Column[Any]]:
    """`created_at` (required) and `updated_at` (nullable), both unix milliseconds."""
    return [_req("created_at", BigInteger), _opt("updated_at", BigInteger)]


deployments = Table(
    "deployments",
    metadata,
    _pk(),
    _req("id", String(128)),
    _req("k8s_name", String(255)),
    _req("workspace_id", String(256)),
    _req("project_id", String(256)),
    _req("environment_id", String(128)),
    _opt("image", String(256)),
    _opt("build_id", String(128)),
    _opt("git_commit_sha", String(40)),
    _opt("git_branch", String(256)),
    _opt("git_commit_message", Text),
    _opt("git_commit_author_handle", String(256)),
    _opt("git_commit_author_avatar_url", String(512)),
    _opt("git_commit_timestamp", BigInteger),
    _req("sentinel_config", _LONGBLOB),
    _opt("openapi_spec", _LONGBLOB),
    _req("cpu_millicores", Integer),
    _req("memory_mib", Integer),
    _req("desired_state", _enum("desired_state", DESIRED_STATES), server_default="running"),
    _req("encrypted_environment_variables", _LONGBLOB),
    _req("command", JSON, server_default=_JSON_EMPTY_LIST),
    _req("port", Integer, server_default=text("8080")),
    _req("shutdown_signal", _enum("shutdown_signal", SHUTDOWN_SIGNALS), server_default="SIGTERM"),
    _opt("healthcheck", JSON),
    _req(
        "status",
        _enum("status", ("pending", "building", "deploying", "network", "ready", "failed")),
        server_default="pending",
    ),
    *_timestamps(),
    UniqueConstraint("id", name="uq_deployments_id"),
    UniqueConstraint("k8s_name", name="uq_deployments_k8s_name"),
    UniqueConstraint("build_id", name="uq_deployments_build_id"),
    Index("ix_deployments_environment_id_status", "environment_id", "status"),
    **_MYSQL_TABLE,
)

deployment_topology = Table(
    "deployment_topology",
    metadata,
    _pk(),
    _req("workspace_id", String(64)),
    _req("deployment_id", String(64)),
    _req("region", String(64)),
    _req("desired_replicas", Integer),
    _req("version", _BIGINT_UNSIGNED),
    _req("desired_status", _enum("desired_status", ("starting", "started", "stopping", "stopped"))),
    *_timestamps(),
    UniqueConstraint("deployment_id", "region", name="uq_deployment_topology_deployment_id_region"),
    UniqueConstraint("region", "version", name="uq_deployment_topology_region_version"),
    Index("ix_deployment_topology_deployment_id", "deployment_id"),
    **_MYSQL_TABLE,
)

workspaces = Table(
    "workspaces",
    metadata,
    _pk(),
    _req("id", String(256)),
    _req("org_id", String(256)),
    _req("name", String(256)),
    _req("slug", String(64)),
    _opt("k8s_namespace", String(256)),
    _opt("partition_id", String(256)),
    _opt("plan", _enum("plan", ("free", "pro", "enterprise")), server_default="free"),
    _opt("tier", String(256), server_default="Free"),
    _opt("stripe_customer_id", String(256)),
    _opt("stripe_subscription_id", String(256)),
    _req("beta_features", JSON),
    _req("features", JSON),
    _opt("subscriptions", JSON),
    _req("enabled", Boolean, server_default=true()),
    _opt("delete_protection", Boolean, server_default=false()),
    _req("created_at_m", BigInteger, server_default=text("0")),
    _opt("updated_at_m", BigInteger),
    _opt("deleted_at_m", BigInteger),
    UniqueConstraint("id", name="uq_workspaces_id"),
    UniqueConstraint("org_id", name="uq_workspaces_org_id"),
    UniqueConstraint("slug", name="uq_workspaces_slug"),
    UniqueConstraint("k8s_namespace", name="uq_workspaces_k8s_namespace"),
    **_MYSQL_TABLE,
)

projects = Table(
    "projects",
    metadata,
    _pk(),
    _req("id", String(64)),
    _req("workspace_id", String(256)),
    _req("name", String(256)),
    _req("slug", String(256)),
    _opt("live_deployment_id", String(256)),
    _req("is_rolled_back", Boolean, server_default=false()),
    _opt("default_branch", String(256), server_default="main"),
    _opt("depot_project_id", String(255)),
    _opt("delete_protection", Boolean, server_default=false()),
    *_timestamps(),
    UniqueConstraint("id", name="uq_projects_id"),
    UniqueConstraint("workspace_id", "slug", name="uq_projects_workspace_id_slug"),
    **_MYSQL_TABLE,
)

environments = Table(
    "environments",
    metadata,
    _pk(),
    _req("id", String(128)),
    _req("workspace_id", String(256)),
    _req("project_id", String(256)),
    _req("slug", String(256)),
    _req("description", String(255), server_default=""),
    _req("sentinel_config", _LONGBLOB),
    _opt("delete_protection", Boolean, server_default=false()),
    *_timestamps(),
    UniqueConstraint("id", name="uq_environments_id"),
    UniqueConstraint("project_id", "slug", name="uq_environments_project_id_slug"),
    Index("ix_environments_slug", "slug"),
    **_MYSQL_TABLE,
)

environment_runtime_settings = Table(
    "environment_runtime_settings",
    metadata,
    _pk(),
    _req("workspace_id", String(256)),
    _req("environment_id", String(128)),
    _req("port", Integer, server_default=text("8080")),
    _req("cpu_millicores", Integer, server_default=text("256")),
    _req("memory_mib", Integer, server_default=text("256")),
    _req("command", JSON, server_default=_JSON_EMPTY_LIST),
    _opt("healthcheck", JSON),
    _req("region_config", JSON, server_default=_JSON_EMPTY_OBJECT),
    _req("shutdown_signal", _enum("shutdown_signal", SHUTDOWN_SIGNALS), server_default="SIGTERM"),
    *_timestamps(),
    UniqueConstraint("environment_id", name="uq_environment_runtime_settings_environment_id"),
    **_MYSQL_TABLE,
)

sentinels = Table(
    "sentinels",
    metadata,
    _pk(),
    _req("id", String(64)),
    _req("workspace_id", String(255)),
    _req("project_id", String(255)),
    _req("environment_id", String(255)),
    _req("k8s_name", String(64)),
    _req("k8s_address", String(255)),
    _req("region", String(255)),
    _req("image", String(255)),
    _req("desired_state", _enum("desired_state", DESIRED_STATES), server_default="running"),
    _req(
        "health",
        _enum("health", ("unknown", "paused", "healthy", "unhealthy")),
        server_default="unknown",
    ),
    _req("desired_replicas", Integer),
    _req("available_replicas", Integer),
    _req("cpu_millicores", Integer),
    _req("memory_mib", Integer),
    _req("version", _BIGINT_UNSIGNED),
    *_timestamps(),
    UniqueConstraint("id", name="uq_sentinels_id"),
    UniqueConstraint("k8s_name", name="uq_sentinels_k8s_name"),
    UniqueConstraint("k8s_address", name="uq_sentinels_k8s_address"),
    UniqueConstraint("environment_id", "region", name="uq_sentinels_environment_id_region"),
    UniqueConstraint("region", "version", name="uq_sentinels_region_version"),
    **_MYSQL_TABLE,
)

cilium_network_policies = Table(
    "cilium_network_policies",
    metadata,
    _pk(),
    _req("id", String(64)),
    _req("workspace_id", String(255)),
    _req("project_id", String(255)),
    _req("environment_id", String(255)),
    _req("deployment_id", String(128)),
    _req("k8s_name", String(64)),
    _req("k8s_namespace", String(255)),
    _req("region", String(255)),
    _req("policy", JSON),
    _req("version", _BIGINT_UNSIGNED),
    *_timestamps(),
    UniqueConstraint("id", name="uq_cilium_network_policies_id"),
    UniqueConstraint(
        "deployment_id",
        "region",
        "k8s_name",
        name="uq_cilium_network_policies_deployment_id_region_k8s_name",
    ),
    UniqueConstraint("region", "version", name="uq_cilium_network_policies_region_version"),
    **_MYSQL_TABLE,
)

instances = Table(
    "instances",
    metadata,
    _pk(),
    _req("id", String(64)),
    _req("deployment_id", String(255)),
    _req("workspace_id", String(255)),
    _req("project_id", String(255)),
    _req("region", String(64)),
    _req("k8s_name", String(255)),
    _req("address", String(255)),
    _req("cpu_millicores", Integer),
    _req("memory_mib", Integer),
    _req("status", _enum("status", ("inactive", "pending", "running", "failed"))),
    UniqueConstraint("id", name="uq_instances_id"),
    UniqueConstraint("address", "region", name="uq_instances_address_region"),
    UniqueConstraint("k8s_name", "region", name="uq_instances_k8s_name_region"),
    Index("ix_instances_deployment_id_region", "deployment_id", "region"),
    **_MYSQL_TABLE,
)

frontline_routes = Table(
    "frontline_routes",
    metadata,
    _pk(),
    _req("id", String(128)),
    _req("project_id", String(255)),
    _req("deployment_id", String(255)),
    _req("environment_id", String(255)),
    _req("fully_qualified_domain_name", String(256)),
    _req(
        "sticky",
        _enum("sticky", ("none", "branch", "environment", "live")),
        server_default="none",
    ),
    *_timestamps(),
    UniqueConstraint("id", name="uq_frontline_routes_id"),
    UniqueConstraint(
        "fully_qualified_domain_name", name="uq_frontline_routes_fully_qualified_domain_name"
    ),
    Index("ix_frontline_routes_project_id", "project_id"),
    Index("ix_frontline_routes_environment_id_sticky", "environment_id", "sticky"),
    **_MYSQL_TABLE,
)

custom_domains = Table(
    "custom_domains",
    metadata,
    _pk(),
    _req("id", String(128)),
    _req("workspace_id", String(256)),
    _req("project_id", String(256)),
    _req("environment_id", String(256)),
    _req("domain", String(256)),
    _req("challenge_type", _enum("challenge_type", CHALLENGE_TYPES)),
    _req(
        "verification_status",
        _enum("verification_status", ("pending", "verifying", "verified", "failed")),
        server_default="pending",
    ),
    _req("verification_token", String(64)),
    _req("ownership_verified", Boolean, server_default=false()),
    _req("cname_verified", Boolean, server_default=false()),
    _req("target_cname", String(256)),
    _opt("last_checked_at", BigInteger),
    _req("check_attempts", Integer, server_default=text("0")),
    _opt("verification_error", String(512)),
    _opt("invocation_id", String(256)),
    *_timestamps(),
    UniqueConstraint("id", name="uq_custom_domains_id"),
    UniqueConstraint("target_cname", name="uq_custom_domains_target_cname"),
    UniqueConstraint("domain", name="uq_custom_domains_domain"),
    Index("ix_custom_domains_workspace_id", "workspace_id"),
    **_MYSQL_TABLE,
)

acme_challenges = Table(
    "acme_challenges",
    metadata,
    _pk(),
    _req("domain_id", String(255)),
    _req("workspace_id", String(255)),
    _req("token", String(255)),
    _req("challenge_type", _enum("challenge_type", CHALLENGE_TYPES)),
    _req("authorization", String(255)),
    _req("status", _enum("status", ("waiting", "pending", "verified", "failed"))),
    _req("expires_at", BigInteger),
    *_timestamps(),
    UniqueConstraint("domain_id", name="uq_acme_challenges_domain_id"),
    Index("ix_acme_challenges_status", "status"),
    **_MYSQL_TABLE,
)

acme_users = Table(
    "acme_users",
    metadata,
    _pk(),
    _req("id", String(128)),
    _req("workspace_id", String(255)),
    _req("encrypted_key", Text),
    _opt("registration_uri", Text),
    *_timestamps(),
    UniqueConstraint("id", name="uq_acme_users_id"),
    **_MYSQL_TABLE,
)

certificates = Table(
    "certificates",
    metadata,
    _pk(),
    _req("id", String(64)),
    _req("workspace_id", String(255)),
    _req("hostname", String(255)),
    _req("certificate", Text),
    _req("encrypted_private_key", Text),
    *_timestamps(),
    UniqueConstraint("id", name="uq_certificates_id"),
    UniqueConstraint("hostname", name="uq_certificates_hostname"),
    **_MYSQL_TABLE,
)

clickhouse_workspace_settings = Table(
    "clickhouse_workspace_settings",
    metadata,
    _pk(),
    _req("workspace_id", String(256)),
    _req("username", String(256)),
    _req("password_encrypted", Text),
    _req("quota_duration_seconds", Integer, server_default=text("3600")),
    _req("max_queries_per_window", Integer, server_default=text("1000")),
    _req("max_execution_time_per_window", Integer, server_default=text("1800")),
    _req("max_query_execution_time", Integer, server_default=text("30")),
    _req("max_query_memory_bytes", BigInteger, server_default=text("1000000000")),
    _req("max_query_result_rows", Integer, server_default=text("10000")),
    _req("created_at", BigInteger, server_default=text("0")),
    _opt("updated_at", BigInteger),
    UniqueConstraint("workspace_id", name="uq_clickhouse_workspace_settings_workspace_id"),
    UniqueConstraint("username", name="uq_clickhouse_workspace_settings_username"),
    **_MYSQL_TABLE,
)

quota = Table(
    "quota",
    metadata,
    _pk(),
    _req("workspace_id", String(256)),
    _req("requests_per_month", BigInteger, server_default=text("0")),
    _req("logs_retention_days", Integer, server_default=text("0")),
    _req("audit_logs_retention_days", Integer, server_default=text("0")),
    _req("team", Boolean, server_default=false()),
    UniqueConstraint("workspace_id", name="uq_quota_workspace_id"),
    **_MYSQL_TABLE,
)

keys = Table(
    "keys",
    metadata,
    _pk(),
    _req("id", String(256)),
    _req("key_auth_id", String(256)),
    _req("hash", String(256)),
    _req("start", String(256)),
    _req("workspace_id", String(256)),
    _opt("for_workspace_id", String(256)),
    _opt("name", String(256)),
    _opt("owner_id", String(256)),
    _opt("identity_id", String(256)),
    _opt("meta", Text),
    _opt("expires", _DATETIME3),
    _req("created_at_m", BigInteger, server_default=text("0")),
    _opt("updated_at_m", BigInteger),
    _opt("deleted_at_m", BigInteger),
    _opt("refill_day", _TINYINT),
    _opt("refill_amount", Integer),
    _opt("last_refill_at", _DATETIME3),
    _req("enabled", Boolean, server_default=true()),
    _opt("remaining_requests", Integer),
    _opt("ratelimit_async", Boolean),
    _opt("ratelimit_limit", Integer),
    _opt("ratelimit_duration", BigInteger),
    _opt("environment", String(256)),
    _opt("pending_migration_id", String(256)),
    UniqueConstraint("id", name="uq_keys_id"),
    UniqueConstraint("hash", name="uq_keys_hash"),
    Index("ix_keys_refill_day", "refill_day"),
    Index("ix_keys_workspace_id", "workspace_id"),
    **_MYSQL_TABLE,
)

audit_log = Table(
    "audit_log",
    metadata,
    _pk(),
    _req("id", String(256)),
    _req("workspace_id", String(256)),
    _req("bucket", String(256), server_default="unkey_mutations"),
    _req("bucket_id", String(256)),
    _req("event", String(256)),
    _req("time", BigInteger),
    _req("display", String(256)),
    _opt("remote_ip", String(256)),
    _opt("user_agent", String(256)),
    _req("actor_type", String(256)),
    _req("actor_id", String(256)),
    _opt("actor_name", String(256)),
    _opt("actor_meta", JSON),
    *_timestamps(),
    UniqueConstraint("id", name="uq_audit_log_id"),
    **_MYSQL_TABLE,
)

audit_log_target = Table(
    "audit_log_target",
    metadata,
    _pk(),
    _req("workspace_id", String(256)),
    _req("bucket_id", String(256)),
    _req("bucket", String(256), server_default="unkey_mutations"),
    _req("audit_log_id", String(256)),
    _req("display_name", String(256)),
    _req("type", String(256)),
    _req("id", String(256)),
    _opt("name", String(256)),
    _opt("meta", JSON),
    *_timestamps(),
    UniqueConstraint("audit_log_id", "id", name="uq_audit_log_target_audit_log_id_id"),
    **_MYSQL_TABLE,
)

# The worker's own tables: state the original kept in Restate's per-key storage.

# VersioningService: one strictly increasing counter per region (first value handed out: 1).
region_versions = Table(
    "region_versions",
    metadata,
    _req("region", String(64), primary_key=True),
    _req("version", _BIGINT_UNSIGNED, server_default=text("0")),
    _opt("updated_at", BigInteger),
    **_MYSQL_TABLE,
)

# DeploymentService: the pending desired-state change per deployment; the newest nonce wins.
deployment_transitions = Table(
    "deployment_transitions",
    metadata,
    _req("deployment_id", String(128), primary_key=True),
    _req("nonce", String(64)),
    _req("state", _enum("state", DESIRED_STATES)),
    _opt("scheduled_flow_run_id", String(64)),
    *_timestamps(),
    **_MYSQL_TABLE,
)

# DeployService: why a deploy ended `failed` (the original's table has no message column), so
# an operator sees the reason next to the status the give-up hook wrote.
deployment_failures = Table(
    "deployment_failures",
    metadata,
    _req("deployment_id", String(128), primary_key=True),
    _req("message", String(1024)),
    _opt("flow_run_id", String(64)),
    _req("failed_at", BigInteger),
    **_MYSQL_TABLE,
)

# CertificateService: why a domain's challenge ended `failed` (acme_challenges has no message
# column), so an operator sees the CA's detail next to the status the give-up hook wrote, and
# how many times in a row it failed (the renewal sweep's backoff doubles with `failures`).
acme_challenge_failures = Table(
    "acme_challenge_failures",
    metadata,
    _req("domain_id", String(255), primary_key=True),
    _req("message", String(1024)),
    _req("failed_at", BigInteger),
    _req("failures", Integer, server_default=text("1")),
    **_MYSQL_TABLE,
)

# QuotaCheckService: when a workspace over its quota was last notified in a billing period
# (`YYYY-MM`; a reminder only 6 d 20 h later), and `sending_token`/`sending_at` while a Slack
# message may be in flight (set before the POST, cleared after: one left behind is taken as
# delivered, so a message is never sent twice). `notifications` counts the period's messages.
quota_notifications = Table(
    "quota_notifications",
    metadata,
    _req("billing_period", String(7), primary_key=True),
    _req("workspace_id", String(256), primary_key=True),
    _opt("notified_at", BigInteger),
    _opt("sending_token", String(64)),
    _opt("sending_at", BigInteger),
    _req("notifications", Integer, server_default=text("0")),
    **_MYSQL_TABLE,
)

# KeyRefillService: how far the refill of one day (`YYYY-MM-DD`) got, so a resumed run skips
# the keys it already refilled.
key_refill_progress = Table(
    "key_refill_progress",
    metadata,
    _req("refill_date", String(10), primary_key=True),
    _req("cursor_pk", _BIGINT_UNSIGNED, server_default=text("0")),
    _req("keys_refilled", BigInteger, server_default=text("0")),
    _opt("completed_at", BigInteger),
    _opt("updated_at", BigInteger),
    **_MYSQL_TABLE,
)


def missing_tables(url: str) -> list[str]:
    """Names of the schema's tables that do not exist in the database at ``url``, sorted."""
    existing = set(inspect(engine_for(url)).get_table_names())
    return sorted(name for name in metadata.tables if name not in existing)


def init_schema(url: str) -> list[str]:
    """Create every missing table (with its indexes) and return their names, sorted.

    Idempotent: existing tables are left untouched, never altered, so a second call creates
    nothing and returns ``[]``. ``IF NOT EXISTS`` keeps two processes initialising the same
    fresh database at once (two workers on one SQLite file) from failing each other.
    """
    created = missing_tables(url)
    with engine_for(url).begin() as connection:
        for name in created:
            table = metadata.tables[name]
            connection.execute(CreateTable(table, if_not_exists=True))
            for index in sorted(table.indexes, key=lambda index: str(index.name)):
                connection.execute(CreateIndex(index, if_not_exists=True))
    return created
