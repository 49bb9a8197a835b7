"""The deploy's domain rules (tasks/domains.py) and Cilium policy documents (tasks/cilium.py):
the original's slug rules and FQDN shapes, and policies stable enough to compare."""

from __future__ import annotations

import pytest

from tasks.cilium import SENTINEL_NAMESPACE, network_policies, policy_id
from tasks.domains import Domain, build_domains, commit_suffix, sluggify


@pytest.mark.parametrize(
    ("branch", "slug"),
    [
        ("main", "main"),
        ("  Feature/Login_Page  ", "feature-login-page"),
        ("fix--double__under", "fix-double-under"),
        ("UPPER case", "upper-case"),
        ("a" * 79 + "-b" + "c" * 10, "a" * 79),  # cut at 80, then the trailing '-' goes
        ("!!!", ""),
    ],
)
def test_sluggify_follows_the_original(branch: str, slug: str) -> None:
    """Branch slugs: non-alphanumerics (also - and _) become one separator, lowercase, at most
    80 characters, never ending in '-'."""
    assert sluggify(branch) == slug


def test_production_gets_commit_branch_environment_and_live_domains() -> None:
    """A production deploy gets the four domains of the original, in its order, with the
    commit domain's random number."""
    domains = build_domains(
        project_slug="api",
        environment_slug="production",
        workspace_slug="acme",
        apex="unkey.app",
        commit_sha="ABCDEF0123456789",
        branch="Feature/X",
        suffix=4321,
    )

    assert domains == [
        Domain("api-git-abcdef0-4321-acme.unkey.app", "none"),
        Domain("api-git-feature-x-acme.unkey.app", "branch"),
        Domain("api-production-acme.unkey.app", "environment"),
        Domain("api-acme.unkey.app", "live"),
    ]


def test_other_environments_get_no_live_domain_and_no_commit_without_a_sha() -> None:
    """Outside production there is no live domain; a deployment without commit or branch has
    neither the commit nor the branch domain."""
    domains = build_domains(
        project_slug="api",
        environment_slug="preview",
        workspace_slug="acme",
        apex="unkey.app",
        commit_sha=None,
        branch=None,
        suffix=1000,
    )

    assert domains == [Domain("api-preview-acme.unkey.app", "environment")]


def test_commit_suffix_is_four_digits() -> None:
    """The commit domain's number is in 1000-9999, as the original's."""
    assert all(1000 <= commit_suffix() <= 9999 for _ in range(500))


def test_network_policies_are_ingress_and_egress_and_stable() -> None:
    """Two policies per deployment and region, in the workspace and sentinel namespaces, for
    the deployment's port; the same inputs give byte-identical documents and ids (so an
    unchanged policy is skipped and a re-run inserts the row it already wrote)."""
    args = dict(
        workspace_id="ws_1",
        environment_id="env_1",
        deployment_id="d_1",
        deployment_k8s_name="abc123",
        workspace_namespace="nsacme",
        region="eu",
        port=3000,
    )

    first, again = network_policies(**args), network_policies(**args)  # type: ignore[arg-type]

    assert first == again
    ingress, egress = first
    assert (ingress.k8s_name, ingress.k8s_namespace) == ("sentinel-ingress-to-abc123", "nsacme")
    assert (egress.k8s_name, egress.k8s_namespace) == (
        "sentinel-egress-to-abc123",
        SENTINEL_NAMESPACE,
    )
    assert ingress.id == policy_id("d_1", "eu", "sentinel-ingress-to-abc123") != egress.id
    assert ingress.document["spec"]["ingress"][0]["toPorts"][0]["ports"] == [
        {"port": "3000", "protocol": "TCP"}
    ]
    assert ingress.document["metadata"]["labels"]["unkey.com/policy.id"] == ingress.id
    other_region = network_policies(**{**args, "region": "us"})  # type: ignore[arg-type]
    assert other_region[0].id != ingress.id
