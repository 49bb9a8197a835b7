"""The control-plane schema on both backends: tables, columns, constraints, enums, defaults.

Every test runs on SQLite and on MariaDB, each against a fresh database of its own.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from tasks.db.engine import engine_for, transaction
from tasks.db.schema import (
    certificates,
    deployment_topology,
    deployment_transitions,
    deployments,
    frontline_routes,
    init_schema,
    key_refill_progress,
    missing_tables,
    quota_notifications,
    region_versions,
    workspaces,
)

APPENDIX_TABLES = {
    "acme_challenges",
    "acme_users",
    "audit_log",
    "audit_log_target",
    "certificates",
    "cilium_network_policies",
    "clickhouse_workspace_settings",
    "custom_domains",
    "deployment_topology",
    "deployments",
    "environment_runtime_settings",
    "environments",
    "frontline_routes",
    "instances",
    "keys",
    "projects",
    "quota",
    "sentinels",
    "workspaces",
}
WORKER_TABLES = {
    "acme_challenge_failures",
    "deployment_failures",
    "deployment_transitions",
    "key_refill_progress",
    "quota_notifications",
    "region_versions",
}
ALL_TABLES = sorted(APPENDIX_TABLES | WORKER_TABLES)

# Columns in table order, in the appendix's notation: a trailing `?` marks a nullable column.
EXPECTED_COLUMNS = {
    "deployments": "pk id k8s_name workspace_id project_id environment_id image? build_id?"
    " git_commit_sha? git_branch? git_commit_message? git_commit_author_handle?"
    " git_commit_author_avatar_url? git_commit_timestamp? sentinel_config openapi_spec?"
    " cpu_millicores memory_mib desired_state encrypted_environment_variables command port"
    " shutdown_signal healthcheck? status created_at updated_at?",
    "keys": "pk id key_auth_id hash start workspace_id for_workspace_id? name? owner_id?"
    " identity_id? meta? expires? created_at_m updated_at_m? deleted_at_m? refill_day?"
    " refill_amount? last_refill_at? enabled remaining_requests? ratelimit_async?"
    " ratelimit_limit? ratelimit_duration? environment? pending_migration_id?",
    "acme_challenges": "pk domain_id workspace_id token challenge_type authorization status"
    " expires_at created_at updated_at?",
    "frontline_routes": "pk id project_id deployment_id environment_id"
    " fully_qualified_domain_name sticky created_at updated_at?",
    "deployment_topology": "pk workspace_id deployment_id region desired_replicas version"
    " desired_status created_at updated_at?",
}

REQUIRED_INDEXES = {
    "keys": {"ix_keys_refill_day", "ix_keys_workspace_id"},
    "frontline_routes": {
        "ix_frontline_routes_project_id",
        "ix_frontline_routes_environment_id_sticky",
    },
    "deployment_topology": {"ix_deployment_topology_deployment_id"},
    "instances": {"ix_instances_deployment_id_region"},
    "deployments": {"ix_deployments_environment_id_status"},
    "environments": {"ix_environments_slug"},
    "acme_challenges": {"ix_acme_challenges_status"},
    "custom_domains": {"ix_custom_domains_workspace_id"},
}


@pytest.fixture(params=["sqlite", pytest.param("mariadb", marks=pytest.mark.mysql)])
def empty_url(request: pytest.FixtureRequest) -> str:
    """A fresh database without tables, on each backend."""
    fixture = "sqlite_url" if request.param == "sqlite" else "empty_mysql_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
def url(empty_url: str) -> str:
    """A fresh database with the schema, on each backend."""
    init_schema(empty_url)
    return empty_url


def _uid(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def _deployment(**overrides: Any) -> dict[str, Any]:
    deployment_id = _uid("d")
    return {
        "id": deployment_id,
        "k8s_name": deployment_id,
        "workspace_id": "ws_test",
        "project_id": "proj_test",
        "environment_id": "env_test",
        "sentinel_config": b"{}",
        "cpu_millicores": 256,
        "memory_mib": 256,
        "encrypted_environment_variables": b"",
        "created_at": 1,
        **overrides,
    }


def _frontline_route(**overrides: Any) -> dict[str, Any]:
    return {
        "id": _uid("fr"),
        "project_id": "proj_test",
        "deployment_id": "d_test",
        "environment_id": "env_test",
        "fully_qualified_domain_name": f"{_uid('host')}.example.com",
        "created_at": 1,
        **overrides,
    }


def _topology(**overrides: Any) -> dict[str, Any]:
    return {
        "workspace_id": "ws_test",
        "deployment_id": _uid("d"),
        "region": "eu-west-1",
        "desired_replicas": 1,
        "version": 1,
        "desired_status": "starting",
        "created_at": 1,
        **overrides,
    }


def _certificate(**overrides: Any) -> dict[str, Any]:
    return {
        "id": _uid("cert"),
        "workspace_id": "ws_test",
        "hostname": f"{_uid('host')}.example.com",
        "certificate": "PEM",
        "encrypted_private_key": "sealed",
        "created_at": 1,
        **overrides,
    }


def _quota_notification(**overrides: Any) -> dict[str, Any]:
    return {"billing_period": "2025-01", "workspace_id": _uid("ws"), "notified_at": 1, **overrides}


def _insert(url: str, table: sa.Table, row: dict[str, Any]) -> None:
    with transaction(url) as connection:
        connection.execute(table.insert().values(**row))


def _columns(url: str, table: str) -> dict[str, Any]:
    return {column["name"]: column for column in sa.inspect(engine_for(url)).get_columns(table)}


def test_init_schema_creates_every_table_once_and_keeps_rows(empty_url: str) -> None:
    """`db init` creates all original and worker tables; running it again changes nothing."""
    assert init_schema(empty_url) == ALL_TABLES
    assert set(ALL_TABLES) <= set(sa.inspect(engine_for(empty_url)).get_table_names())
    _insert(empty_url, region_versions, {"region": "eu-west-1", "version": 7})

    assert init_schema(empty_url) == []

    with transaction(empty_url) as connection:
        version = connection.execute(sa.select(region_versions.c.version)).scalar_one()
    assert version == 7


def test_init_schema_creates_the_secondary_indexes(url: str) -> None:
    """The indexes the worker's scans and lookups rely on exist, under their fixed names."""
    inspector = sa.inspect(engine_for(url))
    for table, expected in REQUIRED_INDEXES.items():
        assert expected <= {index["name"] for index in inspector.get_indexes(table)}, table


@pytest.mark.parametrize("table", sorted(EXPECTED_COLUMNS))
def test_columns_keep_the_original_names_and_nullability(url: str, table: str) -> None:
    """An existing Unkey database and ours agree on column names and which ones may be NULL."""
    expected = [(spec.rstrip("?"), spec.endswith("?")) for spec in EXPECTED_COLUMNS[table].split()]
    reflected = [(column["name"], column["nullable"]) for column in _columns(url, table).values()]
    assert reflected == expected


def test_string_lengths_match_the_original(url: str) -> None:
    """Varchar lengths are the original's, so values that fit there fit here (both backends)."""
    assert _columns(url, "frontline_routes")["fully_qualified_domain_name"]["type"].length == 256
    assert _columns(url, "deployment_topology")["region"]["type"].length == 64
    assert _columns(url, "deployments")["git_commit_sha"]["type"].length == 40
    assert _columns(url, "acme_challenges")["authorization"]["type"].length == 255


@pytest.mark.mysql
def test_mysql_column_types_match_the_original(empty_mysql_url: str) -> None:
    """On MariaDB the column types are the original's (enums, unsigned, longblob, datetime(3))."""
    url = empty_mysql_url
    init_schema(url)
    deployment = _columns(url, "deployments")
    assert deployment["status"]["type"].enums == [
        "pending",
        "building",
        "deploying",
        "network",
        "ready",
        "failed",
    ]
    assert deployment["desired_state"]["type"].enums == ["running", "standby", "archived"]
    assert isinstance(deployment["sentinel_config"]["type"], mysql.LONGBLOB)
    assert isinstance(deployment["pk"]["type"], mysql.BIGINT)
    assert deployment["pk"]["type"].unsigned
    assert deployment["pk"]["autoincrement"]

    version = _columns(url, "deployment_topology")["version"]["type"]
    assert isinstance(version, mysql.BIGINT)
    assert version.unsigned

    key = _columns(url, "keys")
    for column in ("last_refill_at", "expires"):
        assert isinstance(key[column]["type"], mysql.DATETIME)
        assert key[column]["type"].fsp == 3
    assert isinstance(key["refill_day"]["type"], mysql.TINYINT)

    acme = _columns(url, "acme_challenges")
    assert acme["challenge_type"]["type"].enums == ["HTTP-01", "DNS-01"]
    assert _columns(url, "frontline_routes")["sticky"]["type"].enums == [
        "none",
        "branch",
        "environment",
        "live",
    ]


@pytest.mark.parametrize(
    ("table", "make_row", "shared", "second_only"),
    [
        (
            frontline_routes,
            _frontline_route,
            {"fully_qualified_domain_name": "api.example.com"},
            {},
        ),
        (deployment_topology, _topology, {"region": "us-east-1", "version": 42}, {}),
        # A different version, so that only (deployment_id, region) collides.
        (
            deployment_topology,
            _topology,
            {"deployment_id": "d_same", "region": "us-east-1"},
            {"version": 2},
        ),
        (certificates, _certificate, {"hostname": "shop.example.com"}, {}),
        (quota_notifications, _quota_notification, {"workspace_id": "ws_same"}, {}),
    ],
    ids=[
        "route-fqdn",
        "topology-region-version",
        "topology-deployment-region",
        "certificate-hostname",
        "quota-notification-once-per-period",
    ],
)
def test_unique_constraints_reject_duplicates(
    url: str,
    table: sa.Table,
    make_row: Callable[..., dict[str, Any]],
    shared: dict[str, Any],
    second_only: dict[str, Any],
) -> None:
    """A second row with the same unique key is refused, whatever else differs."""
    _insert(url, table, make_row(**shared))
    _insert(url, table, make_row())  # a row with other unique values is accepted

    with pytest.raises(sa.exc.IntegrityError):
        _insert(url, table, make_row(**shared, **second_only))


@pytest.mark.parametrize(
    ("table", "row"),
    [
        (deployments, _deployment(status="bogus")),
        (deployments, _deployment(desired_state="paused")),
        (frontline_routes, _frontline_route(sticky="forever")),
        (deployment_topology, _topology(desired_status="exploded")),
        (
            deployment_transitions,
            {"deployment_id": "d_x", "nonce": "n", "state": "deleted", "created_at": 1},
        ),
    ],
    ids=["deployment-status", "desired-state", "sticky", "desired-status", "transition-state"],
)
def test_enum_columns_reject_unknown_values(url: str, table: sa.Table, row: dict[str, Any]) -> None:
    """An enum column stores only its listed values: MariaDB's ENUM and SQLite's CHECK agree."""
    # MariaDB (strict mode) reports a truncated enum value as DataError, SQLite's CHECK as
    # IntegrityError.
    with pytest.raises((sa.exc.IntegrityError, sa.exc.DataError)):
        _insert(url, table, row)
    with transaction(url) as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(table)).scalar() == 0


def test_server_defaults_apply_to_omitted_columns(url: str) -> None:
    """Rows written without the defaulted columns get the original's defaults on both backends."""
    deployment = _deployment()
    _insert(url, deployments, deployment)
    workspace_id = _uid("ws")
    _insert(
        url,
        workspaces,
        {
            "id": workspace_id,
            "org_id": _uid("org"),
            "name": "Acme",
            "slug": _uid("acme"),
            "beta_features": {},
            "features": {},
        },
    )
    _insert(url, region_versions, {"region": "ap-south-1"})
    _insert(url, key_refill_progress, {"refill_date": "2025-01-31"})

    with transaction(url) as connection:
        row = connection.execute(
            sa.select(deployments).where(deployments.c.id == deployment["id"])
        ).one()
        workspace = connection.execute(
            sa.select(workspaces).where(workspaces.c.id == workspace_id)
        ).one()
        version = connection.execute(sa.select(region_versions.c.version)).scalar_one()
        progress = connection.execute(sa.select(key_refill_progress)).one()

    assert (row.desired_state, row.status, row.shutdown_signal) == ("running", "pending", "SIGTERM")
    assert (row.command, row.port) == ([], 8080)
    assert workspace.enabled is True
    assert workspace.delete_protection is False
    assert (workspace.plan, workspace.tier, workspace.created_at_m) == ("free", "Free", 0)
    assert version == 0
    assert (progress.cursor_pk, progress.keys_refilled, progress.completed_at) == (0, 0, None)


def test_missing_tables_reports_an_uninitialised_database(empty_url: str) -> None:
    """The runtime can tell an uninitialised database (every table missing) from a ready one."""
    assert missing_tables(empty_url) == ALL_TABLES
    init_schema(empty_url)
    assert missing_tables(empty_url) == []
