"""The DICOM listener: C-ECHO and C-STORE SCP.

Every association is checked before it is accepted (called AE, calling AE and, when configured,
the peer's host and TLS; PS3.8 9.3.4 reject reasons), within the limits of :mod:`node.dicom_guard`
(per-host slots, deadlines, PDU cap, back-off). Plain and TLS listeners share one guard. Every
accept / reject / abort passes :meth:`StorageSCP.record` (the audit hook). Each instance goes through :mod:`node.ingest`,
which spools it (fsync'd) before the success status goes back, so an acknowledged instance is
never lost. The handler never runs a pipeline: it spools, tells the assembler, and answers.
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.sop_class import Verification

from node import metrics, spill
from node.audit import Audit
from node.backoff import Backoff
from node.config import Config
from node.dicom_guard import AssociationOutcome, Guard, GuardedHandler, GuardedServer
from node.fast_reactor import FastAE, require_supported
from node.ingest import (
    OUT_OF_RESOURCES, SOP_CLASS_NOT_SUPPORTED, STORAGE_CLASSES, SUCCESS, TRANSFER_SYNTAXES, Ingest, uid_shown,
)
from node.tls import peer_subject, server_context

log = logging.getLogger(__name__)

REFUSED_CONTEXT = {0x01: "refused", 0x02: "refused", 0x03: "SOP class not supported",
                   0x04: "transfer syntax not supported"}

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_NO_REASON = (0x01, 0x01, 0x01)
REJECT_BUSY = (0x02, 0x03, 0x02)  # transient, service provider (presentation), local limit exceeded


#: pynetdicom modules that log a traceback for what a peer's bytes cause (an item that fails
#: validation, an undecodable DIMSE message, a state-machine action on a bad A-ASSOCIATE-RQ).
PEER_FACING_LOGGERS = ("acse", "dimse", "dimse_messages", "dul", "fsm", "pdu", "pdu_items", "pdu_primitives",
                       "presentation", "transport", "utils", "_validators")


VALIDATION_LOGGERS = ("pynetdicom.utils", "pynetdicom._validators")


class _NoTraceback(logging.Filter):
    """One line, not a traceback, for what a peer can cause (issue 21); tracebacks stay at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
            return True
        if record.name in VALIDATION_LOGGERS:
            return False  # "Invalid 'Calling AE Title' value '<the peer's bytes>'": the PDU violation line says it, escaped
        record.exc_info = record.exc_text = None
        return True


def quiet_peer_tracebacks() -> None:
    """Install :class:`_NoTraceback` on pynetdicom's peer-facing loggers (once)."""
    for name in PEER_FACING_LOGGERS:
        logger = logging.getLogger(f"pynetdicom.{name}")
        if not any(isinstance(f, _NoTraceback) for f in logger.filters):
            logger.addFilter(_NoTraceback())


def set_nodelay(event: evt.Event) -> None:
    """Without TCP_NODELAY every C-STORE waits ~40 ms for Nagle's algorithm (networking note)."""
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def encoded_with_meta(event: evt.Event) -> bytes:
    """``event.encoded_dataset(include_meta=True)``, byte for byte, without pydicom's file writer
    (:func:`node.spill.file_meta`)."""
    request = event.request
    if not (request.AffectedSOPClassUID and request.AffectedSOPInstanceUID):
        return event.encoded_dataset(include_meta=True)
    return b"".join((
        spill.file_meta(request.AffectedSOPClassUID, request.AffectedSOPInstanceUID, event.context.transfer_syntax),
        event.encoded_dataset(include_meta=False),
    ))


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]  # LO
    return ds


class StorageSCP:
    """The node's listener(s). ``start()`` opens the ports in the background; ``stop()`` closes them.

    ``audit`` (node.audit) gets every association outcome (see :meth:`record`).
    """

    def __init__(self, config: Config, ingest: Ingest, audit: Audit | None = None):
        require_supported()  # the PDU cap and deadlines live in node.fast_reactor
        quiet_peer_tracebacks()
        if config.node.log_level != "DEBUG":
            # pynetdicom's "standard" handlers format every PDU and DIMSE message for DEBUG lines
            # that are filtered out anyway, and raise on odd ones (a traceback in the log).
            pynetdicom_config.LOG_HANDLER_LEVEL = "none"
        self.config = config
        self.ingest = ingest
        self.audit = audit
        self._servers: list[GuardedServer] = []
        limits = config.node.limits
        ae = FastAE(ae_title=config.node.ae_title)  # event-driven reactors (node.fast_reactor)
        ae.maximum_associations = 1 << 20  # pynetdicom counts waiting connections too: Guard counts
        ae.maximum_pdu_size = limits.max_pdu_bytes
        ae.acse_timeout = limits.association_request_timeout_s
        ae.network_timeout = limits.idle_timeout_s
        ae.add_supported_context(Verification)
        for uid in sorted(STORAGE_CLASSES):
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)  # the acceptor takes the first proposed
        self.ae = ae
        self.backoff = Backoff("DICOM associations")
        self.guard = Guard(limits, config.node.max_associations, self.backoff, self.record)

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        """A reload (node.server) sets the new config: new connections get its limits."""
        self._config = config
        if hasattr(self, "guard"):
            limits = config.node.limits
            self.guard.limits = limits
            self.guard.set_max_associations(config.node.max_associations)
            self.ae.maximum_pdu_size = limits.max_pdu_bytes
            self.ae.acse_timeout = limits.association_request_timeout_s
            self.ae.network_timeout = limits.idle_timeout_s

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
        node = self.config.node
        ssl_context = server_context(node.tls) if node.tls else None  # bad files fail the start
        try:
            if node.port is not None:
                self._serve(node.port, None, handlers)
            if node.tls is not None:
                self._serve(node.tls.port, ssl_context, handlers)
        except BaseException:
            self.stop()
            raise

    def _serve(self, port: int, ssl_context: ssl.SSLContext | None, handlers) -> None:
        node = self.config.node
        server = self.ae.make_server((node.bind, port), ssl_context=ssl_context, evt_handlers=handlers,
                                     server_class=GuardedServer, request_handler=GuardedHandler)
        server.guard = self.guard
        server.spill_dir = self.ingest.spool.incoming_dir  # large data sets (node.spill)
        server.short_of_space = self.ingest.short_of_space
        self.ae._servers.append(server)  # as start_server does: shutdown() removes it
        threading.Thread(target=server.serve_forever, name=f"dicom-listener-{port}", daemon=True).start()
        self._servers.append(server)
        what = "DICOM TLS" if ssl_context else "DICOM"
        extra = ""
        if ssl_context is not None:
            extra = ", client certificate required" if node.tls.require_client_certificate else ""
        log.info("listening as %s on %s:%s (%s%s)", node.ae_title, node.bind, port, what, extra)

    def active_associations(self) -> int:
        return sum(1 for a in self.ae.active_associations if a.is_acceptor)

    @property
    def listening(self) -> bool:
        return bool(self._servers) and all(server.socket.fileno() != -1 for server in self._servers)

    def stop(self) -> None:
        while self._servers:
            self._servers.pop().shutdown()

    # -- the audit hook -------------------------------------------------------------------
    def record(self, outcome: AssociationOutcome) -> None:
        """Every association attempt ends here once: accepted, rejected at A-ASSOCIATE-RQ, aborted
        for a PDU violation, or refused at the connection (limits, back-off, TLS; these once per
        host and log window, as they are logged: a flood must not cost an fsync per connection).
        Logging is done by the callers; this writes the audit trail."""
        if self.audit is None:
            return
        fields = {"calling_ae": outcome.calling_ae, "address": outcome.address, "tls": outcome.tls}
        if outcome.peer_certificate:
            fields["peer_certificate"] = outcome.peer_certificate
        try:
            if outcome.accepted:
                self.audit.record("association.accepted", **fields)
            else:
                self.audit.record("association.rejected", **fields, reason=outcome.reason)
        except Exception:
            log.exception("audit of an association outcome failed")

    # -- handlers -------------------------------------------------------------------------
    def _check_association(self, event: evt.Event) -> None:
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        called = primitive.called_ae_title.strip()
        calling = primitive.calling_ae_title.strip()
        host = assoc.requestor.address
        tls = isinstance(assoc.dul.socket.socket, ssl.SSLSocket)
        config = self.config  # one config for the whole check, even if a reload swaps it meanwhile
        peer = config.peer(calling)
        if called != config.node.ae_title:
            why, reason = f"called AE {called!r} is not {config.node.ae_title!r}", REJECT_CALLED_AE
        elif peer is None:
            why, reason = "calling AE is not a configured peer", REJECT_CALLING_AE
        elif not peer.allows(host):
            why, reason = f"peer {calling} is only allowed from {peer.host}", REJECT_CALLING_AE
        elif peer.tls and not tls:
            why, reason = f"peer {calling} must use DICOM TLS (peers[].tls)", REJECT_NO_REASON
        else:
            busy = self.guard.associate(assoc, host)
            if busy is None:
                return
            logged = self.guard.quiet.warning(host, "busy", "rejected association from %s@%s: %s", calling, host, busy)
            self._reject(event, REJECT_BUSY)
            if logged:  # like the log, once per host and window
                self.record(AssociationOutcome(False, host, calling, tls, busy, peer_subject(assoc.dul.socket.socket)))
            return
        log.warning("rejected association from %s@%s: %s", calling, host, why)
        self.backoff.failure(host)  # before the answer: the peer's next try must see it
        self._reject(event, reason)
        self.record(AssociationOutcome(False, host, calling, tls, why, peer_subject(assoc.dul.socket.socket)))

    def _accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        host, calling = assoc.requestor.address, assoc.requestor.ae_title.strip()
        sock = assoc.dul.socket.socket
        tls = isinstance(sock, ssl.SSLSocket)
        subject = peer_subject(sock)
        self.backoff.success(host)
        if tls:
            log.info("association from %s@%s over %s%s", calling, host, sock.version(),
                     f", client certificate {subject}" if subject else ", no client certificate")
        self.record(AssociationOutcome(True, host, calling, tls, "", subject))
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
        """pynetdicom's own rejections (the node's checks log theirs)."""
        primitive = event.assoc.requestor.primitive
        calling, host = primitive.calling_ae_title.strip(), event.assoc.requestor.address
        log.warning("rejected association from %s@%s: the association negotiation failed", calling, host)
        self.record(AssociationOutcome(False, host, calling, isinstance(event.assoc.dul.socket.socket, ssl.SSLSocket),
                                       "association negotiation failed"))

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
        if isinstance(event.request.DataSet, spill.Dropped):
            log.error("C-STORE from %s: SOP %s refused (0x%04X): its data set could not be written to the spool (%s)",
                      calling, uid_shown(str(event.request.AffectedSOPInstanceUID or "")), OUT_OF_RESOURCES,
                      event.request.DataSet.why)
            full = event.request.DataSet.disk_full
            metrics.INSTANCES_REFUSED.labels(metrics.DISK_FULL if full else metrics.SPOOL_ERROR).inc()
            return _failure(OUT_OF_RESOURCES, "node disk full" if full else "node cannot write to its spool")
        spilled = event.request._dataset_path  # a large data set, in a file (node.spill), else None
        try:
            verdict = self.ingest.store(
                Path(spilled) if spilled else encoded_with_meta(event), id(assoc), calling, assoc.requestor.address,
                f"C-STORE from {calling}", expected_sop=str(event.request.AffectedSOPInstanceUID or ""),
                expected_sop_class=sop_class,
            )
        finally:
            if spilled:  # stored: linked into its series folder; refused: gone
                Path(spilled).unlink(missing_ok=True)
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
