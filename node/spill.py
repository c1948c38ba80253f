"""Large incoming instances go to a file, not to memory (issue 21).

pynetdicom gathers a C-STORE's data set in a ``BytesIO`` until its last P-DATA fragment, and the
ingest then held it twice more (the Part 10 copy, the parsed pixel data): ~3x a data set, per
association. Here a data set whose fragments pass ``node.limits.spill_dataset_bytes`` is moved,
with its file meta, to a ``.tmp-*`` file in the spool's ``incoming/`` folder, and its later
fragments are appended there (pynetdicom's own chunked-dataset path: ``_data_set_file``, which it
closes and removes after the C-STORE handler). :mod:`node.ingest` checks such a file without
loading its pixel data and links it into the series folder (same file system: no copy). Small
instances (below the threshold: every CT/MR slice) stay in memory exactly as before. When the file
cannot be written (disk full, folder not writable) the rest of that data set is dropped as it
arrives (:class:`Dropped`) and the C-STORE is answered 0xA700: a large data set is never held in memory.

STOW-RS parts over the same size are copied from the buffered body into the same folder
(:func:`part_to_file`) and take the same path.
"""
from __future__ import annotations

import errno
import logging
import struct
import tempfile
from io import BytesIO
from pathlib import Path

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.pdu_primitives import P_DATA

from node import store_response

log = logging.getLogger(__name__)

PREFIX = ".tmp-"  # as the spool's other partial writes: removed at start (remove_leftovers)
COPY_CHUNK = 1 << 20


def _explicit_le(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2s2xI", group, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def file_meta(sop_class: str, sop_instance: str, syntax: str) -> bytes:
    """Preamble, ``DICM`` and the file meta pynetdicom writes for a received C-STORE
    (``pynetdicom.dsutils.create_file_meta``: version, media storage SOP class/instance from the
    request, the context's transfer syntax, pynetdicom's implementation UID and version), byte for
    byte, without pydicom's file writer (~0.45 ms per instance for these seven elements). Anything
    unusual (a UID that is not ASCII) goes pynetdicom's way."""
    try:
        body = b"".join((
            _explicit_le(2, 0x0001, b"OB", b"\x00\x01"),
            _explicit_le(2, 0x0002, b"UI", _padded(str(sop_class), b"\0")),
            _explicit_le(2, 0x0003, b"UI", _padded(str(sop_instance), b"\0")),
            _explicit_le(2, 0x0010, b"UI", _padded(str(syntax), b"\0")),
            _explicit_le(2, 0x0012, b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\0")),
            _explicit_le(2, 0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
        ))
    except (UnicodeEncodeError, struct.error):
        meta = create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax)
        return b"\0" * 128 + b"DICM" + encode_file_meta(meta)
    return b"".join((b"\0" * 128, b"DICM", _explicit_le(2, 0x0000, b"UL", struct.pack("<I", len(body))), body))


class Dropped(BytesIO):
    """The data set of a C-STORE that could not be spilled: its fragments go nowhere."""

    def __init__(self, why: str, disk_full: bool):
        super().__init__()
        self.why = why
        self.disk_full = disk_full

    def write(self, data) -> int:
        return len(data)


def new_file(folder: Path):
    """An open ``.tmp-*.dcm`` file in ``folder`` (the caller removes it)."""
    return tempfile.NamedTemporaryFile(dir=folder, prefix=PREFIX, suffix=".dcm", delete=False)


class SpillingDIMSE(DIMSEServiceProvider):
    """The DIMSE provider of an accepted association: a C-STORE data set past :attr:`spill_bytes`
    continues in a file in :attr:`folder` (see the module), and a C-STORE response's command set is
    encoded by :mod:`node.store_response`. Set on a not yet started association by :func:`enable`."""

    spill_bytes: int = 0
    folder: Path | None = None
    short_of_space = None  # () -> why the spool takes no more (retention.min_free_bytes), or None

    def receive_primitive(self, primitive) -> None:
        msg = self.message
        if (msg is not None and msg._data_set_file is None and isinstance(msg, C_STORE_RQ)
                and msg.data_set is not None and msg.data_set.tell() >= self.spill_bytes):
            self._spill(msg)
        super().receive_primitive(primitive)

    def send_msg(self, primitive, context_id: int) -> None:
        encoded = store_response.encode(primitive) if isinstance(primitive, C_STORE) else None
        limit = self.maximum_pdu_size
        if encoded is None or (limit and len(encoded) > limit - 6) or self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()  # the whole command set in one last fragment (bits 11), as pynetdicom sends it
        pdata.presentation_data_value_list.append((context_id, b"\x03" + encoded))
        self.dul.send_pdu(pdata)

    def _spill(self, msg: C_STORE_RQ) -> None:
        cs = msg.command_set
        out = None
        try:
            short = self.short_of_space() if self.short_of_space is not None else None
            if short:  # before the file grows: the ledger and the jobs need the room
                raise OSError(errno.ENOSPC, short)
            syntax = self.assoc._accepted_cx[msg.context_id].transfer_syntax[0]
            out = new_file(self.folder)
            out.write(file_meta(cs.AffectedSOPClassUID, cs.AffectedSOPInstanceUID, syntax))
            out.write(msg.data_set.getbuffer())
            out.flush()
        except (KeyError, OSError) as exc:
            if out is not None:
                try:
                    out.close()  # flushes what is buffered: fails again on a full disk
                except OSError:
                    pass
                Path(out.name).unlink(missing_ok=True)
            why = getattr(exc, "strerror", None) or str(exc)
            # node.scp logs the refusal (one line, with the SOP and the sender) when the data set is complete
            log.debug("cannot move a large incoming data set to %s (%s): the rest of it is dropped", self.folder, why)
            msg.data_set = Dropped(why, getattr(exc, "errno", None) == errno.ENOSPC)
            return
        msg._data_set_file = out  # decode_msg appends the next fragments there
        msg._data_set_path = Path(out.name)
        msg.data_set = BytesIO()


def enable(assoc, spill_bytes: int, folder: Path, short_of_space=None) -> None:
    """Spill this (not yet started) association's large C-STORE data sets to ``folder``, unless
    ``short_of_space()`` says why not (then they are dropped and answered 0xA700)."""
    assoc.dimse.__class__ = SpillingDIMSE
    assoc.dimse.spill_bytes = spill_bytes
    assoc.dimse.folder = folder
    assoc.dimse.short_of_space = short_of_space


def drop_partial(dimse: DIMSEServiceProvider) -> None:
    """Close and remove the file of a data set cut off mid-message (an abort)."""
    msg = dimse.message
    out = getattr(msg, "_data_set_file", None)
    if out is not None:
        try:
            out.close()  # a fragment still buffered on a full disk fails again here
        except OSError:
            pass
        Path(out.name).unlink(missing_ok=True)  # the association's end (its slot) must still follow


def part_to_file(data, start: int, end: int, folder: Path) -> Path:
    """``data[start:end]`` (a STOW-RS part in the buffered body's mmap) copied to a ``.tmp-*``
    file in ``folder``, a piece at a time."""
    with new_file(folder) as out:
        try:
            for pos in range(start, end, COPY_CHUNK):
                out.write(data[pos:min(pos + COPY_CHUNK, end)])
        except BaseException:
            Path(out.name).unlink(missing_ok=True)
            raise
    return Path(out.name)


def remove_leftovers(folder: Path) -> int:
    """Remove the files of data sets a crash cut off (none was acknowledged); run at start."""
    stale = list(Path(folder).glob(f"{PREFIX}*")) if Path(folder).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)
