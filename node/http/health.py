"""``GET /healthz`` (no token): 200 ``{"status": "ok", ...}`` when the node can take and process
instances, else 503 ``{"status": "unhealthy", "reasons": [...]}``. For load balancers and
orchestrators: it says nothing a stranger could use (no peers, no jobs, no paths)."""
from __future__ import annotations

import tempfile

import redis
from anyio import to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse

QUEUE_TIMEOUT_S = 2.0


def problems(node) -> list[str]:
    """What keeps ``node`` from working, one reason each: listeners, queue, spool."""
    reasons = []
    if not node.scp.listening:
        reasons.append("the DICOM listener is not running")
    http = getattr(node, "http", None)
    if http is not None and http.stopping:
        reasons.append("the node is stopping")
    broker = node.config.queue.broker
    if broker == "embedded":
        if not node.worker_running():
            reasons.append("queue unreachable: the embedded worker is not running")
    else:
        try:
            redis.Redis.from_url(broker, socket_timeout=QUEUE_TIMEOUT_S, socket_connect_timeout=QUEUE_TIMEOUT_S).ping()
        except redis.RedisError as exc:
            reasons.append(f"queue unreachable: {type(exc).__name__}")
    try:
        with tempfile.TemporaryFile(dir=node.spool.root, prefix=".healthz-") as probe:
            probe.write(b"ok")
            probe.flush()
    except OSError as exc:
        reasons.append(f"spool not writable: {exc.strerror}")
        return reasons  # its free space cannot be read either (a folder gone, a file system unmounted)
    short = node.ingest.short_of_space()
    if short:
        reasons.append(short)
    return reasons


async def endpoint(request: Request) -> JSONResponse:
    node = request.app.state.node
    reasons = await to_thread.run_sync(problems, node)
    free = node.ingest.free_bytes()
    if reasons:
        return JSONResponse({"status": "unhealthy", "reasons": reasons, "spool_free_bytes": free}, 503)
    return JSONResponse({"status": "ok", "spool_free_bytes": free})
