"""A stand-in for ClickHouse's HTTP interface that records what clickhouse-connect sends to the
admin connection and keeps a tiny model of its users.

No real ClickHouse server can be had here, and chdb cannot create users
(../shared/reference/infra.md §4), so the provisioning statements are checked in three places:
ClickHouse's parser (``tests.support.chdb_parser``), chdb for the row-policy predicates, and this
stand-in for the transport: it answers clickhouse-connect's handshake (``SELECT version(),
timezone()``; empty answers to its settings and protocol probes) and every other statement
with an empty 200, records each one, and applies ``CREATE USER IF NOT EXISTS`` / ``ALTER USER
... IDENTIFIED ... BY '<password>'`` to ``users`` the way ClickHouse would (the first only
when the user is absent). It can fail or hold statements that start with a given prefix.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field

from werkzeug.wrappers import Request, Response

__all__ = ["ClickHouseStandIn", "Failure"]

_HANDSHAKE = ("SELECT version()", "SELECT name, value, readonly FROM system.settings", "SELECT 1")
_USER = re.compile(
    r"(CREATE USER IF NOT EXISTS|ALTER USER) `(\w+)` IDENTIFIED WITH sha256_password BY '([^']*)'"
)


@dataclass(frozen=True)
class Failure:
    """An HTTP error ClickHouse would send: status, ``X-ClickHouse-Exception-Code``, body."""

    status: int
    code: str
    body: str


@dataclass
class ClickHouseStandIn:
    """The request handler (``httpserver.expect_request("/").respond_with_handler(standin)``)."""

    statements: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    users: dict[str, str] = field(default_factory=dict)
    failures: dict[str, Failure] = field(default_factory=dict)
    hold_prefix: str | None = None
    held: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, request: Request) -> Response:
        sql = request.get_data().decode()
        with self.lock:
            self.urls.append(request.full_path)
        if sql.startswith("SELECT version()"):
            return Response("26.9.2.1\tUTC\n")
        if sql.startswith(_HANDSHAKE):
            return Response(b"")
        with self.lock:
            self.statements.append(sql)
        if self.hold_prefix is not None and sql.startswith(self.hold_prefix):
            self.held.set()
            self.release.wait(timeout=300)
            return Response("", status=503)
        for prefix, failure in self.failures.items():
            if sql.startswith(prefix):
                headers = {"X-ClickHouse-Exception-Code": failure.code}
                return Response(failure.body.replace("{sql}", sql), failure.status, headers)
        match = _USER.match(sql)
        if match:
            verb, name, password = match.groups()
            with self.lock:
                if verb == "ALTER USER" and name not in self.users:
                    body = f"Code: 192. DB::Exception: There is no user `{name}`. (UNKNOWN_USER)"
                    return Response(body, 404, {"X-ClickHouse-Exception-Code": "192"})
                if verb == "ALTER USER" or name not in self.users:
                    self.users[name] = password
        return Response(b"")

    def sent_since(self, start: int) -> list[str]:
        """The statements (not the handshake) received from position ``start`` on."""
        with self.lock:
            return list(self.statements[start:])
