"""The DICOM listener: C-ECHO and C-STORE SCP.

Every association is checked before it is accepted (called AE, calling AE and, when configured,
the peer's host; PS3.8 9.3.4 reject reasons). Each instance goes through :mod:`node.ingest`,
which spools it (fsync'd) before the success status goes back, so an acknowledged instance is
never lost. The handler never runs a pipeline: it spools, tells the assembler, and answers.
"""
from __future__ import annotations

import logging
import socket
import ssl
import struct
from typing import Any

from pydicom import Dataset
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.sop_class import Verification

from node.audit import Audit
from node.config import Config
from node.fast_reactor import FastAE
from node.ingest import SOP_CLASS_NOT_SUPPORTED, STORAGE_CLASSES, SUCCESS, TRANSFER_SYNTAXES, Ingest, uid_shown

log = logging.getLogger(__name__)

REFUSED_CONTEXT = {0x01: "refused", 0x02: "refused", 0x03: "SOP class not supported",
                   0x04: "transfer syntax not supported"}

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)


def set_nodelay(event: evt.Event) -> None:
    """Without TCP_NODELAY every C-STORE waits ~40 ms for Nagle's algorithm (networking note)."""
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _explicit_le(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2s2xI", group, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def encoded_with_meta(event: evt.Event) -> bytes:
    """``event.encoded_dataset(include_meta=True)``, byte for byte, without pydicom's file writer.

    The file meta is the one pynetdicom writes (``pynetdicom.dsutils.create_file_meta``: version,
    media storage SOP class/instance from the request, the context's transfer syntax, pynetdicom's
    implementation UID and version); pydicom's writer costs ~0.45 ms per instance for these seven
    elements. Anything unusual (a UID that is not ASCII) goes the stock way.
    """
    request = event.request
    if not (request.AffectedSOPClassUID and request.AffectedSOPInstanceUID):
        return event.encoded_dataset(include_meta=True)
    try:
        body = b"".join((
            _explicit_le(2, 0x0001, b"OB", b"\x00\x01"),
            _explicit_le(2, 0x0002, b"UI", _padded(str(request.AffectedSOPClassUID), b"\0")),
            _explicit_le(2, 0x0003, b"UI", _padded(str(request.AffectedSOPInstanceUID), b"\0")),
            _explicit_le(2, 0x0010, b"UI", _padded(str(event.context.transfer_syntax), b"\0")),
            _explicit_le(2, 0x0012, b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\0")),
            _explicit_le(2, 0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
        ))
    except (UnicodeEncodeError, struct.error):
        return event.encoded_dataset(include_meta=True)
    return b"".join((
        b"\0" * 128, b"DICM", _explicit_le(2, 0x0000, b"UL", struct.pack("<I", len(body))), body,
        event.encoded_dataset(include_meta=False),
    ))


def _tls(event: evt.Event) -> bool:
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    return isinstance(sock, ssl.SSLSocket)


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]  # LO
    return ds


class StorageSCP:
    """The node's listener. ``start()`` opens the port in the background; ``stop()`` closes it."""

    def __init__(self, config: Config, ingest: Ingest, audit: Audit | None = None):
        self.config = config
        self.ingest = ingest
        self.audit = audit
        self._server = None
        ae = FastAE(ae_title=config.node.ae_title)  # event-driven reactors (node.fast_reactor)
        ae.maximum_associations = config.node.max_associations
        ae.add_supported_context(Verification)
        for uid in sorted(STORAGE_CLASSES):
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)  # the acceptor takes the first proposed
        self.ae = ae

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        handlers = [
            (evt.EVT_CONN_OPEN, set_nodelay),
            (evt.EVT_CONN_OPEN, self._opened),
            (evt.EVT_REQUESTED, self._check_association),
            (evt.EVT_ACCEPTED, self._accepted),
            (evt.EVT_REJECTED, self._log_negotiation_reject),
            (evt.EVT_C_ECHO, self._echo),
            (evt.EVT_C_STORE, self._store),
            (evt.EVT_CONN_CLOSE, self._closed),
        ]
        self._server = self.ae.start_server(
            (self.config.node.bind, self.config.node.port), block=False, evt_handlers=handlers
        )
        log.info("listening as %s on %s:%s", self.config.node.ae_title, self.config.node.bind, self.config.node.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # -- handlers -------------------------------------------------------------------------
    def _check_association(self, event: evt.Event) -> None:
        primitive = event.assoc.requestor.primitive
        called = primitive.called_ae_title.strip()
        calling = primitive.calling_ae_title.strip()
        host = event.assoc.requestor.address
        config = self.config  # one config for the whole check, even if a reload swaps it meanwhile
        if called != config.node.ae_title:
            log.warning("rejected association from %s@%s: called AE %r is not %r",
                        calling, host, called, config.node.ae_title)
            self._audit_reject(event, f"called AE {called!r} is not {config.node.ae_title!r}")
            self._reject(event, REJECT_CALLED_AE)
            return
        peer = config.peer(calling)
        if peer is None:
            log.warning("rejected association from %s@%s: calling AE is not a configured peer", calling, host)
            self._audit_reject(event, "calling AE is not a configured peer")
            self._reject(event, REJECT_CALLING_AE)
            return
        if not peer.allows(host):
            log.warning("rejected association from %s@%s: peer %s is only allowed from %s",
                        calling, host, calling, peer.host)
            self._audit_reject(event, f"peer is only allowed from {peer.host}")
            self._reject(event, REJECT_CALLING_AE)

    def _audit_reject(self, event: evt.Event, reason: str) -> None:
        if self.audit is not None:
            primitive = event.assoc.requestor.primitive
            self.audit.record("association.rejected", calling_ae=primitive.calling_ae_title.strip(),
                              called_ae=primitive.called_ae_title.strip(), address=event.assoc.requestor.address,
                              tls=_tls(event), reason=reason)

    def _accepted(self, event: evt.Event) -> None:
        if self.audit is not None:
            self.audit.record("association.accepted", calling_ae=event.assoc.requestor.ae_title.strip(),
                              address=event.assoc.requestor.address, tls=_tls(event))
        self._log_refused_contexts(event)

    @staticmethod
    def _log_refused_contexts(event: evt.Event) -> None:
        """Say which SOP classes / transfer syntaxes of an accepted association were refused: the
        sender only sees "no presentation context" when it then tries to send them."""
        refused = sorted({(str(cx.abstract_syntax), REFUSED_CONTEXT.get(cx.result, f"result {cx.result}"))
                          for cx in event.assoc.rejected_contexts})
        if refused:
            names = ", ".join(f"{UID(uid).name} ({why})" for uid, why in refused[:8])  # the UID when unnamed
            more = ", ..." if len(refused) > 8 else ""
            log.warning("association from %s: %d presentation context(s) refused: %s%s",
                        event.assoc.requestor.ae_title.strip(), len(refused), names, more)

    def _log_negotiation_reject(self, event: evt.Event) -> None:
        """pynetdicom's own rejections (the node's AE checks log theirs): above
        ``node.max_associations`` is the one an admin can act on."""
        primitive = event.assoc.requestor.primitive
        calling, host = primitive.calling_ae_title.strip(), event.assoc.requestor.address
        acceptors = [a for a in self.ae.active_associations if a.is_acceptor]
        why = (f"the node's limit of {self.ae.maximum_associations} associations is reached"
               if len(acceptors) > self.ae.maximum_associations else "the association negotiation failed")
        log.warning("rejected association from %s@%s: %s", calling, host, why)
        self._audit_reject(event, why)

    @staticmethod
    def _reject(event: evt.Event, reason: tuple[int, int, int]) -> None:
        event.assoc.acse.send_reject(*reason)
        event.assoc.kill()  # waits until the DUL has sent the A-ASSOCIATE-RJ before the socket closes

    def _store(self, event: evt.Event) -> Any:
        assoc = event.assoc
        calling = assoc.requestor.ae_title.strip()
        sop_class = str(event.request.AffectedSOPClassUID or "")
        if sop_class != str(event.context.abstract_syntax):  # pynetdicom picks the service by the request's UID
            log.warning("C-STORE from %s: SOP %s refused (0x%04X): its SOP class %s is not the one of presentation "
                        "context %d", calling, uid_shown(str(event.request.AffectedSOPInstanceUID or "")),
                        SOP_CLASS_NOT_SUPPORTED, uid_shown(sop_class), event.context.context_id)
            return _failure(SOP_CLASS_NOT_SUPPORTED, "SOP class is not the presentation context's")
        verdict = self.ingest.store(
            encoded_with_meta(event), id(assoc), calling, assoc.requestor.address, f"C-STORE from {calling}",
            expected_sop=str(event.request.AffectedSOPInstanceUID or ""), expected_sop_class=sop_class,
        )
        return SUCCESS if verdict.stored else _failure(verdict.status, verdict.comment)

    @staticmethod
    def _echo(event: evt.Event) -> int:
        """C-ECHO. pynetdicom picks the service by the request's SOP class UID, so a C-STORE (or any
        other request) naming the Verification SOP class arrives here and would be answered as an echo
        success, its data set dropped: the association is aborted instead (a protocol violation)."""
        if isinstance(event.request, C_ECHO):
            return SUCCESS
        log.warning("association from %s aborted: a %s request on the Verification presentation context %d",
                    event.assoc.requestor.ae_title.strip(), type(event.request).__name__.replace("_", "-"),
                    event.context.context_id)
        event.assoc.abort()
        return SUCCESS  # not sent: the association is gone

    def _opened(self, event: evt.Event) -> None:
        self.ingest.session_started(id(event.assoc))

    def _closed(self, event: evt.Event) -> None:
        self.ingest.session_ended(id(event.assoc))
