"""The node's one HTTP service: a Starlette application served by uvicorn on ``http.port``
(HTTPS when ``node.tls`` is set), in a thread of the node process.

Routes: STOW-RS (``/dicom-web/studies``, peers' ``stow_auth``: :mod:`node.http.stow`),
``GET /healthz`` (no auth: :mod:`node.http.health`), ``GET /metrics`` (viewer: :mod:`node.metrics`),
the admin API (``/api/...``: :mod:`node.http.admin`) and the status page (``/``: :mod:`node.http.ui`).

Adding a route: write ``async def endpoint(request) -> Response`` in a module of this package,
decorate it with ``@requires("viewer")`` or ``@requires("admin")`` from :mod:`node.http.auth`
(every endpoint but /healthz and STOW-RS needs a token; 401 without one, 403 for a viewer token on
an admin action, back-off on repeated bad tokens; the token is then ``request.state.token``, whose
``name`` goes into the log and the audit trail), and add it to :func:`routes` (or pass it to
:func:`create_app` in ``extra``). The running node is ``request.app.state.node``: ``config`` (read
it at each request, a reload replaces it), ``spool``, ``ledger``, ``ingest``, ``scp``, ...
Blocking work (the ledger, the disk, the network) goes through ``anyio.to_thread.run_sync`` so
the event loop keeps serving STOW-RS uploads meanwhile.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time

import uvicorn
from anyio import to_thread
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from node.backoff import Backoff, LogWindow
from node.http import admin, health, ui
from node.http.auth import requires
from node.http.stow import PATHS, StowService
from node.metrics import exposition
from node.tls import server_context

log = logging.getLogger(__name__)

HEADER_TIMEOUT_S = 10  # a request's header lines must have arrived this long after its first byte
MAX_CONNECTIONS = 256  # open connections; a request beyond them is answered 503 (uvicorn's limit_concurrency)
STOP_WAIT_S = 30  # STOW-RS requests in flight at a graceful stop get this long to be answered
KEEP_ALIVE_S = 15  # an idle keep-alive connection is closed after this
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]


@requires("viewer")
async def metrics(request: Request) -> Response:
    body, media_type = await to_thread.run_sync(exposition, request.app.state.node)  # reads the ledger
    return Response(body, media_type=media_type)


def routes(stow: StowService) -> list[BaseRoute]:
    return [
        *(Route(path, stow.endpoint, methods=ALL_METHODS) for path in PATHS),  # 405 with a reason, not Starlette's
        Route("/healthz", health.endpoint, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *admin.routes(),  # /api/...: jobs, destinations, audit, config reload
        *ui.routes(),  # /: the status page, /signin, /signout
    ]


def create_app(node, extra: list[BaseRoute] = ()) -> Starlette:
    """The application for ``node`` (a :class:`node.server.Node`)."""
    stow = StowService(node)
    app = Starlette(routes=[*routes(stow), *extra])
    app.state.node = node
    app.state.stow = stow
    app.state.backoff = Backoff("HTTP credentials")
    app.state.refusals = LogWindow(logger=logging.getLogger("node.http.auth"))  # 401/429: a line per address and minute
    app.state.sessions = ui.Sessions()  # the status page's signed-in people
    return app


class _Protocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on each request's header lines (from the
    connection, or from the first byte of a kept-alive connection's next request): uvicorn has
    none, so a client sending its headers a byte at a time, or nothing at all, held its connection
    forever."""

    _deadline: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(HEADER_TIMEOUT_S, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        log.info("HTTP connection from %s: no complete request headers in %d s; closed",
                 self.client[0] if self.client else "?", HEADER_TIMEOUT_S)
        self.transport.close()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # an answer's head and body go out as two writes: without this the body waits for the
            # client's delayed ACK (~40 ms a request, measured by a STOW-RS probe)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # idle now: uvicorn's keep-alive timeout applies

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


class HttpService:
    """``start()`` opens ``http.port`` (a port in use fails the start) and serves in a thread;
    ``stop()`` drains STOW-RS and closes it."""

    def __init__(self, node):
        self.node = node
        self.app = create_app(node)
        self.tls = getattr(node.config.node, "tls", None)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def start(self) -> None:
        http = self.node.config.http
        for peer in self.node.config.peers:
            if peer.stow_auth and not os.environ.get(peer.stow_auth.secret_env):
                log.warning("peer %s: environment variable %s is not set; its STOW-RS requests will get 401",
                            peer.ae_title, peer.stow_auth.secret_env)
        for token in http.tokens:
            if not os.environ.get(token.token_env):
                log.warning("token %s: environment variable %s is not set; it opens nothing", token.name,
                            token.token_env)
        family = socket.AF_INET6 if ":" in http.bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((http.bind, http.port))
        sock.listen(128)
        sock.setblocking(False)
        factory = (lambda config, default: server_context(self.tls)) if self.tls else None
        config = uvicorn.Config(self.app, http=_Protocol, lifespan="off", limit_concurrency=MAX_CONNECTIONS, log_config=None, access_log=False,
                                timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=5,
                                ssl_context_factory=factory, server_header=False, date_header=False)
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # not its start/stop chatter
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._server.started:
            raise RuntimeError(f"the HTTP service on {http.bind}:{http.port} did not start")
        log.info("HTTP service on %s://%s:%s (STOW-RS /dicom-web/studies, /healthz, /metrics)", self.scheme,
                 http.bind, http.port)

    def stop(self) -> None:
        """No new STOW-RS requests (503 while still accepting, so a sender gets an answer rather than
        a refused connection); those in flight get ``STOP_WAIT_S`` to be answered, so a stop does
        not cut a study in two. One not answered was not acknowledged."""
        if self._server is None:
            return
        stow: StowService = self.app.state.stow
        stow.stopping = True
        deadline = time.monotonic() + STOP_WAIT_S
        while stow.active and time.monotonic() < deadline:
            time.sleep(0.05)
        if stow.active:
            log.warning("stopping with %d STOW-RS request(s) unanswered: not acknowledged, their senders "
                        "must send them again", stow.active)
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._server = None

    @property
    def stopping(self) -> bool:
        return self.app.state.stow.stopping
