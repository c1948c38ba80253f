"""The status page (``GET /``, viewer): recent jobs and their timeline, failed and parked jobs with
their reason and a retry button (admin), each finished job's QA (consistency PSNR against its
threshold, linking to the QA picture ``/ui/jobs/{id}/qa/{n}.png``), destinations and their health, spool usage, queue depth.

Server-rendered (Jinja2, autoescaped), no script but a 10 s refresh. A person signs in once with
a token (``POST /signin``): the node keeps a session (in memory, 12 h) and sets its id in a cookie
(HttpOnly, SameSite=Strict, Secure over HTTPS); the token itself never goes into the cookie. Each
session has a CSRF token that every form carries (``POST /ui/jobs/{id}/retry``, ``/signout``).
A session ends when its token leaves the config (reload), or its environment variable goes or
changes (a rotated token). Bad tokens
at sign-in count towards the same back-off as every other endpoint.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote

from anyio import to_thread
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from node.http.admin import destinations_view, jobs_view, number, retry_job
from node.http.auth import ROLES, authorize, check_backoff, client_address, HttpError, identify
from node.jobs import qa_records

COOKIE = "srnode_session"
SESSION_S = 12 * 3600
MAX_FORM_BYTES = 4096
TEMPLATES = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                        autoescape=select_autoescape(["html"]))


@dataclass
class Session:
    token_name: str
    secret_sha256: str  # of the token's secret at sign-in: a rotated token ends the session
    csrf: str
    expires: float


def fingerprint(token) -> str:
    """A token's secret as it is now, hashed (the session keeps no secret)."""
    secret = f"{token.token_env}\0{os.environ.get(token.token_env, '')}"
    return hashlib.sha256(secret.encode("utf-8", errors="surrogateescape")).hexdigest()


class Sessions:
    def __init__(self):
        self._by_id: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, token) -> str:
        sid = secrets.token_urlsafe(32)
        with self._lock:
            now = time.time()
            self._by_id = {k: s for k, s in self._by_id.items() if s.expires > now}
            self._by_id[sid] = Session(token.name, fingerprint(token), secrets.token_urlsafe(32), now + SESSION_S)
        return sid

    def get(self, sid: str | None) -> Session | None:
        with self._lock:
            session = self._by_id.get(sid or "")
        return session if session and session.expires > time.time() else None

    def drop(self, sid: str | None) -> None:
        with self._lock:
            self._by_id.pop(sid or "", None)


def sessions(request: Request) -> Sessions:
    return request.app.state.sessions


def signed_in(request: Request):
    """(session, its token from the running config) or None: a token dropped by a reload, whose
    environment variable is gone or holds another secret (rotated), ends its sessions; a role
    changed by a reload applies at once."""
    session = sessions(request).get(request.cookies.get(COOKIE))
    if session is None:
        return None
    http = request.app.state.node.config.http
    token = next((t for t in (http.tokens if http else []) if t.name == session.token_name), None)
    if token is None or not os.environ.get(token.token_env) or \
            not hmac.compare_digest(fingerprint(token), session.secret_sha256):
        return None
    return session, token


async def _form(request: Request) -> dict[str, str]:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise HttpError(413, "form too large")
    fields = parse_qs(body.decode("utf-8", errors="replace"), max_num_fields=10)
    return {k: v[0] for k, v in fields.items()}


def _page(name: str, code: int = 200, **context) -> HTMLResponse:
    headers = {"Cache-Control": "no-store", "X-Frame-Options": "DENY",
               "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'"}
    return HTMLResponse(TEMPLATES.get_template(name).render(**context), code, headers)


async def signin_form(request: Request) -> Response:
    return _page("signin.html")


async def signin(request: Request) -> Response:
    address = client_address(request)
    backoff = request.app.state.backoff
    try:
        check_backoff(backoff, address)
        form = await _form(request)
    except HttpError as exc:
        return _page("signin.html", exc.code, error=exc.message)
    http = request.app.state.node.config.http
    presented = form.get("token", "").strip()
    token = identify(http.tokens if http else [], presented) if presented else None
    if token is None:
        if presented:
            backoff.failure(address)
        return _page("signin.html", 401, error="unknown token")
    sid = sessions(request).create(token)
    response = RedirectResponse("/", 303)
    response.set_cookie(COOKIE, sid, max_age=SESSION_S, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", path="/")
    return response


def _csrf_ok(session: Session, form: dict[str, str]) -> bool:
    return hmac.compare_digest(form.get("csrf", "").encode(), session.csrf.encode())


async def signout(request: Request) -> Response:
    found = signed_in(request)
    form = await _form(request)
    if found and _csrf_ok(found[0], form):
        sessions(request).drop(request.cookies.get(COOKIE))
    response = RedirectResponse("/signin", 303)
    response.delete_cookie(COOKIE, path="/")
    return response


def _when(ts: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else ""


def _span(a: float | None, b: float | None) -> str:
    if not a or not b:
        return ""
    s = max(b - a, 0)
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _qa_view(node, job_id: int) -> list[dict]:
    return [{"psnr": r["consistency"]["psnr_db"], "threshold": r["threshold_db"], "passed": r["passed"],
             "model": r["model"]} for _, r in qa_records(node.spool, job_id)]


PROBLEM_STATES = ("failed", "parked", "refused", "waiting_disk")  # however old: a busy node must not hide them


def status_view(node) -> dict:
    jobs = jobs_view(node, None, 50)
    for job in jobs:
        job["qa"] = _qa_view(node, job["id"]) if job["state"] in ("dispatching", "delivered", "parked") else []
    problems = jobs_view(node, PROBLEM_STATES, 20)
    try:
        usage = shutil.disk_usage(node.spool.root)
        disk = {"total": usage.total, "used": usage.used, "free": usage.free}
    except OSError:  # the spool's folder is gone (/healthz says so): the page still answers
        disk = {"total": 0, "used": 0, "free": 0}
    queue = {state: node.ledger.count_jobs([state]) for state in ("pending", "queued", "dispatching")}
    return {"jobs": jobs, "problems": problems, "destinations": destinations_view(node), "queue": queue,
            "disk": {**disk, "min_free": node.config.retention.min_free_bytes},
            "series_held": len(node.spool.all_series()), "now": time.time()}


async def status(request: Request) -> Response:
    found = signed_in(request)
    if found is None:
        return RedirectResponse("/signin", 303)
    session, token = found
    view = await to_thread.run_sync(status_view, request.app.state.node)
    message = request.query_params.get("done", "")[:200]
    return _page("status.html", **view, token=token, admin=ROLES[token.role] >= ROLES["admin"], csrf=session.csrf,
                 when=_when, span=_span, message=message)


async def ui_retry(request: Request) -> Response:
    found = signed_in(request)
    if found is None:
        return RedirectResponse("/signin", 303)
    session, token = found
    form = await _form(request)
    if not _csrf_ok(session, form):
        return _page("signin.html", 403, error="this form has expired; sign in again")
    if ROLES[token.role] < ROLES["admin"]:
        return _page("signin.html", 403, error=f"token {token.name} is a {token.role} token; retry needs admin")
    text = request.path_params["job_id"]
    try:
        job = number(text)
        outcome = await to_thread.run_sync(retry_job, request.app.state.node, -1 if job is None else job,
                                           f"token:{token.name}")
    except KeyError:
        outcome = f"no job {text[:20]}"
    return RedirectResponse(f"/?done={quote(outcome)}", 303)


async def qa_file(request: Request) -> Response:
    """``GET /ui/jobs/{id}/qa/{n}.png`` (or ``.json``): the QA picture or numbers of a job's output
    series ``n`` (from 1), for a signed-in person (the session cookie) or a viewer token; 401 else."""
    if signed_in(request) is None:
        try:
            authorize(request, "viewer")
        except HttpError as exc:
            return Response(exc.message, exc.code, exc.headers, media_type="text/plain")
    job = number(request.path_params["job_id"])
    index, _, kind = request.path_params["name"].partition(".")
    position = number(index)
    if job is None or position is None or kind not in ("png", "json"):
        return Response("not found", 404, media_type="text/plain")
    records = await to_thread.run_sync(qa_records, request.app.state.node.spool, job)
    if not 1 <= position <= len(records):
        return Response("no such QA file (the job has not finished, or retention removed it)", 404,
                        media_type="text/plain")
    path = records[position - 1][0] / f"qa.{kind}"
    body = await to_thread.run_sync(path.read_bytes)
    return Response(body, 200, {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
                    media_type="image/png" if kind == "png" else "application/json")


def routes() -> list[BaseRoute]:
    return [
        Route("/", status, methods=["GET"]),
        Route("/signin", signin_form, methods=["GET"]),
        Route("/signin", signin, methods=["POST"]),
        Route("/signout", signout, methods=["POST"]),
        Route("/ui/jobs/{job_id}/retry", ui_retry, methods=["POST"]),
        Route("/ui/jobs/{job_id}/qa/{name}", qa_file, methods=["GET"]),
    ]
