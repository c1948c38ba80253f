"""STOW-RS (PS3.18 10.5): ``POST /dicom-web/studies[/{StudyInstanceUID}]`` on the node's HTTP service.

A request is a ``multipart/related; type="application/dicom"`` body of Part 10 files, sent with
Content-Length or chunked. Only peers with ``stow_auth`` may send: HTTP Basic or a bearer token,
checked against the environment variables the config names, and the peer's ``host`` when set
(:func:`node.http.auth.authenticate_peer`), before any of the body is read: uvicorn answers
``Expect: 100-continue`` only when the application first reads the body, which happens after the
credential, media type, Accept, length and slot checks. The body streams into an unnamed file in
the spool, cut off (408) when it arrives slower than ``MIN_RATE_BPS`` on average after
``MIN_RATE_GRACE_S``. Its whole multipart framing is checked before anything is stored; then each
part goes through :mod:`node.ingest`, exactly as a C-STORE would (in a worker thread: parsing and
fsync do not stall the event loop). A peer's requests are one session for the assembler, as an
association is (:class:`PeerSessions`). The answer: 200 all stored, 202 some refused, 409 none
stored, with the Store Instances Response Module (Referenced / Failed SOP Sequence, a Failure
Reason per refused part) in DICOM JSON, or DICOM XML for a client that accepts only that. A full
spool (``retention.min_free_bytes``, ENOSPC, a ledger that cannot be written: every part refused
0xA700) is 503 with Retry-After; the body of such a
request is read to its end first, so the sender gets the 503 rather than a reset connection.
Behind a reverse proxy every request comes from the proxy's address: ``host`` pins and ``sender``
would apply to the proxy.
"""
from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import mmap
import os
import re
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from email.message import Message
from typing import IO, Callable
from xml.etree import ElementTree

from anyio import to_thread
from starlette.requests import Request
from starlette.responses import Response

from node import spill
from node.config import Peer
from node.http.auth import HttpError, authenticate_peer, check_backoff, client_address, log_refusal, shown
from node.ingest import OUT_OF_RESOURCES, Ingest, Verdict
from node.spool import disk_full

log = logging.getLogger(__name__)

PATHS = ["/dicom-web/studies", "/dicom-web/studies/", "/dicom-web/studies/{study}", "/dicom-web/studies/{study}/"]
STUDY = re.compile(r"^[0-9.]+$")
READ_TIMEOUT_S = 60  # a client silent this long mid-body is cut off
RETRY_AFTER_S = 1  # told to a sender over the limit; its series stay open meanwhile (PeerSessions.touch)
FULL_RETRY_AFTER_S = 60  # told to a sender when the spool is full
STOP_RETRY_AFTER_S = 10  # told to a sender while the node stops
MIN_RATE_BPS = 1024  # a body slower than this on average, after
MIN_RATE_GRACE_S = 30  # ... this long, is cut off (408): a sender dribbling bytes would hold a slot forever


class PeerSessions:
    """A peer's STOW-RS requests are one session for the assembler, as an association is: from the
    start of a request (before its body arrives) it holds open the series the peer sent, so a study
    sent in batches (the node's own STOW-RS client sends 50 instances a request; a sender may run
    two sends at once) is not declared complete between batches, however long the next one takes to upload. Which series an
    upload carries is unknown until it has arrived, so a peer that keeps sending holds each series
    ``hold`` seconds after its last instance; all are let go once none of the peer's requests has
    been in flight for ``linger`` seconds. ``timing()`` gives (linger, hold) as the running config
    has them (a reload applies to the next request)."""

    def __init__(self, ingest: Ingest, timing: Callable[[], tuple[float, float]]):
        self.ingest = ingest
        self.timing = timing
        self._lock = threading.Lock()  # taken before the assembler's, never after
        self._open: dict[str, _PeerSession] = {}

    def begin(self, peer: str) -> int:
        """The session id for a new request of ``peer``."""
        with self._lock:
            session = self._open.get(peer)
            if session is None:
                session = self._open[peer] = _PeerSession()
                self.ingest.session_started(id(session))
            self._cancel_timer(session)
            session.requests += 1
            return id(session)

    def end(self, peer: str, stored_series: set[tuple[str, str]]) -> None:
        """A request of ``peer`` is answered, having stored into ``stored_series`` ((study, series) pairs)."""
        with self._lock:
            session = self._open[peer]
            session.requests -= 1
            now = time.monotonic()
            for key in stored_series:
                session.series[key] = now
            hold = self.timing()[1]
            done = [key for key, last in session.series.items() if now - last > hold]
            for key in done:
                del session.series[key]
            if done:
                self.ingest.session_released(id(session), done)
            if session.requests == 0:
                self._start_timer(peer, session)

    def touch(self, peer: str) -> None:
        """The peer is still there (told to retry later): its idle time starts again."""
        with self._lock:
            session = self._open.get(peer)
            if session is not None and session.requests == 0:
                self._cancel_timer(session)
                self._start_timer(peer, session)

    def _start_timer(self, peer: str, session: "_PeerSession") -> None:
        session.timer = threading.Timer(self.timing()[0], self._expire, (peer, session))
        session.timer.daemon = True
        session.timer.start()

    @staticmethod
    def _cancel_timer(session: "_PeerSession") -> None:
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None

    def _expire(self, peer: str, session: "_PeerSession") -> None:
        with self._lock:
            if self._open.get(peer) is not session or session.timer is not threading.current_thread():
                return  # a request came in meanwhile (or a newer timer runs)
            del self._open[peer]
            self.ingest.session_ended(id(session))


class _PeerSession:
    def __init__(self) -> None:
        self.requests = 0
        self.series: dict[tuple[str, str], float] = {}  # (study, series) held -> when last stored into
        self.timer: threading.Timer | None = None


def too_slow(received: int, elapsed: float) -> bool:
    return elapsed > MIN_RATE_GRACE_S and received < MIN_RATE_BPS * elapsed


# The parts of a request are stored by a few threads at once: each waits for its fsyncs, which the
# file system then commits together (measured: benchmarks/stow_ingest.py).
_STORERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="stow-store")


def read_budget(received: int, elapsed: float) -> float:
    """Seconds the next read of a body may wait: until it would be :func:`too_slow` with nothing
    more arriving, and never more than ``READ_TIMEOUT_S``."""
    return min(READ_TIMEOUT_S, max(MIN_RATE_GRACE_S, received / MIN_RATE_BPS) - elapsed)


class StowService:
    """STOW-RS state of one node: the peers' sessions, the concurrency limit, the requests in flight."""

    def __init__(self, node) -> None:
        self.node = node  # config (read at each request), ingest
        self.sessions = PeerSessions(node.ingest, lambda: (node.config.completion.quiet_seconds,
                                                           node.config.completion.stow_hold_seconds))
        self.busy = 0  # requests holding a slot (the event loop's thread only)
        self.active = 0  # requests being handled
        self.stopping = False

    @property
    def ingest(self) -> Ingest:
        return self.node.ingest

    async def endpoint(self, request: Request) -> Response:
        if request.method != "POST":
            return _text(405, "this node only receives (STOW-RS POST)", {"Allow": "POST", "Connection": "close"})
        self.active += 1
        try:
            return await self._post(request)
        finally:
            self.active -= 1

    async def _post(self, request: Request) -> Response:
        address = client_address(request)
        who = address
        body_read = False
        try:
            if self.stopping:
                raise HttpError(503, "the node is stopping", {"Retry-After": str(STOP_RETRY_AFTER_S)})
            study = request.path_params.get("study")
            if study is not None and not STUDY.match(study):
                raise HttpError(404, "STOW-RS is POST /dicom-web/studies or /dicom-web/studies/{StudyInstanceUID}")
            backoff = request.app.state.backoff
            check_backoff(backoff, address)
            config = self.node.config
            tls = request.url.scheme == "https"
            try:
                peer = authenticate_peer(config.peers, request.headers.get("authorization"), address)
            except HttpError as exc:
                if request.headers.get("authorization"):  # a guess or credentials from the wrong host
                    backoff.failure(address)  # (bounds these audit lines: the address is soon backed off)
                    await to_thread.run_sync(functools.partial(
                        self._audit, "stow.rejected", address=address, tls=tls, code=exc.code, reason=exc.message))
                raise
            who = f"{peer.ae_title}@{address}"
            boundary = _boundary(request.headers.get("content-type", ""))
            xml = _wants_xml(request.headers.get("accept", ""))  # 406 before the body is read
            coding = request.headers.get("transfer-encoding", "").strip().lower()
            if coding not in ("", "chunked"):
                raise HttpError(501, f"Transfer-Encoding {shown(coding)}: only chunked is understood")
            if not coding and request.headers.get("content-length") is None:
                raise HttpError(411, "send Content-Length or Transfer-Encoding: chunked")
            if self.busy >= config.node.max_associations:
                self.sessions.touch(peer.ae_title)  # its series stay open while it retries
                raise HttpError(503, f"the node's limit of {config.node.max_associations} "
                                     "concurrent senders is reached", {"Retry-After": str(RETRY_AFTER_S)})
            self.busy += 1
            try:
                session = self.sessions.begin(peer.ae_title)
                stored: set[tuple[str, str]] = set()
                try:
                    await self._full_refusal(request)
                    body = await self._buffered_body(request)
                    body_read = True
                    try:
                        code, response = await to_thread.run_sync(
                            self._store_parts, body, boundary, peer, address, study, session, stored, tls)
                    finally:
                        body.close()
                finally:
                    self.sessions.end(peer.ae_title, stored)
            finally:
                self.busy -= 1
        except HttpError as exc:
            log_refusal(request, exc, "STOW-RS from %s: %d %s", who, exc.code, exc.message)
            headers = dict(exc.headers)
            if not (body_read or exc.body_read):  # the body was not read: the connection cannot carry another request
                headers["Connection"] = "close"
            return _text(exc.code, exc.message, headers)
        if xml:
            return Response(_native_xml(response), code, media_type="application/dicom+xml")
        return Response(json.dumps(response).encode(), code, media_type="application/dicom+json")

    async def _full_refusal(self, request: Request) -> None:
        """HttpError 503 when the spool is below ``retention.min_free_bytes``: at once for a client
        waiting for 100-continue, else once its body has been read (and dropped), so it gets the
        answer rather than a reset connection."""
        short = self.ingest.short_of_space()
        if short is None:
            return
        drain = request.headers.get("expect", "").lower() != "100-continue"
        if drain:
            await self._receive(request, None)
        raise HttpError(503, short, {"Retry-After": str(FULL_RETRY_AFTER_S)}, body_read=drain)

    async def _buffered_body(self, request: Request) -> IO[bytes]:
        """The request body in an unnamed file in the spool (gone when closed): parts are read from
        it one at a time, so a large study never sits in memory."""
        try:
            out = tempfile.TemporaryFile(dir=self.ingest.spool.root, prefix=".stow-")
        except OSError as exc:
            await self._receive(request, None)
            raise HttpError(503, f"node cannot buffer the request: {exc.strerror}",
                            {"Retry-After": str(FULL_RETRY_AFTER_S)}, body_read=True) from None
        try:
            full = await self._receive(request, out)
        except BaseException:
            out.close()
            raise
        if full is not None:
            out.close()
            log.error("STOW-RS: cannot buffer a request in the spool: %s", full.strerror)
            comment = "node disk full" if full.errno == errno.ENOSPC else "node cannot write to its spool"
            raise HttpError(503, comment, {"Retry-After": str(FULL_RETRY_AFTER_S)}, body_read=True)
        out.seek(0)
        return out

    async def _receive(self, request: Request, out: IO[bytes] | None) -> OSError | None:
        """Reads the whole body into ``out`` (None: drops it). A write that fails (disk full) drops
        the rest and is returned; HttpError 408 for a body arriving too slowly, 400 for one cut short."""
        started, received, failed = time.monotonic(), 0, None
        while True:
            budget = read_budget(received, time.monotonic() - started)
            try:
                if budget <= 0:
                    raise TimeoutError
                message = await asyncio.wait_for(request.receive(), budget)
            except TimeoutError:
                elapsed = time.monotonic() - started
                if too_slow(received, elapsed):
                    raise HttpError(408, f"the body arrived at {received / elapsed:.0f} B/s, under the node's "
                                         f"minimum of {MIN_RATE_BPS} B/s") from None
                raise HttpError(408, f"nothing of the body arrived for {READ_TIMEOUT_S} s") from None
            if message["type"] == "http.disconnect":
                raise HttpError(400, "the client closed the connection before the end of the body")
            chunk = message.get("body", b"")
            received += len(chunk)
            if out is not None and failed is None and chunk:
                try:
                    out.write(chunk)
                except OSError as exc:
                    failed = exc
            if not message.get("more_body", False):
                break
        if out is not None and failed is None:
            try:
                out.flush()
            except OSError as exc:
                failed = exc
        return failed

    def _audit(self, event: str, **fields) -> None:
        try:
            self.node.audit.record(event, **fields)
        except Exception:
            log.exception("audit of a STOW-RS request failed")

    def _store_parts(self, body: IO[bytes], boundary: bytes, peer: Peer, address: str, study: str | None,
                     session: int, stored_series: set[tuple[str, str]], tls: bool) -> tuple[int, dict]:
        if os.fstat(body.fileno()).st_size == 0:
            raise HttpError(400, "empty request body")
        via = f"STOW-RS from {peer.ae_title}"
        with mmap.mmap(body.fileno(), 0, access=mmap.ACCESS_READ) as data:
            spans = list(_parts(data, boundary))  # the whole framing first: a body cut short stores nothing
            if not spans:
                raise HttpError(400, "no parts in the multipart body (wrong boundary?)")
            large = self.node.config.node.limits.spill_dataset_bytes  # checked from a file (node.spill)

            def store(span: tuple[int, int]) -> Verdict:
                start, end = span
                if end - start < large:
                    return self.ingest.store(data[start:end], session, peer.ae_title, address, via,
                                             expected_study=study, negotiated=False)
                try:
                    path = spill.part_to_file(data, start, end, self.ingest.spool.incoming_dir)
                except OSError as exc:
                    log.error("%s: cannot copy a part of %d bytes to the spool: %s", via, end - start, exc.strerror)
                    return Verdict(OUT_OF_RESOURCES, "node disk full" if disk_full(exc) else
                                   "node cannot write to its spool")
                try:
                    return self.ingest.store(path, session, peer.ae_title, address, via, expected_study=study,
                                             negotiated=False)
                finally:
                    path.unlink(missing_ok=True)

            verdicts = list(_STORERS.map(store, spans))
        stored = [v for v in verdicts if v.stored]
        failed = [v for v in verdicts if not v.stored]
        stored_series.update(v.series_key for v in stored)
        if failed and not stored and all(v.status == OUT_OF_RESOURCES for v in failed):
            # Nothing stored for want of room (the disk filled, the ledger cannot be written): the
            # sender should come back later, not take it as a refusal of its data.
            raise HttpError(503, failed[0].comment, {"Retry-After": str(FULL_RETRY_AFTER_S)}, body_read=True)
        code = 200 if not failed else 202 if stored else 409
        log.info("%s@%s: %d instance(s) stored, %d refused (HTTP %d)", via, address, len(stored), len(failed), code)
        self._audit("stow.accepted", calling_ae=peer.ae_title, address=address, tls=tls, code=code,
                    stored=len(stored), refused=len(failed))
        return code, _response(stored, failed)


def _text(code: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response((message + "\n").encode(), code, headers, media_type="text/plain; charset=utf-8")


def _wants_xml(accept: str) -> bool:
    """The answer's media type from Accept: DICOM JSON unless the client takes only DICOM XML
    (PS3.18 8.7.3.5); HttpError 406 when it takes neither."""
    kinds = {item.split(";", 1)[0].strip().lower() for item in accept.split(",") if item.strip()}
    if not kinds or kinds & {"application/dicom+json", "application/json", "application/*", "*/*"}:
        return False
    if kinds & {"application/dicom+xml", "application/xml"}:
        return True
    raise HttpError(406, f"STOW-RS answers in application/dicom+json or application/dicom+xml, not {shown(accept)}")


def _boundary(content_type: str) -> bytes:
    """The multipart boundary of a STOW-RS request; HttpError 415 for any other kind of body."""
    message = Message()
    message["Content-Type"] = content_type
    kind, part_type = message.get_content_type(), (message.get_param("type") or "application/dicom")
    if kind != "multipart/related" or str(part_type).lower() != "application/dicom":
        raise HttpError(415, f"STOW-RS here takes multipart/related; type=\"application/dicom\", "
                             f"not {shown(content_type) or '(no Content-Type)'}")
    boundary = message.get_param("boundary")
    if not boundary or not isinstance(boundary, str):
        raise HttpError(400, "multipart/related without a boundary")
    return boundary.encode("latin-1")


def _parts(data: mmap.mmap, boundary: bytes):
    """(start, end) of each part's content in a multipart body (RFC 2046): after the part's
    header lines, up to the CRLF before the next delimiter."""
    delimiter = b"--" + boundary
    pos = data.find(delimiter)
    while pos > 0 and data[pos - 2:pos] != b"\r\n":  # in the preamble but not at a line start: not it
        pos = data.find(delimiter, pos + 1)
    if pos < 0:
        return
    while True:
        pos += len(delimiter)
        if data[pos:pos + 2] == b"--":  # the close delimiter
            return
        line_end = data.find(b"\r\n", pos)
        headers_end = data.find(b"\r\n\r\n", line_end)
        if line_end < 0 or headers_end < 0:
            return
        start = headers_end + 4  # (a part without header lines: the delimiter line, then an empty one)
        nxt = data.find(b"\r\n" + delimiter, start)
        if nxt < 0:
            raise HttpError(400, "multipart body ends without its closing boundary (cut short?)")
        yield start, max(start, nxt)
        pos = nxt + 2


def _native_xml(response: dict) -> bytes:
    """A DICOM JSON data set of UI/US/SQ attributes (``_response``) as a NativeDicomModel (PS3.19 A.1)."""
    def attributes(parent: ElementTree.Element, dataset: dict) -> None:
        for tag, attribute in dataset.items():
            element = ElementTree.SubElement(parent, "DicomAttribute", tag=tag, vr=attribute["vr"])
            for number, value in enumerate(attribute.get("Value", []), start=1):
                if attribute["vr"] == "SQ":
                    attributes(ElementTree.SubElement(element, "Item", number=str(number)), value)
                else:
                    ElementTree.SubElement(element, "Value", number=str(number)).text = str(value)

    root = ElementTree.Element("NativeDicomModel", {"xmlns": "http://dicom.nema.org/PS3.19/models/NativeDICOM",
                                                    "xml:space": "preserve"})
    attributes(root, response)
    return ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)


def _response(stored: list[Verdict], failed: list[Verdict]) -> dict:
    """The Store Instances Response Module (PS3.18 Table 10.5.3-1) in DICOM JSON."""
    def reference(v: Verdict, reason: int | None = None) -> dict:
        item = {"00081150": {"vr": "UI", "Value": [v.sop_class]} if v.sop_class else {"vr": "UI"},
                "00081155": {"vr": "UI", "Value": [v.sop_instance]} if v.sop_instance else {"vr": "UI"}}
        if reason is not None:
            item["00081197"] = {"vr": "US", "Value": [reason]}
        return item

    out: dict = {}
    if failed:
        out["00081198"] = {"vr": "SQ", "Value": [reference(v, v.status) for v in failed]}
    if stored:
        out["00081199"] = {"vr": "SQ", "Value": [reference(v) for v in stored]}
    return out
