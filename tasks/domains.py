"""The domains a deploy gets, by the original's rules (reference §2.1 step 11).

For a deployment of project ``proj`` in environment ``env`` of workspace ``ws`` under the apex
``UNKEY_DEFAULT_DOMAIN``:

- ``<proj>-git-<sha7>-<NNNN>-<ws>.<apex>`` (sticky ``none``): the commit; the original's source
  is always CLI_UPLOAD, so the commit domain always carries a random ``NNNN`` (1000-9999);
- ``<proj>-git-<sluggify(branch)>-<ws>.<apex>`` (``branch``);
- ``<proj>-<env>-<ws>.<apex>`` (``environment``);
- production only: ``<proj>-<ws>.<apex>`` (``live``).

Slugs are the project's, the environment's and the workspace's ``slug`` columns. A deployment
without a commit or a branch has no commit or branch domain. These are pure functions; the
random suffix is drawn by the caller inside a durable step, so a replay keeps it.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Literal

__all__ = ["Domain", "Sticky", "build_domains", "commit_suffix", "sluggify"]

Sticky = Literal["none", "branch", "environment", "live"]
_NOT_SLUG = re.compile(r"[^A-Za-z0-9]+")
_MAX_SLUG = 80


@dataclass(frozen=True)
class Domain:
    """One domain a deploy routes to, and how it sticks to later deployments."""

    fqdn: str
    sticky: Sticky


def sluggify(text: str) -> str:
    """The original's ``sluggify``: trim; non-alphanumerics (``-`` and ``_`` too) become
    spaces; spaces collapse; words join with ``-``; lowercase; cut at 80; no trailing ``-``."""
    words = _NOT_SLUG.sub(" ", text.strip()).split()
    return "-".join(words).lower()[:_MAX_SLUG].rstrip("-")


def commit_suffix() -> int:
    """The random 1000-9999 suffix of a commit domain."""
    return 1000 + secrets.randbelow(9000)


def build_domains(
    *,
    project_slug: str,
    environment_slug: str,
    workspace_slug: str,
    apex: str,
    commit_sha: str | None,
    branch: str | None,
    suffix: int,
) -> list[Domain]:
    """The deploy's domains, in the original's order (commit, branch, environment, live).

    Args:
        project_slug: the project's slug.
        environment_slug: the environment's slug (``production`` adds the live domain).
        workspace_slug: the workspace's slug.
        apex: the apex domain (``UNKEY_DEFAULT_DOMAIN``).
        commit_sha: the deployment's commit, if any (its first 7 characters are used).
        branch: the deployment's branch, if any.
        suffix: the commit domain's random number (``commit_suffix()``, drawn once per call).

    Returns:
        The domains; FQDNs are lowercase.
    """
    domains: list[Domain] = []
    if commit_sha:
        fqdn = f"{project_slug}-git-{commit_sha[:7]}-{suffix}-{workspace_slug}.{apex}"
        domains.append(Domain(fqdn.lower(), "none"))
    branch_slug = sluggify(branch or "")
    if branch_slug:
        fqdn = f"{project_slug}-git-{branch_slug}-{workspace_slug}.{apex}"
        domains.append(Domain(fqdn.lower(), "branch"))
    fqdn = f"{project_slug}-{environment_slug}-{workspace_slug}.{apex}"
    domains.append(Domain(fqdn.lower(), "environment"))
    if environment_slug == "production":
        domains.append(Domain(f"{project_slug}-{workspace_slug}.{apex}".lower(), "live"))
    return domains
