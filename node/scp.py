"""The DICOM listener: C-ECHO and C-STORE SCP.

Every association is checked before it is accepted (called AE, calling AE and, when configured,
the peer's host; PS3.8 9.3.4 reject reasons). Every instance is written to the spool exactly as
sent (temporary file, fsync, rename, directory fsync) before the success status goes back, so an
acknowledged instance is never lost. The handler never decodes the whole dataset and never runs
a pipeline: it spools, tells the assembler, and answers.
"""
from __future__ import annotations

import errno
import io
import logging
import socket
import sqlite3
import struct
import threading
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
    JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
    JPEGLSLossless, JPEGLSNearLossless, RLELossless, UID,
)
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.sop_class import Verification, _STORAGE_CLASSES

from node.assembly import Assembler
from node.config import Config
from node.fast_reactor import FastAE
from node.ledger import Ledger
from node.spool import Spool, valid_uid, write_atomic

log = logging.getLogger(__name__)

# C-STORE statuses (PS3.4 Annex B.2.3), named so that each answer says what it means.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
REFUSED_CONTEXT = {0x01: "refused", 0x02: "refused", 0x03: "SOP class not supported",
                   0x04: "transfer syntax not supported"}

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)

# Uncompressed first (explicit before implicit), then every common compressed syntax: the
# acceptor takes the first of these that the requestor proposes.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, RLELossless,
]

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


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]  # LO
    return ds


class StorageSCP:
    """The node's listener. ``start()`` opens the port in the background; ``stop()`` closes it."""

    def __init__(self, config: Config, spool: Spool, ledger: Ledger, assembler: Assembler):
        self.config = config
        self.spool = spool
        self.ledger = ledger
        self.assembler = assembler
        self._server = None
        self._noted: set[tuple[int, str]] = set()  # (association, series) already in the ledger
        self._lock = threading.Lock()
        ae = FastAE(ae_title=config.node.ae_title)  # event-driven reactors (node.fast_reactor)
        ae.maximum_associations = config.node.max_associations
        ae.add_supported_context(Verification)
        for uid in sorted(_STORAGE_CLASSES.values()):
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        self.ae = ae

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        handlers = [
            (evt.EVT_CONN_OPEN, set_nodelay),
            (evt.EVT_CONN_OPEN, self._opened),
            (evt.EVT_REQUESTED, self._check_association),
            (evt.EVT_ACCEPTED, self._log_refused_contexts),
            (evt.EVT_REJECTED, self._log_negotiation_reject),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
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
        if called != self.config.node.ae_title:
            log.warning("rejected association from %s@%s: called AE %r is not %r",
                        calling, host, called, self.config.node.ae_title)
            self._reject(event, REJECT_CALLED_AE)
            return
        peer = self.config.peer(calling)
        if peer is None:
            log.warning("rejected association from %s@%s: calling AE is not a configured peer", calling, host)
            self._reject(event, REJECT_CALLING_AE)
            return
        if peer.host is not None and _host_ip(peer.host) != host:
            log.warning("rejected association from %s@%s: peer %s is only allowed from %s",
                        calling, host, calling, peer.host)
            self._reject(event, REJECT_CALLING_AE)

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

    @staticmethod
    def _reject(event: evt.Event, reason: tuple[int, int, int]) -> None:
        event.assoc.acse.send_reject(*reason)
        event.assoc.kill()  # waits until the DUL has sent the A-ASSOCIATE-RJ before the socket closes

    def _store(self, event: evt.Event) -> Any:
        assoc = event.assoc
        calling = assoc.requestor.ae_title.strip()
        sop_uid = str(event.request.AffectedSOPInstanceUID or "")
        raw = encoded_with_meta(event)
        try:
            header = dcmread(io.BytesIO(raw))  # whole, once: the pixel data is checked too (pixel_data_cut)
            study = str(header.get("StudyInstanceUID", "")).strip()
            series = str(header.get("SeriesInstanceUID", "")).strip()
            ds_sop = str(header.get("SOPInstanceUID", "")).strip()
        except Exception as exc:  # pydicom raises many types on garbage (zlib.error, struct.error, ...)
            log.warning("C-STORE from %s: SOP %s cannot be parsed (%s): refused", calling, sop_uid, type(exc).__name__)
            return _failure(CANNOT_UNDERSTAND, "dataset cannot be parsed")
        if not (study or series or ds_sop):  # a file header, then no data set (or encapsulated data cut short)
            log.warning("C-STORE from %s: SOP %s has no readable data set (or one cut short): refused",
                        calling, sop_uid)
            return _failure(CANNOT_UNDERSTAND, "dataset cannot be parsed")
        for name, value in (("Study", study), ("Series", series), ("SOP", ds_sop)):
            if not valid_uid(value):
                log.warning("C-STORE from %s: SOP %s has no valid %s Instance UID: refused", calling, sop_uid, name)
                return _failure(DATASET_DOES_NOT_MATCH_SOP_CLASS, f"missing or invalid {name} Instance UID")
        if ds_sop != sop_uid:
            log.warning("C-STORE from %s: dataset SOP UID differs from the request's: refused", calling)
            return _failure(DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOP Instance UID differs from request")
        cut = pixel_data_cut(header)
        if cut:
            log.warning("C-STORE from %s: SOP %s cannot be parsed (%s): refused", calling, sop_uid, cut)
            return _failure(CANNOT_UNDERSTAND, f"cannot be parsed: {cut}")

        key = (id(assoc), series)
        try:
            if key not in self._noted:
                # Who sent the series is needed for routing and 'sender': recorded before the ack.
                self.ledger.note_series(series, study, calling, assoc.requestor.address)
                with self._lock:
                    self._noted.add(key)
            path = self.spool.instance_path(study, series, sop_uid)
            new = not path.exists()
            if new:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, raw)
            else:
                log.info("C-STORE from %s: SOP %s already stored; kept once", calling, sop_uid)
        except OSError as exc:
            log.error("C-STORE from %s: cannot store SOP %s: %s", calling, sop_uid, exc.strerror)
            comment = "node disk full" if exc.errno == errno.ENOSPC else "node cannot write to its spool"
            return _failure(OUT_OF_RESOURCES, comment)
        except sqlite3.Error as exc:
            log.error("C-STORE from %s: cannot record SOP %s in the ledger: %s", calling, sop_uid, exc)
            return _failure(OUT_OF_RESOURCES, "node cannot write to its ledger")
        self.assembler.instance_stored(
            id(assoc), study, series, new=new, expected=_count(header), acquisition=_text(header, "AcquisitionNumber"),
        )
        return SUCCESS

    def _opened(self, event: evt.Event) -> None:
        self.assembler.association_started(id(event.assoc))

    def _closed(self, event: evt.Event) -> None:
        assoc_id = id(event.assoc)
        with self._lock:
            self._noted = {k for k in self._noted if k[0] != assoc_id}
        self.assembler.association_ended(assoc_id)


def pixel_data_cut(ds: Dataset) -> str | None:
    """How the Pixel Data of a received instance is cut short, else None. pydicom reads a
    truncated file without complaint; acknowledged, it would fail its whole series later, and the
    sender would not send it again. An image (Rows present) must have pixel data (where
    undefined-length, encapsulated data runs to the end of the file pydicom returns no elements at
    all); native data must hold Rows x Columns x samples x frames; each item of encapsulated data
    must fit. A check that cannot run (an odd but readable dataset) passes: the pipelines judge
    such files."""
    try:
        if "PixelData" not in ds:
            image = "Rows" in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds
            return "data ends inside an element, or no pixel data" if image else None
        data = ds.PixelData
        if ds.file_meta.TransferSyntaxUID.is_encapsulated:
            pos = 0
            while pos + 8 <= len(data):
                pos += 8 + struct.unpack_from("<I", data, pos + 4)[0]
            return None if pos <= len(data) else "encapsulated pixel data cut short"
        samples = int(ds.get("SamplesPerPixel") or 1)
        if samples == 3 and str(ds.get("PhotometricInterpretation", "")) == "YBR_FULL_422":
            samples = 2  # chroma subsampled horizontally: two samples a pixel on average
        expected = -(-int(ds.Rows) * int(ds.Columns) * samples * int(ds.get("NumberOfFrames") or 1)
                     * int(ds.BitsAllocated) // 8)
    except Exception:  # noqa: BLE001 - see the docstring
        return None
    return None if len(data) >= expected else f"pixel data cut short ({len(data)} of {expected} bytes)"


def _text(header: Dataset, keyword: str) -> str:
    """An attribute's value as text; "" when absent or unreadable (headers from the wild)."""
    try:
        value = header.get(keyword)
        return "" if value is None else str(value).strip()
    except Exception:
        return ""


def _count(header: Dataset) -> int | None:
    """ImagesInAcquisition when it is a positive whole number, else ``None``."""
    try:
        value = int(_text(header, "ImagesInAcquisition"))
    except ValueError:
        return None
    return value if value > 0 else None


def _host_ip(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host
