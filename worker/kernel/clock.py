"""One clock and one id generator for the whole worker (injectable in tests)."""

from __future__ import annotations

import secrets
import string
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

__all__ = ["frozen_clock", "new_dns_label", "new_id", "now", "now_ms"]

_ALPHABET = string.ascii_letters + string.digits
_DNS_FIRST = string.ascii_lowercase
_DNS_REST = string.ascii_lowercase + string.digits
_source: Callable[[], float] = time.time


def now_ms() -> int:
    """Unix time in milliseconds (the unit of every *_at column of the control plane)."""
    return int(_source() * 1000)


def now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.fromtimestamp(_source(), tz=UTC)


def new_id(prefix: str, length: int = 16) -> str:
    """A random id like the original's ``uid.New(prefix)``: ``<prefix>_<random>``."""
    return f"{prefix}_{''.join(secrets.choice(_ALPHABET) for _ in range(length))}"


def new_dns_label(length: int = 12) -> str:
    """A random RFC 1035 label (the original's ``uid.DNS1035()``): a lowercase letter, then
    lowercase letters and digits; used for Kubernetes names and namespaces."""
    rest = "".join(secrets.choice(_DNS_REST) for _ in range(length - 1))
    return secrets.choice(_DNS_FIRST) + rest


@contextmanager
def frozen_clock(at: datetime | float) -> Iterator[None]:
    """Make ``now()``/``now_ms()`` return a fixed instant inside the block (tests)."""
    global _source
    fixed = at.timestamp() if isinstance(at, datetime) else float(at)
    previous, _source = _source, (lambda: fixed)
    try:
        yield
    finally:
        _source = previous
