"""A deflated data set is inflated within node.limits: a deflate bomb is refused without filling memory."""
from __future__ import annotations

import io
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from node import inflate
from tests import series_factory as make
from tests.peers import dcmsend, wait_for

SPILL = 1 << 20
LIMIT = 8 << 20


def deflated(source: Path, out: Path, extra_zeros: int = 0) -> Path:
    """``source`` written in Deflated Explicit VR Little Endian, with a private OB element of
    ``extra_zeros`` zero bytes at its end, streamed through the compressor (never held whole)."""
    ds = dcmread(source)
    if 0xFFFCFFFC in ds:
        del ds[0xFFFCFFFC]  # Data Set Trailing Padding: the private block below goes last
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    body = io.BytesIO()
    ds.save_as(body, enforce_file_format=True)
    raw = body.getvalue()
    start = 144 + int.from_bytes(raw[140:144], "little")
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with open(out, "wb") as fh:
        fh.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fh, ds.file_meta)
        fh.write(packer.compress(raw[start:]))
        if extra_zeros:  # after (7FE0,0010): a private group 7FE1 creator and block
            fh.write(packer.compress(b"\xe1\x7f\x10\x00LO\x06\x00SRNODE"))
            fh.write(packer.compress(b"\xe1\x7f\x10\x10OB\x00\x00" + extra_zeros.to_bytes(4, "little")))
            chunk = bytes(1 << 20)
            for left in range(extra_zeros, 0, -len(chunk)):
                fh.write(packer.compress(chunk[:min(left, len(chunk))]))
        fh.write(packer.flush())
    return out


def test_a_small_deflated_instance_is_left_as_it_came(tmp_path):
    path = deflated(make.ct_small(tmp_path / "ct", "inflate-small")[0], tmp_path / "small.dcm")
    raw = path.read_bytes()
    assert inflate.bounded(raw, tmp_path, SPILL, LIMIT) is raw
    assert inflate.bounded(path, tmp_path, SPILL, LIMIT) == path


def test_a_large_one_is_inflated_to_a_file_with_the_same_data_set(tmp_path):
    source = make.ct_small(tmp_path / "ct", "inflate-large")[0]
    path = deflated(source, tmp_path / "large.dcm", extra_zeros=3 << 20)
    for raw in (path.read_bytes(), path):
        out = inflate.bounded(raw, tmp_path, SPILL, LIMIT)
        assert isinstance(out, Path) and out.parent == tmp_path and out.name.startswith(".tmp-")
        got, want = dcmread(out), dcmread(path)
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert got.file_meta.MediaStorageSOPInstanceUID == want.file_meta.MediaStorageSOPInstanceUID
        assert [e.tag for e in got] == [e.tag for e in want] and got == want
        assert np.array_equal(got.pixel_array, dcmread(source).pixel_array)
        out.unlink()


def test_a_deflate_bomb_is_refused_holding_little_memory(tmp_path):
    bomb = deflated(make.ct_small(tmp_path / "ct", "inflate-bomb")[0], tmp_path / "bomb.dcm", extra_zeros=1 << 30)
    assert bomb.stat().st_size < 2 << 20  # 1 GiB of zeros in about 1 MB
    raw = bomb.read_bytes()
    tracemalloc.start()
    try:
        with pytest.raises(inflate.TooLarge, match="max_dataset_bytes"):
            inflate.bounded(raw, tmp_path, SPILL, LIMIT)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # the held part and a few pieces of 1 MiB; pydicom alone held 2 GB for it
    assert not list(tmp_path.glob(".tmp-*"))  # the partial file went


def test_a_large_stream_that_breaks_off_is_refused(tmp_path):
    path = deflated(make.ct_small(tmp_path / "ct", "inflate-cut")[0], tmp_path / "cut.dcm", extra_zeros=3 << 20)
    raw = path.read_bytes()
    with pytest.raises(inflate.Broken):
        inflate.bounded(raw[:-200], tmp_path, 64 << 10, LIMIT)
    assert not list(tmp_path.glob(".tmp-*"))
    assert inflate.bounded(raw[:-200], tmp_path, SPILL * 16, LIMIT) == raw[:-200]  # small: the parse refuses it


def test_through_the_node_a_bomb_gets_a700_and_a_large_deflated_instance_is_stored(make_node, tmp_path):
    node = make_node(routes=[], destinations={}, peers=[{"ae_title": "DCMSEND"}],
                     limits={"spill_dataset_bytes": SPILL, "max_dataset_bytes": LIMIT})
    source = make.ct_small(tmp_path / "ct", "inflate-node")[0]
    bomb_source = make.ct_small(tmp_path / "ct2", "inflate-node-bomb")[0]
    for folder in ("send", "bomb"):
        (tmp_path / folder).mkdir()
    large = deflated(source, tmp_path / "send" / "large.dcm", extra_zeros=3 << 20)
    bomb = deflated(bomb_source, tmp_path / "bomb" / "bomb.dcm", extra_zeros=256 << 20)
    dcmsend(bomb, node.port, extra=("-dn",), check=False)  # as it is: deflated
    wait_for(lambda: "refused (0xA700): the deflated data set inflates past" in node.log(), 10, what="bomb refused")
    dcmsend(large, node.port, extra=("-dn",))
    sop = str(dcmread(source).SOPInstanceUID)
    wait_for(lambda: list(node.spool.glob(f"series/*/*/{sop}.dcm")), 10, what="large deflated instance stored")
    [stored] = node.spool.glob(f"series/*/*/{sop}.dcm")
    assert dcmread(stored) == dcmread(large)
    assert not list(node.spool.glob(f"series/*/*/{dcmread(bomb_source).SOPInstanceUID}.dcm"))
    assert not list((node.spool / "incoming").glob(".tmp-*"))
    assert "Traceback" not in node.log()
