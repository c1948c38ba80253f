"""Receiving one instance, whatever carried it (C-STORE or STOW-RS): check it, spool it, tell the assembler.

An instance is answered with success only once it is on disk (temporary file, fsync, hard link
into place, directory fsync) and its series is in the ledger with its sender: an acknowledged instance is
never lost. Every refusal names its reason in the answer and in one log line (UIDs, never patient
data). The statuses are C-STORE's (PS3.4 B.2.3); STOW-RS reports them as Failure Reasons.
"""
from __future__ import annotations

import errno
import io
import itertools
import logging
import mmap
import re
import shutil
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
    JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
    JPEGLSLossless, JPEGLSNearLossless, RLELossless,
)
from pynetdicom.sop_class import _STORAGE_CLASSES

from node import inflate, metrics
from node.assembly import Assembler
from node.config import Limits
from node.instance_checks import (
    CANNOT_UNDERSTAND, DATASET_DOES_NOT_MATCH_SOP_CLASS, element_name, meta_problem, pixel_problem, structure_problem,
    value_chunks, value_problem,
)
from node.ledger import Ledger
from node.spool import Spool, fsync_dir, make_dirs, valid_uid, write_new

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
SOP_CLASS_NOT_SUPPORTED = 0x0122
DUPLICATE_SOP_INSTANCE = 0x0111  # PS3.7 C.4: another instance already has this SOP Instance UID
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122  # PS3.18 failure reason; C-STORE refuses these at negotiation

# What the node takes, in the SCP's order of preference: uncompressed first (explicit before
# implicit), then every common compressed syntax.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, RLELossless,
]
STORAGE_CLASSES = frozenset(_STORAGE_CLASSES.values())
#: Values longer than this stay in the file when a large instance is read from one (node.spill).
DEFER_BYTES = 1 << 20


@dataclass(frozen=True)
class Verdict:
    status: int
    comment: str = ""  # why, for a failure (fits LO: 64 characters)
    sop_class: str = ""  # as read from the data set, "" when unreadable
    sop_instance: str = ""
    series: str = ""  # of a stored instance
    study: str = ""

    @property
    def stored(self) -> bool:
        return self.status == SUCCESS

    @property
    def series_key(self) -> tuple[str, str]:
        """A series is (Study, Series) UID: a Series UID reused in another study is another series."""
        return self.study, self.series


class Ingest:
    """The node's one way in. A *session* (an association, a STOW-RS peer's requests) groups
    instances for the assembler: a series is not complete while a session that sent to it holds it."""

    def __init__(self, spool: Spool, ledger: Ledger, assembler: Assembler, min_free_bytes: int = 0,
                 limits: Limits = Limits()):
        self.spool = spool
        self.limits = limits  # node.limits: how far a deflated data set may inflate (node.inflate)
        self.ledger = ledger
        self.assembler = assembler
        self.min_free_bytes = min_free_bytes  # retention.min_free_bytes: below it, instances are refused
        self.defer_bytes = DEFER_BYTES
        self._noted: set[tuple[int, tuple[str, str]]] = set()  # (session, (study, series)) in the ledger
        self._writing: dict[tuple[str, str], int] = {}  # (study, series) -> stores under way
        self._lock = threading.Lock()

    def remove_series(self, study: str, series: str, remove) -> bool:
        """Run ``remove()`` (retention moving the series folder away) unless an instance of the series
        is being stored or the series is open: an acknowledged instance is never removed unrouted."""
        with self._lock:
            if self._writing.get((study, series)) or self.assembler.is_open(study, series):
                return False
            remove()
            return True

    def free_bytes(self) -> int | None:
        """Free space on the spool's file system; None when it cannot be read (the folder gone)."""
        try:
            return shutil.disk_usage(self.spool.root).free
        except OSError:
            return None

    def short_of_space(self) -> str | None:
        """Why the spool takes no more instances (free space under ``min_free_bytes``), else None."""
        if not self.min_free_bytes:
            return None
        free = self.free_bytes()
        if free is None:
            return "node spool unreadable: its free space cannot be read"
        if free >= self.min_free_bytes:
            return None
        return f"node disk nearly full: {free} bytes free in the spool, under retention.min_free_bytes"

    def session_started(self, session: int) -> None:
        self.assembler.association_started(session)

    def session_released(self, session: int, series_keys) -> None:
        """The open ``session`` no longer holds these (study, series) open (:class:`node.http.stow.PeerSessions`)."""
        with self._lock:
            self._noted -= {(session, key) for key in series_keys}  # a long-lived session stays small
        self.assembler.release(session, series_keys)

    def session_ended(self, session: int) -> None:
        with self._lock:
            self._noted = {k for k in self._noted if k[0] != session}
        self.assembler.association_ended(session)

    def store(self, raw: bytes | Path, session: int, sender: str, host: str, via: str,
              expected_sop: str | None = None, expected_study: str | None = None,
              negotiated: bool = True, expected_sop_class: str | None = None) -> Verdict:
        """Check and spool one Part 10 file (``raw``, file meta included) from ``sender``.

        ``raw`` is the bytes, or for a large instance (node.spill) a file in the spool's
        ``incoming/`` folder: read with its large values left in the file (:attr:`defer_bytes`;
        the checks read the pixel data's extent there), linked into place when stored. The caller
        removes that file afterwards.

        ``via`` starts each log line ("C-STORE from X"). ``expected_sop`` / ``expected_sop_class``:
        the request's SOP Instance / Class UIDs, which the data set must repeat (C-STORE); else the
        file meta's Media Storage UIDs must match (STOW-RS). ``expected_study``: the study a STOW-RS
        request was addressed to. ``negotiated``: the transport already agreed on the SOP class and
        transfer syntax (C-STORE); else they are checked here (STOW-RS). The checks
        (:mod:`node.instance_checks`) run on this one parse. A deflated data set is inflated first,
        within ``node.limits`` (:mod:`node.inflate`).
        """
        try:
            inflated = inflate.bounded(raw, self.spool.incoming_dir, self.limits.spill_dataset_bytes,
                                       self.limits.max_dataset_bytes, self.short_of_space)
        except (inflate.TooLarge, inflate.Broken, OSError) as exc:
            return self._not_inflated(exc, via, expected_sop)
        try:
            return self._store_checked(inflated, session, sender, host, via, expected_sop, expected_study, negotiated,
                                       expected_sop_class)
        finally:
            if inflated is not raw:
                inflated.unlink(missing_ok=True)

    @staticmethod
    def _not_inflated(exc: Exception, via: str, expected_sop: str | None) -> Verdict:
        named = uid_shown(expected_sop or "")
        if isinstance(exc, inflate.Broken):
            log.warning("%s: SOP %s refused (0x%04X): cannot be parsed (its deflate stream: %s)", via, named,
                        CANNOT_UNDERSTAND, repr(str(exc))[1:-1][:120])  # escaped: no peer text raw in the log
            metrics.INSTANCES_REFUSED.labels(metrics.CANNOT_PARSE).inc()
            return Verdict(CANNOT_UNDERSTAND, "dataset cannot be parsed (deflate stream)", sop_instance=expected_sop or "")
        if isinstance(exc, inflate.TooLarge):
            log.warning("%s: SOP %s refused (0x%04X): %s", via, named, OUT_OF_RESOURCES, exc)
            metrics.INSTANCES_REFUSED.labels(metrics.TOO_LARGE).inc()
            return Verdict(OUT_OF_RESOURCES, "data set too large for the node", sop_instance=expected_sop or "")
        log.error("%s: cannot inflate SOP %s to the spool: %s", via, named, exc.strerror)
        full = exc.errno == errno.ENOSPC
        metrics.INSTANCES_REFUSED.labels(metrics.DISK_FULL if full else metrics.SPOOL_ERROR).inc()
        return Verdict(OUT_OF_RESOURCES, "node disk full" if full else "node cannot write to its spool",
                       sop_instance=expected_sop or "")

    def _store_checked(self, raw: bytes | Path, session: int, sender: str, host: str, via: str,
                       expected_sop: str | None, expected_study: str | None, negotiated: bool,
                       expected_sop_class: str | None) -> Verdict:
        try:
            # meta_problem before pydicom reads the stray element as file meta
            if isinstance(raw, Path):
                with open(raw, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as head:
                    problem = meta_problem(head)
                ds = dcmread(raw, defer_size=self.defer_bytes)
            else:
                problem = meta_problem(raw)
                ds = dcmread(io.BytesIO(raw))  # whole, once: the pixel data is checked too
            problem = problem or structure_problem(ds)  # before any value is converted
            study = str(ds.get("StudyInstanceUID", "")).strip()
            series = str(ds.get("SeriesInstanceUID", "")).strip()
            sop = str(ds.get("SOPInstanceUID", "")).strip()
            sop_class = str(ds.get("SOPClassUID", "")).strip()
        except Exception as exc:  # pydicom raises many types on garbage (zlib.error, struct.error, ...)
            named = uid_shown(expected_sop or "")
            where = _element_in(str(exc))
            log.warning("%s: SOP %s refused (0xC000): cannot be parsed (%s%s)", via, named, type(exc).__name__,
                        f" at {where}" if where else "")
            metrics.INSTANCES_REFUSED.labels(metrics.CANNOT_PARSE).inc()
            return Verdict(CANNOT_UNDERSTAND, "dataset cannot be parsed" + (f" at {where}" if where else ""),
                           sop_instance=expected_sop or "")
        named = next((u for u in (expected_sop, sop) if valid_uid(u)), uid_shown(""))
        sop_class = sop_class if valid_uid(sop_class) else ""

        def refuse(status: int, comment: str, why: str) -> Verdict:
            log.warning("%s: SOP %s refused (0x%04X): %s", via, named, status, why)
            metrics.INSTANCES_REFUSED.labels(_REFUSED.get(status, metrics.CANNOT_PARSE)).inc()
            return Verdict(status, comment, sop_class, sop if valid_uid(sop) else "")

        if problem:
            return refuse(problem.status, problem.comment, f"{problem.element} {problem.why}")
        if not (study or series or sop):  # a file header, then no data set (or encapsulated data cut short)
            return refuse(CANNOT_UNDERSTAND, "dataset cannot be parsed", "has no readable data set (or one cut short)")
        for name, value in (("Study", study), ("Series", series), ("SOP", sop)):
            if not valid_uid(value):
                return refuse(DATASET_DOES_NOT_MATCH_SOP_CLASS, f"missing or invalid {name} Instance UID",
                              f"has no valid {name} Instance UID")
        meta = ds.file_meta
        wanted_sop = expected_sop if expected_sop is not None else str(meta.get("MediaStorageSOPInstanceUID", sop))
        wanted_class = (expected_sop_class if expected_sop_class is not None
                        else str(meta.get("MediaStorageSOPClassUID", sop_class)))
        if sop != wanted_sop.strip("\0 "):
            return refuse(DATASET_DOES_NOT_MATCH_SOP_CLASS, "(0008,0018) SOPInstanceUID differs from the request",
                          "(0008,0018) SOPInstanceUID differs from the request's (or the file meta's)")
        if not sop_class:
            return refuse(DATASET_DOES_NOT_MATCH_SOP_CLASS, "(0008,0016) SOPClassUID is missing or invalid",
                          "(0008,0016) SOPClassUID is missing or not a valid UID")
        if sop_class != wanted_class.strip("\0 "):
            return refuse(DATASET_DOES_NOT_MATCH_SOP_CLASS, "(0008,0016) SOPClassUID differs from the request",
                          f"(0008,0016) SOPClassUID {sop_class} differs from the request's (or the file meta's)")
        if expected_study is not None and study != expected_study:
            return refuse(DATASET_DOES_NOT_MATCH_SOP_CLASS, "not in the study the request names",
                          f"belongs to study {study}, not to the study {expected_study} the request names")
        if not negotiated:
            syntax = str(meta.get("TransferSyntaxUID", ""))
            if sop_class not in STORAGE_CLASSES:
                return refuse(SOP_CLASS_NOT_SUPPORTED, "SOP class not supported",
                              f"has SOP class {uid_shown(sop_class)}, not a storage class the node takes")
            if syntax not in TRANSFER_SYNTAXES:
                return refuse(TRANSFER_SYNTAX_NOT_SUPPORTED, "transfer syntax not supported",
                              f"is in transfer syntax {uid_shown(syntax)}, which the node does not take")
        problem = value_problem(ds) or pixel_problem(ds)
        if problem:
            return refuse(problem.status, problem.comment, f"{problem.element} {problem.why}")

        short = self.short_of_space()  # before the disk is full: the ledger and the jobs need room too
        if short:
            log.error("%s: SOP %s refused: %s", via, named, short)
            metrics.INSTANCES_REFUSED.labels(metrics.DISK_FULL).inc()
            return Verdict(OUT_OF_RESOURCES, "node disk nearly full", sop_class, sop)
        key = (session, (study, series))
        with self._lock:
            self._writing[key[1]] = self._writing.get(key[1], 0) + 1
        try:
            verdict = self._store(raw, ds, key, sender, host, via, sop, sop_class)
            if verdict.stored:
                metrics.INSTANCES_RECEIVED.labels("dimse" if negotiated else "stow").inc()
            return verdict
        finally:
            with self._lock:
                self._writing[key[1]] -= 1
                if not self._writing[key[1]]:
                    del self._writing[key[1]]

    def _store(self, raw: bytes | Path, ds: Dataset, key, sender: str, host: str, via: str, sop: str,
               sop_class: str) -> Verdict:
        session, (study, series) = key
        try:
            if key not in self._noted:
                # Who sent the series is needed for routing and 'sender': recorded before the ack.
                self.ledger.note_series(series, study, sender, host)
                with self._lock:
                    self._noted.add(key)
            path = self.spool.instance_path(study, series, sop)
            new = not path.exists()
            if new:
                make_dirs(path.parent)
                new = write_new(path, raw)  # False: another sender stored it a moment ago
            else:
                fsync_dir(path.parent)  # its first writer may not have made it durable yet
            if not new:
                if not same_instance(path, ds):
                    log.warning("%s: SOP %s refused (0x%04X): (0008,0018) SOPInstanceUID is already stored with "
                                "other content: kept the first", via, sop, DUPLICATE_SOP_INSTANCE)
                    metrics.INSTANCES_REFUSED.labels(_REFUSED[DUPLICATE_SOP_INSTANCE]).inc()
                    return Verdict(DUPLICATE_SOP_INSTANCE, "(0008,0018) SOPInstanceUID already stored, other content",
                                   sop_class, sop)
                log.info("%s: SOP %s already stored; kept once", via, sop)
        except OSError as exc:
            log.error("%s: cannot store SOP %s: %s", via, sop, exc.strerror)
            full = exc.errno == errno.ENOSPC
            metrics.INSTANCES_REFUSED.labels(metrics.DISK_FULL if full else metrics.SPOOL_ERROR).inc()
            comment = "node disk full" if full else "node cannot write to its spool"
            return Verdict(OUT_OF_RESOURCES, comment, sop_class, sop)
        except sqlite3.Error as exc:
            log.error("%s: cannot record SOP %s in the ledger: %s", via, sop, exc)
            metrics.INSTANCES_REFUSED.labels(metrics.LEDGER_ERROR).inc()
            return Verdict(OUT_OF_RESOURCES, "node cannot write to its ledger", sop_class, sop)
        self.assembler.instance_stored(session, study, series, new=new, expected=_count(ds), sop=sop,
                                       acquisition=_text(ds, "AcquisitionNumber"))
        return Verdict(SUCCESS, "", sop_class, sop, series, study)


_REFUSED = {CANNOT_UNDERSTAND: metrics.CANNOT_PARSE, DATASET_DOES_NOT_MATCH_SOP_CLASS: metrics.BAD_UIDS,
            SOP_CLASS_NOT_SUPPORTED: metrics.SOP_CLASS, TRANSFER_SYNTAX_NOT_SUPPORTED: metrics.TRANSFER_SYNTAX,
            DUPLICATE_SOP_INSTANCE: metrics.BAD_UIDS}


def uid_shown(value: str) -> str:
    """A UID from a sender's data set as a log line may show it: only if it is a valid UID (else it
    could carry anything: patient data, a forged log line)."""
    return value if valid_uid(value) else "(no valid UID)"


_TAG_IN_TEXT = re.compile(r"\(\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)")


def _element_in(message: str) -> str:
    """The element a pydicom parse error names (its message otherwise may quote the sender's bytes)."""
    match = _TAG_IN_TEXT.search(message)
    return element_name(int(match.group(1) + match.group(2), 16)) if match else ""


def same_instance(stored: Path, received: Dataset) -> bool:
    """Whether ``received`` repeats the stored instance: the same pixel data (a sender re-encoding
    it may change padding, group lengths, even header text; a different image under the same SOP
    Instance UID is what must not be acknowledged and dropped). One in another transfer syntax
    cannot be compared byte for byte and counts as the same (a PACS that re-sends compressed).
    Large values are compared piece by piece from the files (never whole in memory)."""
    try:
        first = dcmread(stored, defer_size=DEFER_BYTES)
        if first.file_meta.get("TransferSyntaxUID") != received.file_meta.get("TransferSyntaxUID"):
            return True
        pixels = (0x7FE00010, 0x7FE00008, 0x7FE00009)
        return all(_same_value(first, received, tag) for tag in pixels)
    except Exception:  # noqa: BLE001 - what the spool holds was checked when it came in
        return False


def _same_value(a: Dataset, b: Dataset, tag: int) -> bool:
    if (tag in a._dict) != (tag in b._dict):
        return False
    if tag not in a._dict:
        return True
    for x, y in itertools.zip_longest(value_chunks(a, tag), value_chunks(b, tag)):
        if x is None or y is None or x != y:
            return False
    return True


def _text(ds: Dataset, keyword: str) -> str:
    """An attribute's value as text; "" when absent or unreadable (headers from the wild)."""
    try:
        value = ds.get(keyword)
        return "" if value is None else str(value).strip()
    except Exception:
        return ""


def _count(ds: Dataset) -> int | None:
    """How many instances the series is expected to have: 1 for a multi-frame image (one Enhanced
    CT/MR instance is typically the whole series: complete when its association ends, unless more
    arrive in it), else ImagesInAcquisition when it is a positive whole number, else ``None``."""
    try:
        if int(_text(ds, "NumberOfFrames") or 1) > 1:
            return 1
    except ValueError:
        pass
    try:
        value = int(_text(ds, "ImagesInAcquisition"))
    except ValueError:
        return None
    return value if value > 0 else None
