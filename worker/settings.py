"""Worker configuration: environment variables ``UNKEY_*`` (also read from ``.env``).

The names follow the original worker's flags. With no configuration at all the worker runs on
embedded defaults (SPEC §2.2): everything it needs lives under ``UNKEY_STATE_DIR`` (``./.ctrl``).

Validation reports every problem at once, each naming its variable, and never prints a value
of a secret: ``collect_problems()`` is what ``ctrl-worker check-config`` prints, and
``load_settings()`` raises one ``ConfigError`` listing them all.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker.kernel.errors import ConfigError

__all__ = [
    "ENV_PREFIX",
    "Settings",
    "collect_problems",
    "env_name",
    "load_settings",
    "nameserver_address",
    "use_settings",
    "worker_settings",
]

ENV_PREFIX = "UNKEY_"

_HOST_NAME = re.compile(
    r"(?i)(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*"
)

LETS_ENCRYPT_PRODUCTION = "https://acme-v02.api.letsencrypt.org/directory"


def env_name(field: str) -> str:
    """The environment variable that sets a settings field."""
    return f"{ENV_PREFIX}{field.upper()}"


def _split_list(value: Any) -> Any:
    # The original's flags take comma-separated lists (`--available-regions a,b`); JSON lists
    # are accepted too so that `.env` files written for pydantic keep working.
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                # The decoder's own message points at a column of the value; say what is wanted.
                raise ValueError(
                    "must be comma-separated names or a JSON list of strings"
                ) from None
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Every setting of the worker; field ``x_y`` is the variable ``UNKEY_X_Y``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
    )

    # -- process ---------------------------------------------------------------------------
    instance_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    region: str = "local.dev"
    http_port: int = Field(default=7092, ge=0, le=65535)
    prometheus_port: int = Field(default=0, ge=0, le=65535)
    state_dir: Path = Path(".ctrl")
    # Runs start on the server's events; the poll is only the fallback (missed events).
    runner_poll_seconds: float = Field(default=2.0, gt=0, le=60)
    worker_limit: int = Field(default=10, ge=1, le=1000)
    lock_lease_seconds: int = Field(default=60, ge=60, le=86400)
    resume_max_attempts: int = Field(default=3, ge=0, le=100)
    reconcile_interval_seconds: float = Field(default=5.0, gt=0, le=3600)
    shutdown_grace_seconds: float = Field(default=30.0, ge=0, le=3600)
    durable_sleep_inline_seconds: float = Field(default=30.0, ge=0, le=3600)
    prefect_server_port: int = Field(default=0, ge=0, le=65535)
    prefect_server_database: Literal["postgres", "sqlite"] = "postgres"

    # -- control-plane database -------------------------------------------------------------
    # A URL can carry a password, so it is a secret: it never reaches logs or messages.
    database_primary: SecretStr | None = None

    # -- vault -----------------------------------------------------------------------------
    vault_url: str | None = None
    vault_token: SecretStr | None = None
    vault_master_key_file: Path | None = None

    # -- ACME ------------------------------------------------------------------------------
    acme_enabled: bool = False
    acme_directory_url: str = LETS_ENCRYPT_PRODUCTION
    acme_ca_bundle: Path | None = None
    acme_email_domain: str = "unkey.com"
    acme_http01_host: str = "0.0.0.0"
    acme_http01_port: int = Field(default=5002, ge=1, le=65535)
    acme_route53_enabled: bool = False
    acme_route53_access_key_id: str | None = None
    acme_route53_secret_access_key: SecretStr | None = None
    acme_route53_region: str = "us-east-1"
    acme_route53_hosted_zone_id: str | None = None
    acme_route53_endpoint_url: str | None = None

    # -- domains and regions ---------------------------------------------------------------
    default_domain: str = "unkey.app"
    regional_apex_domain: str | None = None
    available_regions: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["local.dev"])
    cname_domain: str | None = None
    # Custom-domain checks and DNS-01 propagation checks; empty = the system resolver.
    dns_nameservers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    custom_domain_check_seconds: float = Field(default=60.0, gt=0, le=86400)
    custom_domain_verify_timeout_seconds: float = Field(default=86400.0, gt=0, le=30 * 86400)
    cert_renewal_concurrency: int = Field(default=10, ge=1, le=1000)
    cron_missed_grace_seconds: float = Field(default=900.0, ge=0, le=7 * 86400)

    # -- builds ----------------------------------------------------------------------------
    build_backend: Literal["docker", "depot"] = "docker"
    build_platform: str = "linux/amd64"
    depot_api_url: str | None = None
    depot_project_region: str = "us-east-1"
    registry_url: str | None = None
    registry_username: str | None = None
    registry_password: SecretStr | None = None
    build_s3_url: str | None = None
    build_s3_external_url: str | None = None
    build_s3_bucket: str | None = None
    build_s3_access_key_id: str | None = None
    build_s3_access_key_secret: SecretStr | None = None
    github_app_id: int = Field(default=0, ge=0)
    github_private_key_pem: SecretStr | None = None
    github_api_url: str = "https://api.github.com"
    allow_unauthenticated_deployments: bool = False
    build_timeout_seconds: float = Field(default=3600.0, gt=0, le=86400)
    sentinel_image: str = "ghcr.io/unkeyed/unkey:latest"

    # -- deploys and the data plane ----------------------------------------------------------
    deploy_wait_timeout_seconds: float = Field(default=900.0, gt=0, le=86400)
    deploy_poll_seconds: float = Field(default=1.0, gt=0, le=60)
    # "local": the worker runs the local data-plane simulation in-process; "external": a real
    # data plane (krane) reports instances. Unset: local on the embedded defaults (no
    # UNKEY_DATABASE_PRIMARY), external otherwise.
    dataplane: Literal["local", "external"] | None = None
    dataplane_start_seconds: float = Field(default=0.5, ge=0, le=3600)

    # -- ClickHouse (optional, fix of the original which required it) -----------------------
    # Unset: an embedded chdb under the state directory on the embedded defaults (no
    # UNKEY_DATABASE_PRIMARY), none otherwise; set to the empty string: none (ClickHouse off).
    # Read it through ``analytics_clickhouse_url()``.
    clickhouse_url: SecretStr | None = None
    clickhouse_admin_url: SecretStr | None = None

    # -- heartbeats and notifications -------------------------------------------------------
    cert_renewal_heartbeat_url: SecretStr | None = None
    quota_check_heartbeat_url: SecretStr | None = None
    quota_check_slack_webhook_url: SecretStr | None = None
    key_refill_heartbeat_url: SecretStr | None = None

    # -- task results -------------------------------------------------------------------------
    results_path: Path | None = None
    results_s3_bucket: str | None = None
    results_s3_folder: str = "results"
    results_s3_region: str = "us-east-1"
    results_s3_endpoint_url: str | None = None
    results_s3_access_key_id: str | None = None
    results_s3_secret_access_key: SecretStr | None = None

    @field_validator("available_regions", mode="before")
    @classmethod
    def _regions_from_csv(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("dns_nameservers", mode="before")
    @classmethod
    def _nameservers_from_csv(cls, value: Any) -> Any:
        return _split_list(value)

    # -- derived -----------------------------------------------------------------------------
    @cached_property
    def state_path(self) -> Path:
        """The absolute state directory (flow-run processes may run in another cwd)."""
        return self.state_dir.expanduser().resolve()

    def database_url(self) -> str:
        """The control-plane database URL (secret: do not log it)."""
        if self.database_primary is not None and self.database_primary.get_secret_value():
            return self.database_primary.get_secret_value()
        return f"sqlite:///{self.state_path / 'ctrl.db'}"

    def master_key_path(self) -> Path:
        """Where the local vault keeps its master key (created 0600 on first use)."""
        if self.vault_master_key_file is not None:
            return self.vault_master_key_file.expanduser().resolve()
        return self.state_path / "vault-master.key"

    def results_dir(self) -> Path:
        """Local directory for persisted task results (when S3 is not configured)."""
        if self.results_path is not None:
            return self.results_path.expanduser().resolve()
        return self.state_path / "results"

    def build_architecture(self) -> str:
        """The architecture part of ``build_platform`` (``linux/amd64`` -> ``amd64``)."""
        return self.build_platform.lstrip("/").split("/")[1]

    def dataplane_mode(self) -> Literal["local", "external"]:
        """Which data plane reports instances (``UNKEY_DATAPLANE``, or its default)."""
        if self.dataplane is not None:
            return self.dataplane
        return "external" if _secret_set(self.database_primary) else "local"

    def analytics_clickhouse_url(self) -> str | None:
        """The analytics ClickHouse URL (secret: do not log it), or None when ClickHouse is off.

        ``UNKEY_CLICKHOUSE_URL`` when set; set to the empty string, ClickHouse is off. Unset, it
        is ``chdb:///<state dir>/clickhouse`` on the embedded defaults (no
        ``UNKEY_DATABASE_PRIMARY``: the embedded engine, no server needed), else off.
        """
        if self.clickhouse_url is not None:
            return self.clickhouse_url.get_secret_value().strip() or None
        if _secret_set(self.database_primary):
            return None
        return f"chdb://{self.state_path / 'clickhouse'}"

    def github_enabled(self) -> bool:
        """GitHub is enabled only with both an app id and a private key (as the original)."""
        return self.github_app_id != 0 and bool(
            self.github_private_key_pem and self.github_private_key_pem.get_secret_value()
        )

    # -- the original's validation rules (reference §1.1), plus ours --------------------------
    def problems(self) -> list[str]:
        """Every rule this configuration breaks, each naming its variable."""
        found: list[str] = []

        def missing(field: str, why: str) -> None:
            found.append(f"{env_name(field)} is required {why}")

        if self.acme_enabled and self.acme_route53_enabled:
            why = "when UNKEY_ACME_ROUTE53_ENABLED is true"
            if not self.acme_route53_access_key_id:
                missing("acme_route53_access_key_id", why)
            if not _secret_set(self.acme_route53_secret_access_key):
                missing("acme_route53_secret_access_key", why)
            if not self.acme_route53_region:
                missing("acme_route53_region", why)
        if self.build_platform:
            parts = self.build_platform.lstrip("/").split("/")
            if len(parts) != 2 or not all(parts):
                found.append(
                    f"{env_name('build_platform')}: invalid build platform format "
                    f"'{self.build_platform}' (expected format: linux/amd64)"
                )
            elif parts[0] != "linux":
                found.append(
                    f"{env_name('build_platform')}: unsupported OS '{parts[0]}' "
                    "(only linux is supported)"
                )
        if _secret_set(self.registry_password):
            why = "when UNKEY_REGISTRY_PASSWORD (the Depot token) is set"
            for field in ("registry_url", "registry_username", "depot_api_url"):
                if not getattr(self, field):
                    missing(field, why)
            if not self.depot_project_region:
                missing("depot_project_region", why)
        if self.vault_url and not _secret_set(self.vault_token):
            missing("vault_token", "when UNKEY_VAULT_URL is set")
        if not self.available_regions:
            found.append(f"{env_name('available_regions')} must name at least one region")
        for region in self.available_regions:
            if not region or "/" in region or len(region) > 64:
                found.append(
                    f"{env_name('available_regions')}: region '{region}' must be 1-64 "
                    "characters without '/'"
                )
        for entry in self.dns_nameservers:
            try:
                nameserver_address(entry)
            except ValueError as exc:
                found.append(f"{env_name('dns_nameservers')}: '{entry}' {exc}")
        if self.results_s3_bucket and self.results_path is not None:
            found.append(
                f"{env_name('results_path')} and {env_name('results_s3_bucket')} are "
                "mutually exclusive (task results go to one place)"
            )
        url = self.database_url()
        if not (url.startswith("sqlite") or url.startswith("mysql")):
            found.append(
                f"{env_name('database_primary')} must be a mysql+pymysql:// or sqlite:/// URL"
            )
        if self.http_port and self.http_port == self.prometheus_port:
            found.append(f"{env_name('prometheus_port')} must differ from {env_name('http_port')}")
        return found


def nameserver_address(entry: str) -> tuple[str, int]:
    """Parse one ``UNKEY_DNS_NAMESERVERS`` entry: ``host``, ``host:port`` or ``[ipv6]:port``.

    Args:
        entry: the entry as configured.

    Returns:
        The host (an IP address or a host name) and the port (53 when none is given).

    Raises:
        ValueError: the entry is not a host with an optional port 1-65535 (the message says
            what is wanted, without the entry).
    """
    text = entry.strip()
    host, port = text, "53"
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError("must be host, host:port or [ipv6]:port")
        port = rest[1:] if rest else "53"
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOST_NAME.fullmatch(host):
            raise ValueError("must be host, host:port or [ipv6]:port") from None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("has a port that is not 1-65535")
    return host, int(port)


def _secret_set(value: SecretStr | None) -> bool:
    return value is not None and bool(value.get_secret_value())


def _validation_problems(error: ValidationError) -> list[str]:
    problems = []
    for err in error.errors(include_input=False, include_url=False):
        field = str(err["loc"][0]) if err["loc"] else "?"
        # A list item's position (`UNKEY_AVAILABLE_REGIONS[1]`), so each item's problem is told.
        item = "".join(f"[{part}]" for part in err["loc"][1:])
        problems.append(f"{env_name(field)}{item}: {err['msg']}")
    return problems


def collect_problems(**overrides: Any) -> tuple[Settings | None, list[str]]:
    """Load the settings and return them with every problem found (type errors and rules).

    Returns:
        The settings (``None`` when a variable has the wrong type) and every problem found.
    """
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = _validation_problems(exc)
        return None, problems + _rule_problems_besides(exc, overrides)
    return settings, settings.problems()


def _rule_problems_besides(error: ValidationError, overrides: dict[str, Any]) -> list[str]:
    # A type error must not hide the rules the other variables break: `check-config` lists every
    # problem in one run. The rules run with each invalid variable at its default, and a rule
    # that names an invalid variable is left out (it would judge a value nobody set).
    invalid = {str(err["loc"][0]) for err in error.errors(include_input=False) if err["loc"]}
    defaults = {
        name: Settings.model_fields[name].get_default(call_default_factory=True)
        for name in invalid
        if name in Settings.model_fields
    }
    try:
        fallback = Settings(**{**overrides, **defaults})
    except ValidationError:
        return []
    names = [re.compile(rf"\b{re.escape(env_name(name))}\b") for name in invalid]
    return [p for p in fallback.problems() if not any(n.search(p) for n in names)]


def load_settings(**overrides: Any) -> Settings:
    """Load and validate the settings, or raise one ``ConfigError`` naming every problem."""
    settings, problems = collect_problems(**overrides)
    if problems or settings is None:
        raise ConfigError("bad config: " + "; ".join(problems))
    return settings


_current: Settings | None = None


def use_settings(settings: Settings | None) -> None:
    """Make ``settings`` this process's settings (embedding programs, tests); None reloads.

    Args:
        settings: the settings every later ``worker_settings()`` call returns, or None to
            read them from the environment again on the next call.
    """
    global _current
    _current = settings


def worker_settings() -> Settings:
    """The settings of this process, loaded once (flow-run processes inherit the environment).

    Raises:
        ConfigError: the environment's configuration is invalid (every problem named).
    """
    global _current
    if _current is None:
        _current = load_settings()
    return _current
