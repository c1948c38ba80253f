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
pydicom would refuse it after inflating all of it.
"""
from __future__ import annotations

import io
import zlib
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from node.spill import new_file

CHUNK = 1 << 20
META_PEEK = 4096
DEFLATED_UID = DeflatedExplicitVRLittleEndian.encode("ascii")


class Broken(Exception):
    """A large deflated data set whose stream is not deflate or breaks off."""


class TooLarge(Exception):
    """The data set inflates past the limit."""

    def __init__(self, limit: int):
        super().__init__(f"the deflated data set inflates past {limit} bytes (node.limits.max_dataset_bytes)")
        self.limit = limit


def _may_be_deflated(head: bytes) -> bool:
    """False when the file meta (its length given by its group length element, as writers put it)
    does not name the deflated syntax: no parse for every other instance (~0.08 ms each)."""
    if head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
        return True  # no group length to go by: look properly
    end = 144 + int.from_bytes(head[140:144], "little")
    if end > len(head):
        return True
    return DEFLATED_UID in head[144:end]


def _meta(fp: BinaryIO) -> FileMetaDataset | None:
    """The file meta of a Part 10 stream, ``fp`` left at the data set; None when it has none."""
    head = fp.read(132)
    if len(head) < 132 or head[128:] != b"DICM":
        return None
    try:
        meta = read_dataset(fp, False, True, stop_when=lambda tag, vr, length: tag.group != 2)
    except Exception:  # a broken header: the parse answers it
        return None
    return FileMetaDataset(meta)


def _header(meta: FileMetaDataset) -> bytes:
    meta = FileMetaDataset(meta)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_file_meta_info(out, meta)  # the group length recomputed
    return b"\0" * 128 + b"DICM" + out.getvalue()


def bounded(raw: bytes | Path, folder: Path, spill_bytes: int, max_bytes: int) -> bytes | Path:
    """``raw`` itself, unless it is deflated and inflates past ``spill_bytes``: then a new file in
    ``folder`` holding it inflated (the caller removes it). :class:`TooLarge` past ``max_bytes``."""
    with (open(raw, "rb") if isinstance(raw, Path) else io.BytesIO(raw)) as fp:
        if not _may_be_deflated(fp.read(META_PEEK)):
            return raw
        fp.seek(0)
        meta = _meta(fp)
        if meta is None or str(meta.get("TransferSyntaxUID", "")) != DeflatedExplicitVRLittleEndian:
            return raw
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        held, out, total = bytearray(), None, 0
        try:
            while not inflater.eof:
                chunk = inflater.unconsumed_tail or fp.read(CHUNK)
                if not chunk:
                    raise zlib.error("the deflate stream breaks off")
                piece = inflater.decompress(chunk, CHUNK)
                total += len(piece)
                if total > max_bytes:
                    raise TooLarge(max_bytes)
                if out is not None:
                    out.write(piece)
                    continue
                held += piece
                if len(held) > spill_bytes:
                    out = new_file(folder)
                    out.write(_header(meta))
                    out.write(held)
                    held = bytearray()
        except BaseException as exc:
            if out is not None:
                out.close()
                Path(out.name).unlink(missing_ok=True)
            if not isinstance(exc, zlib.error):
                raise
            if out is None:
                return raw  # small: the parse refuses it as it always did
            raise Broken(str(exc)) from None
    if out is None:
        return raw
    out.close()
    return Path(out.name)
