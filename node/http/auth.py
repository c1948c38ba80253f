"""Who is asking: bearer tokens of people and tools (``http.tokens``), and STOW-RS peers (``stow_auth``).

Secrets live in environment variables the config names, read at each request (a token set in the
environment after the start works; one removed stops working). Every comparison is constant
time (``hmac.compare_digest``) and runs over every configured secret, so neither timing nor the
order of the config tells which one nearly matched. Repeated bad credentials from one address
start a growing back-off (:class:`node.backoff.Backoff`, shared by every endpoint and STOW-RS):
429 with Retry-After; 401s and 429s are logged once per address (IPv6: /64) and reason a minute
(:func:`log_refusal`). A good credential does not clear an address's bad ones (they are forgotten
``forget_s`` after the last): whoever holds one token must not be able to guess others at full
speed by sending it between guesses.

Roles: ``viewer`` reads (metrics, jobs, the status page); ``admin`` also acts (retry, reload, echo).
An endpoint states the role it needs with :func:`requires`; the token's name is then
``request.state.token.name`` (for the log and the audit trail).
"""
from __future__ import annotations

import base64
import functools
import hmac
import logging
import math
import os
from typing import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from node.backoff import Backoff, source
from node.config import HttpToken, Peer

log = logging.getLogger(__name__)

ROLES = {"viewer": 1, "admin": 2}  # an admin token may do what a viewer token may
CHALLENGE = 'Bearer realm="srnode"'


class HttpError(Exception):
    """An answer other than success, with its reason (one log line, the body of the answer)."""

    def __init__(self, code: int, message: str, headers: dict[str, str] | None = None, body_read: bool = False):
        super().__init__(message)
        self.code, self.message, self.headers = code, message, headers or {}
        self.body_read = body_read  # the request's body was read to its end: the connection may stay open


def shown(text: str) -> str:
    """A client's header text as it may appear in a log line: escaped (no forged lines), cut."""
    return text.encode("unicode_escape").decode("ascii")[:120]


def client_address(request: Request) -> str:
    return request.client.host if request.client else "?"


def check_backoff(backoff: Backoff, address: str) -> None:
    """HttpError 429 while ``address`` is backed off after repeated bad credentials."""
    left = backoff.blocked(address)
    if left > 0:
        raise HttpError(429, "too many bad credentials from this address; try again later",
                        {"Retry-After": str(math.ceil(left))})


def log_refusal(request: Request, error: HttpError, message: str, *args: object) -> None:
    """One log line for a refused request: a 401 or 429 (what a flood of guesses or of clients
    without credentials gets) once per address and reason a minute, with the repeats counted;
    the rest each time."""
    if error.code in (401, 429):
        request.app.state.refusals.warning(source(client_address(request)), f"{error.code} {error.message}",
                                           message, *args)
    else:
        log.warning(message, *args)


def presented_token(request: Request) -> str | None:
    """The bearer token a request carries (``Authorization: Bearer ...``), else None."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def identify(tokens: list[HttpToken], presented: str) -> HttpToken | None:
    """The configured token ``presented`` is, compared in constant time against every one."""
    given = presented.encode("latin-1", errors="replace")  # the header's bytes (Starlette decodes latin-1)
    found = None
    for token in tokens:
        secret = os.environ.get(token.token_env, "")
        if secret and _same_text(given, secret) and found is None:
            found = token
    return found


def authorize(request: Request, role: str) -> HttpToken:
    """The token of a request allowed ``role``; HttpError 429 (backed off), 401 (no or unknown
    token) or 403 (a viewer token on an admin action)."""
    node = request.app.state.node
    backoff: Backoff = request.app.state.backoff
    address = client_address(request)
    check_backoff(backoff, address)
    presented = presented_token(request)
    tokens = node.config.http.tokens if node.config.http else []
    token = identify(tokens, presented) if presented else None
    if token is None:
        if presented:  # no token at all is a client that has not signed in, not a guess
            backoff.failure(address)
        raise HttpError(401, "a token is needed: send Authorization: Bearer <token>" if not presented
                        else "unknown token", {"WWW-Authenticate": CHALLENGE})
    if ROLES[token.role] < ROLES[role]:
        raise HttpError(403, f"token {token.name} is a {token.role} token; this needs {role}")
    return token


def requires(role: str):
    """Decorates an endpoint ``async def endpoint(request) -> Response`` so that it runs only for a
    token of ``role`` (or higher); ``request.state.token`` is that token."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")

    def wrap(endpoint: Callable[[Request], Awaitable[Response]]):
        @functools.wraps(endpoint)
        async def checked(request: Request) -> Response:
            try:
                request.state.token = authorize(request, role)
            except HttpError as exc:
                log_refusal(request, exc, "HTTP %s %s from %s: %d %s", request.method, shown(request.url.path),
                            client_address(request), exc.code, exc.message)
                return JSONResponse({"error": exc.message}, exc.code, exc.headers)
            return await endpoint(request)
        return checked
    return wrap


# -- STOW-RS peers --------------------------------------------------------------------------
PEER_CHALLENGE = 'Basic realm="srnode", charset="UTF-8", Bearer realm="srnode"'


def authenticate_peer(peers: list[Peer], authorization: str | None, address: str) -> Peer:
    """The STOW-RS peer these credentials belong to; HttpError 401 (unknown) or 403 (wrong host)."""
    scheme, _, value = (authorization or "").partition(" ")
    peer = None
    for candidate in peers:  # every peer is tried: the time taken does not tell which one matched
        if candidate.stow_auth and _matches(candidate, scheme.lower(), value.strip()) and peer is None:
            peer = candidate
    if peer is None:
        why = "no credentials" if not authorization else "credentials of no STOW-RS peer"
        raise HttpError(401, f"{why}: send a configured peer's Basic or Bearer credentials",
                        {"WWW-Authenticate": PEER_CHALLENGE})
    if not peer.allows(address):
        raise HttpError(403, f"peer {peer.ae_title} is only allowed from {peer.host}")
    return peer


def _matches(peer: Peer, scheme: str, value: str) -> bool:
    """Whether ``scheme value`` (an Authorization header, as latin-1 text) is ``peer``'s secret;
    non-ASCII secrets match as UTF-8 or latin-1 bytes, as clients send either."""
    auth = peer.stow_auth
    secret = os.environ.get(auth.secret_env, "")
    if not secret:
        return False
    given = value.encode("latin-1", errors="replace")
    if auth.type == "bearer" and scheme == "bearer":
        return _same_text(given, secret)
    if auth.type == "basic" and scheme == "basic":
        try:
            user, _, password = base64.b64decode(given + b"=" * (-len(given) % 4), validate=True).partition(b":")
        except ValueError:
            return False
        return _same_text(user, auth.username) & _same_text(password, secret)
    return False


def _same_text(given: bytes, expected: str) -> bool:
    matches = False
    for encoding in ("utf-8", "latin-1"):
        try:
            matches |= hmac.compare_digest(given, expected.encode(encoding))
        except UnicodeEncodeError:
            pass
    return matches
