"""A gate in front of the HTTP-01 responder, so a test can hold pebble's validation.

``ChallengeGate`` listens where pebble's VA fetches HTTP-01 tokens
(``127.0.0.1:<Pebble.http01_port>``) and forwards each fetch to the real responder
(``ctrl-worker acme-responder`` on another port) only once the test opens it. While it is
closed, a call that answered its challenge is stuck in "wait for authorization": after the
order and before finalization, a point a test can see from outside (``wait_until_held``) and
SIGKILL the worker at. Opening it lets the held fetches through, so the CA declares the
authorization valid without the killed process.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

__all__ = ["ChallengeGate", "challenge_gate"]

_HOLD_LIMIT = 120.0  # a held fetch is let through after this many seconds at the latest


class ChallengeGate:
    """Forward HTTP-01 fetches on ``port`` to ``upstream_port`` once opened.

    Args:
        port: where to listen on 127.0.0.1 (pebble's ``httpPort``).
        upstream_port: the responder's port on 127.0.0.1.

    Attributes:
        held: how many fetches arrived while the gate was closed.
    """

    def __init__(self, port: int, upstream_port: int) -> None:
        self._upstream = f"http://127.0.0.1:{upstream_port}"
        self._open = threading.Event()
        self._arrived = threading.Condition()
        self.held = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        gate = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                gate._hold()
                response = httpx.get(gate._upstream + self.path, timeout=10)
                self.send_response(response.status_code)
                self.send_header("Content-Type", response.headers.get("content-type", "text/plain"))
                self.send_header("Content-Length", str(len(response.content)))
                self.end_headers()
                self.wfile.write(response.content)

            def log_message(self, format: str, *args: object) -> None:
                pass  # pebble's own log records its fetches

        return Handler

    def _hold(self) -> None:
        if self._open.is_set():
            return
        with self._arrived:
            self.held += 1
            self._arrived.notify_all()
        self._open.wait(_HOLD_LIMIT)

    def wait_until_held(self, timeout: float) -> None:
        """Return once pebble's VA has fetched a token while the gate was closed.

        Raises:
            AssertionError: no fetch arrived within ``timeout`` seconds.
        """
        with self._arrived:
            if not self._arrived.wait_for(lambda: self.held > 0, timeout):
                raise AssertionError(f"no HTTP-01 validation reached the gate in {timeout} s")

    def open(self) -> None:
        """Let every held and later fetch through to the responder."""
        self._open.set()

    def start(self) -> ChallengeGate:
        """Serve in the background (closed)."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Open, stop serving and close the socket."""
        self._open.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


@contextmanager
def challenge_gate(port: int, upstream_port: int) -> Iterator[ChallengeGate]:
    """A closed ``ChallengeGate`` on ``port``, stopped after.

    Args:
        port: where pebble's VA fetches HTTP-01 tokens.
        upstream_port: the responder's port.

    Yields:
        The gate.
    """
    gate = ChallengeGate(port, upstream_port).start()
    try:
        yield gate
    finally:
        gate.stop()
