"""Deflated data sets inflated within the node's limits: a deflate bomb cannot fill its memory.

pydicom inflates a Deflated Explicit VR Little Endian data set (PS3.5 A.5) whole, in memory, and
deflate packs up to ~1000:1: a 1 MB instance of zeros held 2 GB of a reader's memory (measured).
:func:`bounded` inflates such an instance a piece at a time before anything parses it. One that
inflates to more than ``node.limits.max_dataset_bytes`` is refused (:class:`TooLarge`, 0xA700), as
the same data set sent uncompressed would be; one past ``node.limits.spill_dataset_bytes`` is
written inflated (Explicit VR Little Endian, the same file meta otherwise) to a ``.tmp-*`` file in
the spool's ``incoming/`` folder and checked and stored from there like any large instance
(:mod:`node.spill`); a small one stays as it came. A stream that is not deflate is left to the parse,
which refuses it; one that breaks off after ``spill_bytes`` is refused here (:class:`Broken`), as
pydicom would refuse it after inflating all of it. Whether an instance is deflated, and where its
stream starts, is read with ``dcmread``'s own functions (not from the group length, which a sender
may set to anything): what is inflated here is what ``dcmread`` would inflate. Below
``retention.min_free_bytes`` no inflated file is started (0xA700, as :mod:`node.spill`).
"""
from __future__ import annotations

import errno
import io
import zlib
from pathlib import Path
from typing import BinaryIO, Callable

from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_command_set_elements, _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_16, EXPLICIT_VR_LENGTH_32

from node.spill import new_file

CHUNK = 1 << 20
META_PEEK = 4096
RECHECK_BYTES = 64 << 20  # an inflated file checks retention.min_free_bytes again every 64 MiB
DEFLATED_UID = DeflatedExplicitVRLittleEndian.encode("ascii")


class Broken(Exception):
    """A large deflated data set whose stream is not deflate or breaks off."""


class TooLarge(Exception):
    """The data set inflates past the limit."""

    def __init__(self, limit: int):
        super().__init__(f"the deflated data set inflates past {limit} bytes (node.limits.max_dataset_bytes)")
        self.limit = limit


SHORT_VRS = frozenset(vr.encode("ascii") for vr in EXPLICIT_VR_LENGTH_16)
LONG_VRS = frozenset(vr.encode("ascii") for vr in EXPLICIT_VR_LENGTH_32)


def _may_be_deflated(head: bytes) -> bool:
    """False only when the file meta, walked as ``dcmread`` reads it (Explicit VR Little Endian
    elements up to the first tag of another group than 0002, whatever the group length says), ends
    within ``head`` and none of its bytes name the deflated syntax: no parse for every other
    instance. Anything else (a group length that lies, an odd VR, a long meta) is looked at properly."""
    if head[128:132] != b"DICM":
        return True
    pos = 132
    while head[pos:pos + 2] == b"\x02\x00":
        vr = head[pos + 4:pos + 6]
        if vr in SHORT_VRS and pos + 8 <= len(head):
            pos += 8 + int.from_bytes(head[pos + 6:pos + 8], "little")
        elif vr in LONG_VRS and pos + 12 <= len(head):
            length = int.from_bytes(head[pos + 8:pos + 12], "little")
            if length == 0xFFFFFFFF:
                return True
            pos += 12 + length
        else:
            return True
    if pos + 8 > len(head):
        return True  # the meta may go on past the head (or the file ends in it)
    return DEFLATED_UID in head[132:pos]


def _meta(fp: BinaryIO) -> tuple[FileMetaDataset, bytes] | None:
    """The file meta as ``dcmread`` reads it (its own functions: the Implicit VR retry, a group
    length that lies) and the bytes of any group 0000 elements after it (``dcmread`` reads them
    before the data set), ``fp`` left where ``dcmread`` starts the data set; None where ``dcmread``
    fails on it (the parse answers that)."""
    try:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        meta_end = fp.tell()
        _read_command_set_elements(fp)
        str(meta.get("TransferSyntaxUID", ""))
    except Exception:
        return None
    start = fp.tell()
    fp.seek(meta_end)
    return meta, fp.read(start - meta_end)


def _header(meta: FileMetaDataset) -> bytes:
    meta = FileMetaDataset(meta)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_file_meta_info(out, meta, enforce_standard=False)  # the sender's elements, the group length recomputed
    return b"\0" * 128 + b"DICM" + out.getvalue()


def bounded(raw: bytes | Path, folder: Path, spill_bytes: int, max_bytes: int,
            short_of_space: Callable[[], str | None] | None = None) -> bytes | Path:
    """``raw`` itself, unless it is deflated and inflates past ``spill_bytes``: then a new file in
    ``folder`` holding it inflated (the caller removes it). :class:`TooLarge` past ``max_bytes``;
    ``OSError(ENOSPC)`` when ``short_of_space()`` says why the file may not be started (as
    :mod:`node.spill`: a few MB of deflate must not put GBs on a nearly full disk)."""
    with (open(raw, "rb") if isinstance(raw, Path) else io.BytesIO(raw)) as fp:
        if not _may_be_deflated(fp.read(META_PEEK)):
            return raw
        fp.seek(0)
        found = _meta(fp)
        if found is None or str(found[0].get("TransferSyntaxUID", "")) != DeflatedExplicitVRLittleEndian:
            return raw
        meta, command_set = found
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        held, out, total = bytearray(), None, 0
        try:
            while not inflater.eof:
                chunk = inflater.unconsumed_tail or fp.read(CHUNK)
                # No input left: zlib may still hold output of input it has taken (a match cut by the
                # piece's end, the end-of-block code): ask for it before calling the stream cut short.
                piece = inflater.decompress(chunk, CHUNK)
                if not chunk and not piece and not inflater.eof:
                    raise zlib.error("the deflate stream breaks off")
                total += len(piece)
                if total > max_bytes:
                    raise TooLarge(max_bytes)
                if out is not None:
                    out.write(piece)
                    if total % RECHECK_BYTES < len(piece) and short_of_space is not None:
                        short = short_of_space()  # the disk may fill while this one grows
                        if short:
                            raise OSError(errno.ENOSPC, short)
                    continue
                held += piece
                if len(held) > spill_bytes:
                    short = short_of_space() if short_of_space is not None else None
                    if short:
                        raise OSError(errno.ENOSPC, short)
                    out = new_file(folder)
                    try:
                        out.write(_header(meta) + command_set)  # group 0000 elements: the parse answers them
                    except Exception as exc:  # a meta pydicom reads but cannot write back
                        raise Broken(f"its file meta cannot be rewritten ({type(exc).__name__})") from None
                    out.write(held)
                    held = bytearray()
            if out is not None:
                out.close()  # may raise (the last piece buffered, the disk full): the file goes below
        except BaseException as exc:
            if out is not None:
                try:
                    out.close()
                except OSError:
                    pass
                Path(out.name).unlink(missing_ok=True)
            if not isinstance(exc, zlib.error):
                raise
            if out is None:
                return raw  # small: the parse refuses it as it always did
            raise Broken(str(exc)) from None
    if out is None:
        return raw
    return Path(out.name)
