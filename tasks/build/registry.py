"""Registry credentials for the build CLI, in a temporary ``DOCKER_CONFIG`` directory.

Security: the credentials are written to ``config.json`` (mode 0600) in a fresh directory
only this user can read (``mkdtemp``: 0700), which is removed when the build ends, also on
an error or cancellation. They never appear on a command line (no ``docker login -p``).

The user's own Docker state that the CLI needs besides credentials (CLI plugins such as
buildx, buildx builders, contexts and the current context) is linked into the directory, so
a temporary ``DOCKER_CONFIG`` changes which credentials are used and nothing else.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["registry_config_dir", "registry_host", "registry_reference"]

# What the CLI keeps in its config directory that a build may need.
_SHARED_STATE = ("cli-plugins", "buildx", "contexts")


def registry_reference(registry_url: str) -> str:
    """The registry as image names spell it: no scheme, no trailing ``/``.

    Args:
        registry_url: ``UNKEY_REGISTRY_URL`` (``registry.depot.dev``, ``https://ghcr.io/org/``).

    Returns:
        ``registry.depot.dev``, ``ghcr.io/org``.
    """
    return re.sub(r"^[a-z]+://", "", registry_url.strip()).rstrip("/")


def registry_host(registry_url: str) -> str:
    """The registry's host (``https://registry.depot.dev/x`` -> ``registry.depot.dev``).

    Args:
        registry_url: ``UNKEY_REGISTRY_URL``.

    Returns:
        The host (with its port, if any): the key of ``auths`` in ``config.json``.
    """
    return registry_reference(registry_url).split("/", 1)[0]


@contextlib.contextmanager
def registry_config_dir(
    registry_url: str | None, username: str | None, password: str | None
) -> Iterator[str | None]:
    """A temporary Docker config directory that logs in to the registry, for one build.

    Args:
        registry_url: ``UNKEY_REGISTRY_URL``.
        username: ``UNKEY_REGISTRY_USERNAME``.
        password: ``UNKEY_REGISTRY_PASSWORD`` (a secret).

    Yields:
        The directory (for ``DOCKER_CONFIG``), or None when the credentials are incomplete
        (the CLI then uses the user's own configuration).
    """
    if not (registry_url and username and password):
        yield None
        return
    directory = Path(tempfile.mkdtemp(prefix="ctrl-docker-config-"))
    try:
        user_dir = Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker")
        auth = base64.b64encode(f"{username}:{password}".encode()).decode()
        config: dict[str, Any] = {"auths": {registry_host(registry_url): {"auth": auth}}}
        current = _current_context(user_dir)
        if current:
            config["currentContext"] = current
        descriptor = os.open(directory / "config.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump(config, file)
        for name in _SHARED_STATE:
            if (user_dir / name).exists():
                (directory / name).symlink_to(user_dir / name)
        yield str(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _current_context(user_dir: Path) -> str | None:
    try:
        value = json.loads((user_dir / "config.json").read_text()).get("currentContext")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None
