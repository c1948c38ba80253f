"""The admin API: jobs, destinations, the audit trail and config reload, as JSON.

``GET /api/jobs?state=&limit=`` (viewer), ``GET /api/jobs/{id}`` (viewer, with each destination's
delivery status), ``POST /api/jobs/{id}/retry`` (admin), ``GET /api/destinations`` (viewer, each
with its last delivery), ``POST /api/destinations/{name}/echo`` (admin: C-ECHO, QIDO-RS probe or
write test), ``GET /api/audit?since=&limit=`` (admin), ``POST /api/config/reload`` (admin; 422 with
the reasons when the file is refused). Admin actions are audited with the token's name.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

from anyio import to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from node import audit as audit_trail
from node.config import DicomDestination, DicomwebDestination, FolderDestination
from node.http.auth import requires
from node.ledger import JOB_STATES

MAX_LIMIT = 1000


def _error(code: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, code)


def number(text: str, digits: int = 11) -> int | None:
    """``text`` as a whole number if it is 1 to ``digits`` ASCII digits, else None (str.isdigit
    also takes "²", which int() refuses)."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= digits else None


def _limit(request: Request, default: int) -> int:
    text = request.query_params.get("limit")
    if text is None:
        return default
    value = number(text)
    if value is None or not 1 <= value <= MAX_LIMIT:
        raise ValueError(f"limit must be a whole number from 1 to {MAX_LIMIT}, got {text[:20]!r}")
    return value


def _job_id(request: Request) -> int | None:
    return number(request.path_params["job_id"])


def jobs_view(node, states: Sequence[str] | None, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` jobs in any of ``states`` (all when None), as the API shows them."""
    ledger = node.ledger
    return [ledger.describe(job) for job in ledger.jobs(states, limit=limit, newest_first=True)]


@requires("viewer")
async def list_jobs(request: Request) -> Response:
    state = request.query_params.get("state") or None
    if state is not None and state not in JOB_STATES:
        return _error(400, f"state must be one of {', '.join(JOB_STATES)}", states=list(JOB_STATES))
    try:
        limit = _limit(request, 100)
    except ValueError as exc:
        return _error(400, str(exc))
    return JSONResponse({"jobs": await to_thread.run_sync(jobs_view, request.app.state.node,
                                                          [state] if state else None, limit)})


@requires("viewer")
async def get_job(request: Request) -> Response:
    job_id = _job_id(request)
    ledger = request.app.state.node.ledger

    def view():
        job = ledger.job(job_id) if job_id is not None else None
        return ledger.describe(job, deliveries=True) if job else None

    found = await to_thread.run_sync(view)
    return JSONResponse(found) if found else _error(404, f"no job {request.path_params['job_id'][:20]}")


def retry_job(node, job_id: int, actor: str) -> str:
    """``srnode retry`` for the API and the status page; audited. KeyError for an unknown job."""
    outcome = node.ledger.retry(job_id)
    node.audit.record("admin", actor=actor, action="retry", job=job_id, outcome=outcome)
    return outcome


@requires("admin")
async def retry(request: Request) -> Response:
    job_id = _job_id(request)
    node = request.app.state.node
    try:
        outcome = await to_thread.run_sync(retry_job, node, job_id if job_id is not None else -1,
                                           f"token:{request.state.token.name}")
    except KeyError:
        return _error(404, f"no job {request.path_params['job_id'][:20]}")
    return JSONResponse({"job": job_id, "outcome": outcome})


def describe_destination(name: str, dest) -> dict[str, Any]:
    if isinstance(dest, DicomDestination):
        target = f"{dest.ae_title}@{dest.host}:{dest.port}"
    elif isinstance(dest, DicomwebDestination):
        target = dest.url
    elif isinstance(dest, FolderDestination):
        target = str(dest.path)
    else:
        target = "?"
    return {"name": name, "type": dest.type, "target": target}


HEALTH = {"sent": "ok", "warning": "ok", "pending": "retrying", "parked": "failing"}


def destinations_view(node) -> list[dict[str, Any]]:
    last = node.ledger.last_deliveries()
    out = []
    for name, dest in node.config.destinations.items():
        entry = describe_destination(name, dest)
        entry["last_delivery"] = last.get(name)
        entry["health"] = HEALTH.get((last.get(name) or {}).get("state"), "unknown")
        out.append(entry)
    if "sender" in last:
        out.append({"name": "sender", "type": "dicom", "target": "the calling peer", "last_delivery": last["sender"],
                    "health": HEALTH.get(last["sender"]["state"], "unknown")})
    return out


@requires("viewer")
async def list_destinations(request: Request) -> Response:
    return JSONResponse({"destinations": await to_thread.run_sync(destinations_view, request.app.state.node)})


def echo_destination(node, name: str, actor: str) -> tuple[bool, str]:
    from node.dispatch import check

    ok, text = check(node.config, node.config.destinations[name])
    node.audit.record("admin", actor=actor, action="echo", destination=name, ok=ok, result=text)
    return ok, text


@requires("admin")
async def echo(request: Request) -> Response:
    node = request.app.state.node
    name = request.path_params["name"]
    if name not in node.config.destinations:
        return _error(404, f"no destination {name[:64]!r}", known=sorted(node.config.destinations))
    try:
        ok, text = await to_thread.run_sync(echo_destination, node, name, f"token:{request.state.token.name}")
    except Exception as exc:  # noqa: BLE001 - a probe that raised is a failed probe, said as such
        ok, text = False, f"{type(exc).__name__}: {exc}"
    return JSONResponse({"destination": name, "ok": ok, "result": text})


@requires("admin")
async def audit(request: Request) -> Response:
    since_text = request.query_params.get("since")
    try:
        since = audit_trail.parse_since(since_text) if since_text else None
        limit = _limit(request, 500)
    except ValueError as exc:
        return _error(400, str(exc))
    folder = request.app.state.node.spool.audit_dir
    events = await to_thread.run_sync(lambda: audit_trail.read(folder, since=since, limit=limit))
    return JSONResponse({"events": events})


@requires("admin")
async def reload(request: Request) -> Response:
    node = request.app.state.node
    ok, reasons, changed = await to_thread.run_sync(lambda: node.reload(actor=f"token:{request.state.token.name}"))
    if not ok:
        return _error(422, "the config file was refused; the running config stays", reasons=reasons)
    return JSONResponse({"reloaded": True, "changes": changed, "at": time.time()})


def routes() -> list[BaseRoute]:
    return [
        Route("/api/jobs", list_jobs, methods=["GET"]),
        Route("/api/jobs/{job_id}", get_job, methods=["GET"]),
        Route("/api/jobs/{job_id}/retry", retry, methods=["POST"]),
        Route("/api/destinations", list_destinations, methods=["GET"]),
        Route("/api/destinations/{name}/echo", echo, methods=["POST"]),
        Route("/api/audit", audit, methods=["GET"]),
        Route("/api/config/reload", reload, methods=["POST"]),
    ]
