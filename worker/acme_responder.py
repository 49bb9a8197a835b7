"""The HTTP-01 responder: ``ctrl-worker acme-responder`` (SPEC §4 CertificateService, +).

In production the edge (frontline) answers the CA's HTTP-01 requests through the control API;
this tiny server does the same job for tests and single-machine setups. It serves
``GET /.well-known/acme-challenge/{token}`` from ``acme_challenges``: 200 ``text/plain`` with
the key authorization while a challenge with that token is ``pending``, 404 otherwise (an
unknown token, or a challenge already ``verified``/``failed``). Every other path is 404.

Guarantees: it writes nothing; it answers from the database at each request (no cache), so a
token stored by the issuing flow is served as soon as its transaction commits, by any number of
responders. It listens on ``UNKEY_ACME_HTTP01_HOST`` (default 0.0.0.0) :
``UNKEY_ACME_HTTP01_PORT`` (default 5002); point the CA's port-80 traffic there.

Security: a key authorization is public by design (the CA fetches it over plain HTTP); the
responder logs neither tokens nor key authorizations.

Error handling: a database failure answers 503 (the CA may retry; a validation it gives up on
fails the authorization, which the certificate flow reports) and is logged by its type only.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from worker.settings import Settings

__all__ = ["CHALLENGE_PATH", "responder_app", "run_acme_responder"]

CHALLENGE_PATH = "/.well-known/acme-challenge/{token}"

_log = logging.getLogger("ctrl.acme_responder")


def _lookup_from_db(token: str) -> str | None:
    from tasks.db.acme import pending_key_authorization

    return pending_key_authorization(token)


def responder_app(lookup: Callable[[str], str | None] | None = None) -> Starlette:
    """The responder's ASGI app.

    Args:
        lookup: token -> key authorization of a pending challenge, or None (default: the
            control-plane database, ``tasks.db.acme.pending_key_authorization``). Called in
            a thread: it may block.

    Returns:
        The Starlette app.
    """
    find = lookup or _lookup_from_db

    async def challenge(request: Request) -> Response:
        token = request.path_params["token"]
        try:
            key_authorization = await run_in_threadpool(find, token)
        except Exception as exc:  # the database is down: say so, not "no such token"
            _log.warning("acme-responder: challenge lookup failed (%s)", type(exc).__name__)
            return PlainTextResponse("challenge lookup failed\n", status_code=503)
        if key_authorization is None:
            return PlainTextResponse("no such challenge\n", status_code=404)
        return PlainTextResponse(key_authorization)

    return Starlette(routes=[Route(CHALLENGE_PATH, challenge, methods=["GET"])])


def run_acme_responder(settings: Settings) -> None:
    """Serve the responder in the foreground until SIGTERM/SIGINT, then return.

    Args:
        settings: the worker settings (``acme_http01_host``, ``acme_http01_port``, the
            database).

    Raises:
        SystemExit: uvicorn could not listen on the address.
    """
    from worker.settings import use_settings

    use_settings(settings)  # the lookup's database is the one these settings name
    config = uvicorn.Config(
        responder_app(),
        host=settings.acme_http01_host,
        port=settings.acme_http01_port,
        log_level="warning",
        access_log=False,  # request paths carry tokens
        lifespan="off",
    )
    asyncio.run(_serve_until_signalled(uvicorn.Server(config)))


async def _serve_until_signalled(server: uvicorn.Server) -> None:
    # uvicorn's own handlers re-raise SIGTERM after shutting down (exit -15); the command's
    # contract is exit 0 after SIGTERM, as `dataplane`, so the signals are handled here.
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: setattr(server, "should_exit", True))
    await server._serve()  # _serve: serve() without uvicorn's signal capture (health.py too)
