"""Tests of worker/settings.py: embedded defaults, the original's validation rules (reference
§1.1, ClickHouse optional), problem reporting, and secrets kept out of messages and reprs.

Every test sets variables with ``monkeypatch.setenv`` (conftest removes the developer's
``UNKEY_*`` variables) and passes ``_env_file=None`` so no ``.env`` file is read.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.kernel.errors import ConfigError
from worker.settings import ENV_PREFIX, Settings, collect_problems, env_name, load_settings

SECRETS = {
    "UNKEY_REGISTRY_PASSWORD": "REGISTRY-SENTINEL-a1",
    "UNKEY_DATABASE_PRIMARY": "mysql+pymysql://u:SENTINELPW@h/db",
    "UNKEY_ACME_ROUTE53_SECRET_ACCESS_KEY": "ROUTE53-SENTINEL-b2",
    "UNKEY_VAULT_TOKEN": "VAULT-SENTINEL-c3",
    "UNKEY_GITHUB_PRIVATE_KEY_PEM": "PEM-SENTINEL-d4",
    "UNKEY_CLICKHOUSE_ADMIN_URL": "http://admin:CHSENTINEL@ch:8123",
}


@pytest.fixture(autouse=True)
def _no_unkey_variables(monkeypatch) -> None:
    """Settings are read from a clean environment (session fixtures export UNKEY_STATE_DIR)."""
    import os

    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)


def _problems(**overrides) -> list[str]:
    return collect_problems(_env_file=None, **overrides)[1]


def _assert_hidden(text: str, *values: str) -> None:
    for value in values or tuple(SECRETS.values()):
        assert value not in text
    assert "SENTINEL" not in text


def test_env_name_follows_the_prefix() -> None:
    """Field ``x_y`` is set by ``UNKEY_X_Y``, the name every message uses."""
    assert ENV_PREFIX == "UNKEY_"
    assert env_name("acme_route53_region") == "UNKEY_ACME_ROUTE53_REGION"


def test_defaults_need_no_environment(tmp_path: Path, monkeypatch) -> None:
    """With no configuration at all the worker starts on embedded defaults (SPEC §2.2)."""
    monkeypatch.chdir(tmp_path)
    settings = load_settings(_env_file=None)
    assert settings.region == "local.dev"
    assert settings.http_port == 7092
    assert settings.prometheus_port == 0
    assert settings.available_regions == ["local.dev"]
    assert settings.database_url() == f"sqlite:///{tmp_path.resolve() / '.ctrl' / 'ctrl.db'}"
    assert settings.master_key_path() == tmp_path.resolve() / ".ctrl" / "vault-master.key"
    assert settings.results_dir() == tmp_path.resolve() / ".ctrl" / "results"
    assert settings.acme_enabled is False
    assert settings.clickhouse_url is None and settings.clickhouse_admin_url is None
    assert settings.vault_url is None
    assert settings.build_architecture() == "amd64"
    assert settings.github_enabled() is False
    assert _problems() == []


def test_variables_are_read_from_the_environment(monkeypatch) -> None:
    """Each ``UNKEY_*`` variable sets its field, case-insensitively typed."""
    monkeypatch.setenv("UNKEY_REGION", "eu-central-1.aws")
    monkeypatch.setenv("UNKEY_HTTP_PORT", "8080")
    monkeypatch.setenv("UNKEY_ACME_ENABLED", "true")
    monkeypatch.setenv("UNKEY_DATABASE_PRIMARY", "sqlite:///x.db")
    settings = load_settings(_env_file=None)
    assert (settings.region, settings.http_port, settings.acme_enabled) == (
        "eu-central-1.aws",
        8080,
        True,
    )
    assert settings.database_url() == "sqlite:///x.db"


def test_clickhouse_is_optional(monkeypatch) -> None:
    """Unlike the original, a missing ClickHouse URL is not a problem (SPEC §2.3 fix)."""
    monkeypatch.setenv("UNKEY_ACME_ENABLED", "true")
    assert _problems() == []


@pytest.mark.parametrize(
    "missing",
    [
        "UNKEY_ACME_ROUTE53_ACCESS_KEY_ID",
        "UNKEY_ACME_ROUTE53_SECRET_ACCESS_KEY",
        "UNKEY_ACME_ROUTE53_REGION",
    ],
)
def test_route53_with_acme_needs_its_credentials(monkeypatch, missing: str) -> None:
    """Route53 enabled with ACME needs an access key id, a secret and a region (rule 1)."""
    complete = {
        "UNKEY_ACME_ENABLED": "true",
        "UNKEY_ACME_ROUTE53_ENABLED": "true",
        "UNKEY_ACME_ROUTE53_ACCESS_KEY_ID": "AKIA1",
        "UNKEY_ACME_ROUTE53_SECRET_ACCESS_KEY": "ROUTE53-SENTINEL-b2",
        "UNKEY_ACME_ROUTE53_REGION": "eu-west-1",
    }
    for name, value in complete.items():
        monkeypatch.setenv(name, value)
    assert _problems() == []
    monkeypatch.setenv(missing, "")
    assert _problems() == [
        f"{missing} is required when UNKEY_ACME_ROUTE53_ENABLED is true",
    ]


def test_route53_without_acme_needs_nothing(monkeypatch) -> None:
    """Route53 credentials are only required when ACME itself is enabled (as the original)."""
    monkeypatch.setenv("UNKEY_ACME_ROUTE53_ENABLED", "true")
    assert _problems() == []


@pytest.mark.parametrize(
    ("platform", "expected"),
    [
        ("linux/amd64", None),
        ("/linux/arm64", None),
        ("linux", "invalid build platform format 'linux' (expected format: linux/amd64)"),
        ("linux/amd64/v8", "invalid build platform format"),
        ("linux/", "invalid build platform format"),
        ("windows/amd64", "unsupported OS 'windows' (only linux is supported)"),
    ],
)
def test_build_platform_is_linux_os_slash_arch(monkeypatch, platform, expected) -> None:
    """The build platform is ``linux/<arch>``, a leading '/' tolerated (rule 3)."""
    monkeypatch.setenv("UNKEY_BUILD_PLATFORM", platform)
    problems = _problems()
    if expected is None:
        assert problems == []
        assert load_settings(_env_file=None).build_architecture() == platform.split("/")[-1]
    else:
        assert len(problems) == 1
        assert problems[0].startswith("UNKEY_BUILD_PLATFORM: ")
        assert expected in problems[0]


def test_registry_password_needs_the_depot_settings(monkeypatch) -> None:
    """The Depot token needs the registry URL and user, the Depot API URL and region (rule 4)."""
    monkeypatch.setenv("UNKEY_REGISTRY_PASSWORD", SECRETS["UNKEY_REGISTRY_PASSWORD"])
    monkeypatch.setenv("UNKEY_DEPOT_PROJECT_REGION", "")
    problems = _problems()
    why = "is required when UNKEY_REGISTRY_PASSWORD (the Depot token) is set"
    assert problems == [
        f"UNKEY_REGISTRY_URL {why}",
        f"UNKEY_REGISTRY_USERNAME {why}",
        f"UNKEY_DEPOT_API_URL {why}",
        f"UNKEY_DEPOT_PROJECT_REGION {why}",
    ]
    for name, value in {
        "UNKEY_REGISTRY_URL": "registry.depot.dev",
        "UNKEY_REGISTRY_USERNAME": "x-token",
        "UNKEY_DEPOT_API_URL": "https://api.depot.dev",
        "UNKEY_DEPOT_PROJECT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    assert _problems() == []


def test_vault_url_needs_a_token(monkeypatch) -> None:
    """A remote vault without a bearer token cannot work: say so before startup."""
    monkeypatch.setenv("UNKEY_VAULT_URL", "https://vault.example")
    assert _problems() == ["UNKEY_VAULT_TOKEN is required when UNKEY_VAULT_URL is set"]


def test_every_problem_is_reported_at_once(monkeypatch) -> None:
    """One check lists every broken rule, so an operator fixes the config in one pass."""
    monkeypatch.setenv("UNKEY_ACME_ENABLED", "true")
    monkeypatch.setenv("UNKEY_ACME_ROUTE53_ENABLED", "true")
    monkeypatch.setenv("UNKEY_BUILD_PLATFORM", "darwin/arm64")
    monkeypatch.setenv("UNKEY_REGISTRY_PASSWORD", SECRETS["UNKEY_REGISTRY_PASSWORD"])
    monkeypatch.setenv("UNKEY_DATABASE_PRIMARY", "postgres://u:SENTINELPW@h/db")
    monkeypatch.setenv("UNKEY_PROMETHEUS_PORT", "7092")
    problems = _problems()
    for name in (
        "UNKEY_ACME_ROUTE53_ACCESS_KEY_ID",
        "UNKEY_ACME_ROUTE53_SECRET_ACCESS_KEY",
        "UNKEY_BUILD_PLATFORM",
        "UNKEY_REGISTRY_URL",
        "UNKEY_DEPOT_API_URL",
        "UNKEY_DATABASE_PRIMARY",
        "UNKEY_PROMETHEUS_PORT",
    ):
        assert any(p.startswith(name) for p in problems), (name, problems)
    with pytest.raises(ConfigError) as caught:
        load_settings(_env_file=None)
    assert str(caught.value).startswith("bad config: ")
    assert all(p in str(caught.value) for p in problems)
    _assert_hidden(str(caught.value))


def test_type_errors_name_the_variable(monkeypatch) -> None:
    """A value of the wrong type is reported with its variable name, next to the others."""
    monkeypatch.setenv("UNKEY_HTTP_PORT", "abc")
    monkeypatch.setenv("UNKEY_ACME_ENABLED", "maybe")
    monkeypatch.setenv("UNKEY_BUILD_BACKEND", "podman")
    monkeypatch.setenv("UNKEY_LOCK_LEASE_SECONDS", "5")
    settings, problems = collect_problems(_env_file=None)
    assert settings is None
    assert sorted(p.split(":")[0] for p in problems) == [
        "UNKEY_ACME_ENABLED",
        "UNKEY_BUILD_BACKEND",
        "UNKEY_HTTP_PORT",
        "UNKEY_LOCK_LEASE_SECONDS",
    ]
    assert "UNKEY_HTTP_PORT: Input should be a valid integer, unable to parse" in "\n".join(
        problems
    )
    with pytest.raises(ConfigError, match="UNKEY_HTTP_PORT"):
        load_settings(_env_file=None)


def test_type_errors_do_not_hide_rule_problems(monkeypatch) -> None:
    """A type error and a broken rule elsewhere are both reported by one check."""
    monkeypatch.setenv("UNKEY_HTTP_PORT", "abc")
    monkeypatch.setenv("UNKEY_BUILD_PLATFORM", "windows/amd64")
    monkeypatch.setenv("UNKEY_PROMETHEUS_PORT", "7092")  # equal only to the default http port
    problems = _problems()
    assert [p.split(":")[0].split(" ")[0] for p in problems] == [
        "UNKEY_HTTP_PORT",
        "UNKEY_BUILD_PLATFORM",
    ]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("us-east-1.aws,eu-central-1.aws", ["us-east-1.aws", "eu-central-1.aws"]),
        (" a , b ,, ", ["a", "b"]),
        ('["us-east-1.aws", "local.dev"]', ["us-east-1.aws", "local.dev"]),
        ("local.dev", ["local.dev"]),
    ],
)
def test_available_regions_from_csv_or_json(monkeypatch, raw, expected) -> None:
    """Regions are a comma-separated list (the original's flag) or a JSON list."""
    monkeypatch.setenv("UNKEY_AVAILABLE_REGIONS", raw)
    assert load_settings(_env_file=None).available_regions == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('["a",', "UNKEY_AVAILABLE_REGIONS: Value error, must be comma-separated names or a JSON"),
        ("[1]", "UNKEY_AVAILABLE_REGIONS[0]: Input should be a valid string"),
        ("[]", "UNKEY_AVAILABLE_REGIONS must name at least one region"),
        ("a/b", "UNKEY_AVAILABLE_REGIONS: region 'a/b' must be 1-64 characters"),
    ],
)
def test_bad_available_regions_name_the_variable(monkeypatch, raw, expected) -> None:
    """A bad region list is one clear problem naming the variable."""
    monkeypatch.setenv("UNKEY_AVAILABLE_REGIONS", raw)
    problems = _problems()
    assert len(problems) == 1
    assert problems[0].startswith(expected)


def test_each_bad_list_item_is_told_apart(monkeypatch) -> None:
    """Several bad items of a list are several problems, each with its position."""
    monkeypatch.setenv("UNKEY_AVAILABLE_REGIONS", '["ok", 1, 2]')
    assert _problems() == [
        "UNKEY_AVAILABLE_REGIONS[1]: Input should be a valid string",
        "UNKEY_AVAILABLE_REGIONS[2]: Input should be a valid string",
    ]


def test_secrets_never_appear_in_messages_or_repr(monkeypatch) -> None:
    """Passwords, tokens and keys stay out of every problem message and of repr(settings)."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("UNKEY_ACME_ENABLED", "true")
    monkeypatch.setenv("UNKEY_ACME_ROUTE53_ENABLED", "true")
    settings, problems = collect_problems(_env_file=None)
    assert settings is not None
    assert problems  # registry and route53 rules are broken
    _assert_hidden(repr(settings))
    _assert_hidden(str(settings))
    _assert_hidden("\n".join(problems))
    assert settings.database_url() == SECRETS["UNKEY_DATABASE_PRIMARY"]  # still usable


def test_invalid_values_are_not_echoed(monkeypatch) -> None:
    """A value that fails to parse may be a secret pasted in the wrong place: never echo it."""
    monkeypatch.setenv("UNKEY_HTTP_PORT", "SENTINEL-SECRET-123")
    monkeypatch.setenv("UNKEY_PROMETHEUS_PORT", "SENTINEL-SECRET-456")
    monkeypatch.setenv("UNKEY_GITHUB_APP_ID", "SENTINEL-SECRET-789")
    monkeypatch.setenv("UNKEY_ACME_ENABLED", "SENTINEL-SECRET-abc")
    monkeypatch.setenv("UNKEY_BUILD_BACKEND", "SENTINEL-SECRET-def")
    monkeypatch.setenv("UNKEY_AVAILABLE_REGIONS", '["SENTINEL-SECRET-ghi"')
    monkeypatch.setenv("UNKEY_REGISTRY_PASSWORD", SECRETS["UNKEY_REGISTRY_PASSWORD"])
    settings, problems = collect_problems(_env_file=None)
    assert settings is None
    assert len(problems) >= 6
    for problem in problems:
        _assert_hidden(problem)
    with pytest.raises(ConfigError) as caught:
        load_settings(_env_file=None)
    _assert_hidden(str(caught.value))
    _assert_hidden(repr(caught.value))


def test_settings_overrides_take_precedence(monkeypatch) -> None:
    """Keyword overrides (used by tests and the CLI) win over the environment."""
    monkeypatch.setenv("UNKEY_REGION", "from-env")
    settings = Settings(_env_file=None, region="from-override")
    assert settings.region == "from-override"
