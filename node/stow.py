"""The DICOMweb listener: STOW-RS (PS3.18 10.5), ``POST /dicom-web/studies[/{StudyInstanceUID}]``.

A request is a ``multipart/related; type="application/dicom"`` body of Part 10 files, sent with
Content-Length or chunked. Only peers with ``stow_auth`` may send: HTTP Basic or a bearer token,
checked against the environment variables the config names, and the peer's ``host`` when set.
Each part goes through :mod:`node.ingest`, exactly as a C-STORE would; a peer's requests are one
session for the assembler, as an association is (:class:`PeerSessions`). The answer comes only
when the whole multipart framing has been read and every part is on disk or refused: 200 all
stored, 202 some refused, 409 none stored, with the Store Instances Response Module (Referenced /
Failed SOP Sequence, a Failure Reason per refused part) in DICOM JSON, or DICOM XML for a client
that accepts only that. Plain HTTP: TLS needs a tunnel that keeps client addresses (behind a
reverse proxy, ``host`` pins and ``sender`` would apply to the proxy).
"""
from __future__ import annotations

import base64
import contextlib
import errno
import hmac
import json
import logging
import mmap
import os
import re
import socket
import tempfile
import threading
import time
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO
from xml.etree import ElementTree

from node.config import Config, Peer
from node.ingest import Ingest, Verdict

log = logging.getLogger(__name__)

PATH = re.compile(r"^/dicom-web/studies(?:/([0-9.]+))?/?$")
COPY_CHUNK = 1 << 20
READ_TIMEOUT_S = 60  # a client silent this long mid-request is cut off
RETRY_AFTER_S = 1  # told to a sender over the limit; its series stay open meanwhile (PeerSessions.touch)
STOP_WAIT_S = 30  # requests in flight at a graceful stop get this long to be answered
MIN_RATE_BPS = 1024  # a body slower than this on average, after
MIN_RATE_GRACE_S = 30  # ... this long, is cut off (408): a sender dribbling bytes would hold a slot forever


class HttpError(Exception):
    def __init__(self, code: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code, self.message, self.headers = code, message, headers or {}


class PeerSessions:
    """A peer's STOW-RS requests are one session for the assembler, as an association is: from the
    start of a request (before its body arrives) it holds open the series the peer sent, so a study
    sent in batches (the node's own STOW-RS client sends 50 instances a request; a sender may run
    two sends at once) is not declared complete between batches, however long the next one takes to upload. Which series an
    upload carries is unknown until it has arrived, so a peer that keeps sending holds each series
    ``hold`` seconds after its last instance; all are let go once none of the peer's requests has
    been in flight for ``linger`` seconds."""

    def __init__(self, ingest: Ingest, linger: float, hold: float):
        self.ingest = ingest
        self.linger = linger
        self.hold = hold
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
            done = [key for key, last in session.series.items() if now - last > self.hold]
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
        session.timer = threading.Timer(self.linger, self._expire, (peer, session))
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


class UploadWatch:
    """Cuts off bodies arriving slower than ``MIN_RATE_BPS`` on average once ``MIN_RATE_GRACE_S``
    have passed: their socket's reading side is shut, the handler's read ends, and it answers 408.
    A per-read timeout alone does not do it: one byte every minute never times out."""

    def __init__(self) -> None:
        self._uploads: dict[int, "StowHandler"] = {}
        self._lock = threading.Lock()

    def add(self, handler: "StowHandler") -> None:
        handler.body_started, handler.body_received, handler.cut_off = time.monotonic(), 0, False
        with self._lock:
            self._uploads[id(handler)] = handler

    def remove(self, handler: "StowHandler") -> None:
        with self._lock:
            self._uploads.pop(id(handler), None)

    def check(self, now: float) -> int:
        """Cut off every upload that is too slow at ``now``; how many."""
        with self._lock:  # under the lock: a body that has just completed is no longer registered
            slow = [h for h in self._uploads.values() if too_slow(h.body_received, now - h.body_started)]
            for handler in slow:
                handler.cut_off = True
                with contextlib.suppress(OSError):
                    handler.connection.shutdown(socket.SHUT_RD)  # the answer can still be written
        return len(slow)

    def run(self, stopped: threading.Event) -> None:
        while not stopped.wait(1.0):
            self.check(time.monotonic())


def too_slow(received: int, elapsed: float) -> bool:
    return elapsed > MIN_RATE_GRACE_S and received < MIN_RATE_BPS * elapsed


class StowServer:
    """``start()`` opens ``node.stow_port`` in a background thread; ``stop()`` closes it."""

    def __init__(self, config: Config, ingest: Ingest):
        self.config = config
        self.ingest = ingest
        self.sessions = PeerSessions(ingest, config.completion.quiet_seconds, config.completion.stow_hold_seconds)
        self.slots = threading.BoundedSemaphore(config.node.max_associations)
        self.stopping = False
        self.uploads = UploadWatch()
        self._watch_stop = threading.Event()
        self._active = 0  # requests being handled
        self._idle = threading.Condition()
        self._server: ThreadingHTTPServer | None = None

    @contextlib.contextmanager
    def handling(self):
        with self._idle:
            self._active += 1
        try:
            yield
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def start(self) -> None:
        for peer in self.config.peers:
            if peer.stow_auth and not os.environ.get(peer.stow_auth.secret_env):
                log.warning("peer %s: environment variable %s is not set; its STOW-RS requests will get 401",
                            peer.ae_title, peer.stow_auth.secret_env)
        handler = type("Handler", (StowHandler,), {"stow": self})
        self._server = ThreadingHTTPServer((self.config.node.bind, self.config.node.stow_port), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="stow-rs", daemon=True).start()
        threading.Thread(target=self.uploads.run, args=(self._watch_stop,), name="stow-rs-watch", daemon=True).start()
        log.info("STOW-RS listening on http://%s:%s/dicom-web/studies", self.config.node.bind,
                 self.config.node.stow_port)

    def stop(self) -> None:
        """No new requests (503 on open connections); those being handled get ``STOP_WAIT_S`` to be
        answered, so a stop does not cut a study in two. One not answered was not acknowledged."""
        if self._server is None:
            return
        self.stopping = True  # still accepting, to answer 503 rather than leave connections hanging
        with self._idle:
            if not self._idle.wait_for(lambda: self._active == 0, timeout=STOP_WAIT_S):
                log.warning("stopping with %d STOW-RS request(s) unanswered: not acknowledged, their senders "
                            "must send them again", self._active)
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        self._watch_stop.set()

    def authenticate(self, authorization: str | None, client_ip: str) -> Peer:
        """The peer these credentials belong to; HttpError 401 (unknown) or 403 (wrong host)."""
        scheme, _, value = (authorization or "").partition(" ")
        peer = next((p for p in self.config.peers if p.stow_auth and _matches(p, scheme.lower(), value.strip())), None)
        if peer is None:
            why = "no credentials" if not authorization else "credentials of no STOW-RS peer"
            raise HttpError(401, f"{why}: send a configured peer's Basic or Bearer credentials",
                            {"WWW-Authenticate": 'Basic realm="srnode", charset="UTF-8", Bearer realm="srnode"'})
        if not peer.allows(client_ip):
            raise HttpError(403, f"peer {peer.ae_title} is only allowed from {peer.host}")
        return peer


def _matches(peer: Peer, scheme: str, value: str) -> bool:
    """Whether ``scheme value`` (an Authorization header, decoded as latin-1 by http.server) is
    ``peer``'s secret; non-ASCII secrets match as UTF-8 or latin-1 bytes, as clients send either."""
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


def _shown(text: str) -> str:
    """A client's header text as it may appear in a log line: escaped (no forged lines), cut."""
    return text.encode("unicode_escape").decode("ascii")[:120]


class StowHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, chunked requests
    disable_nagle_algorithm = True  # else each answer (headers, then body) waits ~40 ms for an ACK
    body_started, body_received, cut_off = 0.0, 0, False  # UploadWatch's view of the body
    server_version = "srnode-stow"
    timeout = READ_TIMEOUT_S
    stow: StowServer

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        with self.stow.handling():
            self._post()

    def _post(self) -> None:
        body_read = False
        peer_name = self.client_address[0]
        try:
            if self.stow.stopping:
                raise HttpError(503, "the node is stopping", {"Retry-After": "10"})
            match = PATH.match(self.path.split("?", 1)[0])
            if not match:
                raise HttpError(404, "STOW-RS is POST /dicom-web/studies or /dicom-web/studies/{StudyInstanceUID}")
            peer = self.stow.authenticate(self.headers.get("Authorization"), self.client_address[0])
            peer_name = f"{peer.ae_title}@{peer_name}"
            boundary = _boundary(self.headers.get("Content-Type", ""))
            xml = self._wants_xml()  # 406 before the body is read
            if not self.stow.slots.acquire(blocking=False):
                self.stow.sessions.touch(peer.ae_title)  # its series stay open while it retries
                raise HttpError(503, f"the node's limit of {self.stow.config.node.max_associations} "
                                     "concurrent senders is reached", {"Retry-After": str(RETRY_AFTER_S)})
            try:
                session = self.stow.sessions.begin(peer.ae_title)
                stored: set[tuple[str, str]] = set()
                try:
                    with self._buffered_body() as body:
                        body_read = True
                        code, response = self._store_parts(body, boundary, peer, match.group(1), session, stored)
                finally:
                    self.stow.sessions.end(peer.ae_title, stored)
            finally:
                self.stow.slots.release()
        except HttpError as exc:
            log.warning("STOW-RS from %s: %d %s", peer_name, exc.code, exc.message)
            self.close_connection = self.close_connection or not body_read
            self._send(exc.code, (exc.message + "\n").encode(), "text/plain; charset=utf-8", exc.headers)
            return
        if xml:
            self._send(code, _native_xml(response), "application/dicom+xml")
        else:
            self._send(code, json.dumps(response).encode(), "application/dicom+json")

    def handle_expect_100(self) -> bool:
        """``Expect: 100-continue`` is answered in :meth:`_buffered_body`, once the request has passed
        the checks that need no body: a refused client does not upload a study for nothing."""
        return True

    def _wants_xml(self) -> bool:
        """The answer's media type from Accept: DICOM JSON unless the client takes only DICOM XML
        (PS3.18 8.7.3.5); HttpError 406 when it takes neither."""
        accept = self.headers.get("Accept", "")
        kinds = {item.split(";", 1)[0].strip().lower() for item in accept.split(",") if item.strip()}
        if not kinds or kinds & {"application/dicom+json", "application/json", "application/*", "*/*"}:
            return False
        if kinds & {"application/dicom+xml", "application/xml"}:
            return True
        raise HttpError(406, f"STOW-RS answers in application/dicom+json or application/dicom+xml, not {_shown(accept)}")

    def do_GET(self) -> None:  # noqa: N802
        self.close_connection = True  # a body, if any, is not read
        self._send(405, b"this node only receives (STOW-RS POST)\n", "text/plain; charset=utf-8", {"Allow": "POST"})

    do_PUT = do_DELETE = do_GET

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the access log stays quiet
        log.debug("STOW-RS %s %s", self.client_address[0], _shown(format % args))

    # -- the body -------------------------------------------------------------------------
    def _buffered_body(self) -> IO[bytes]:
        """The request body in an unnamed file in the spool (gone when closed): parts are read from
        it one at a time, so a large study never sits in memory."""
        coding = self.headers.get("Transfer-Encoding", "").strip().lower()
        if coding not in ("", "chunked"):
            raise HttpError(501, f"Transfer-Encoding {_shown(coding)}: only chunked is understood")
        chunked = coding == "chunked"
        length = self.headers.get("Content-Length")
        if not chunked and length is None:
            raise HttpError(411, "send Content-Length or Transfer-Encoding: chunked")
        if self.headers.get("Expect", "").lower() == "100-continue":
            self.send_response_only(100)
            self.end_headers()
        try:
            out = tempfile.TemporaryFile(dir=self.stow.ingest.spool.root, prefix=".stow-")
        except OSError as exc:
            raise HttpError(503, f"node cannot buffer the request: {exc.strerror}", {"Retry-After": "60"}) from None
        self.stow.uploads.add(self)
        try:
            if chunked:
                self._copy_chunked(out)
            else:
                self._copy(out, int(length))
            out.flush()
            if self.cut_off:  # cut off just as the body completed: the connection is half shut
                self.close_connection = True
        except (OSError, ValueError) as exc:
            out.close()
            if self.cut_off:
                self.close_connection = True
                rate = self.body_received / max(time.monotonic() - self.body_started, 1e-9)
                raise HttpError(408, f"the body arrived at {rate:.0f} B/s, under the node's minimum of "
                                     f"{MIN_RATE_BPS} B/s") from None
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise HttpError(503, "node disk full", {"Retry-After": "60"}) from None
            raise HttpError(400, f"request body could not be read ({exc})") from None
        finally:
            self.stow.uploads.remove(self)
        out.seek(0)
        return out

    def _copy(self, out: IO[bytes], n: int) -> None:
        if n < 0:
            raise ValueError("negative Content-Length")
        while n > 0:
            data = self.rfile.read1(min(n, COPY_CHUNK))  # what has arrived: the watch sees progress
            if not data:
                raise ConnectionError("the client closed the connection before the end of the body")
            out.write(data)
            n -= len(data)
            self.body_received += len(data)

    def _copy_chunked(self, out: IO[bytes]) -> None:
        while True:
            line = self.rfile.readline(1024)
            if not line.endswith(b"\n"):
                raise ConnectionError("chunk size line cut short")
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while self.rfile.readline(8192).strip():  # trailer fields, ignored
                    pass
                return
            self._copy(out, size)
            if self.rfile.read(2) != b"\r\n":
                raise ValueError("chunk not followed by CRLF")

    # -- the parts ------------------------------------------------------------------------
    def _store_parts(self, body: IO[bytes], boundary: bytes, peer: Peer, study: str | None,
                     session: int, stored_series: set[tuple[str, str]]) -> tuple[int, dict]:
        if os.fstat(body.fileno()).st_size == 0:
            raise HttpError(400, "empty request body")
        via = f"STOW-RS from {peer.ae_title}"
        with mmap.mmap(body.fileno(), 0, access=mmap.ACCESS_READ) as data:
            spans = list(_parts(data, boundary))  # the whole framing first: a body cut short stores nothing
            if not spans:
                raise HttpError(400, "no parts in the multipart body (wrong boundary?)")
            verdicts = [self.stow.ingest.store(data[start:end], session, peer.ae_title, self.client_address[0], via,
                                               expected_study=study, negotiated=False) for start, end in spans]
        stored = [v for v in verdicts if v.stored]
        failed = [v for v in verdicts if not v.stored]
        stored_series.update(v.series_key for v in stored)
        code = 200 if not failed else 202 if stored else 409
        log.info("%s@%s: %d instance(s) stored, %d refused (HTTP %d)", via, self.client_address[0],
                 len(stored), len(failed), code)
        return code, _response(stored, failed)

    def _send(self, code: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        try:
            self.end_headers()
            self.wfile.write(body)
        except OSError as exc:  # the client left (gave up mid-upload): nothing to tell it
            log.info("STOW-RS from %s: the client left before its %d answer (%s)", self.client_address[0], code,
                     type(exc).__name__)
            self.close_connection = True


def _boundary(content_type: str) -> bytes:
    """The multipart boundary of a STOW-RS request; HttpError 415 for any other kind of body."""
    message = Message()
    message["Content-Type"] = content_type
    kind, part_type = message.get_content_type(), (message.get_param("type") or "application/dicom")
    if kind != "multipart/related" or str(part_type).lower() != "application/dicom":
        raise HttpError(415, f"STOW-RS here takes multipart/related; type=\"application/dicom\", "
                             f"not {_shown(content_type) or '(no Content-Type)'}")
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
