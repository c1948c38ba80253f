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
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from node import inflate, spill
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


def _ingest(root: Path):
    from node.assembly import Assembler
    from node.config import Limits
    from node.ingest import Ingest
    from node.ledger import Ledger
    from node.spool import Spool
    spool = Spool(root).ensure()
    ledger = Ledger(spool.ledger_path)
    limits = Limits(spill_dataset_bytes=SPILL, max_dataset_bytes=LIMIT)
    return Ingest(spool, ledger, Assembler(spool, ledger, 60), 0, limits)


def _too_large() -> float:
    from node import metrics
    return metrics.REGISTRY.get_sample_value("srnode_instances_refused_total", {"reason": metrics.TOO_LARGE})


def _dressed(bomb: bytes, how: str) -> bytes:
    """``bomb`` (a deflated Part 10 file) with its file meta dressed so that a look at the meta's
    bytes alone would not see the deflated syntax, though ``dcmread`` inflates it all."""
    start = 144 + int.from_bytes(bomb[140:144], "little")
    sop = dcmread(io.BytesIO(bomb), stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID
    if how == "group length that lies":  # pydicom reads group 0002 to its end, whatever the length says
        return bomb[:140] + (2).to_bytes(4, "little") + bomb[144:]
    if how == "command set before the stream":  # pydicom skips group 0000 elements before the data set
        return bomb[:start] + b"\x00\x00\x02\x00\x06\x00\x00\x001.2.3\x00" + bomb[start:]
    # C-STORE on an Explicit VR Little Endian context: the node's own file meta, then the peer's
    # data set, which starts with a (0002,0010) naming the deflated syntax (read as file meta)
    uid = DeflatedExplicitVRLittleEndian.encode() + b"\0"
    stray = b"\x02\x00\x10\x00UI" + len(uid).to_bytes(2, "little") + uid
    return spill.file_meta(CTImageStorage, sop, ExplicitVRLittleEndian) + stray + bomb[start:]


@pytest.mark.parametrize("how", ["group length that lies", "command set before the stream",
                                 "file meta element in the data set"])
def test_a_bomb_is_refused_however_its_file_meta_is_dressed(tmp_path, how):
    bomb = deflated(make.ct_small(tmp_path / "ct", "inflate-dressed")[0], tmp_path / "bomb.dcm", extra_zeros=64 << 20)
    raw = _dressed(bomb.read_bytes(), how)
    ingest = _ingest(tmp_path / "spool")
    counted = _too_large()
    tracemalloc.start()
    try:
        verdict = ingest.store(raw, 1, "STORESCU", "127.0.0.1", "test", negotiated=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert verdict.status == 0xA700 and "too large" in verdict.comment
    assert _too_large() == counted + 1  # srnode_instances_refused_total{reason="too_large"}
    assert peak < 24 << 20  # pydicom inflating it whole held 141 MB
    assert not list(ingest.spool.incoming_dir.iterdir())


@pytest.mark.parametrize("extra", [1, 7, 63, 200])
def test_a_stream_whose_last_input_ends_a_piece_is_whole(tmp_path, extra):
    """zlib can take the last input bytes and still hold output (a match cut at a piece's end):
    that is not a stream cut short."""
    data = bytes(2 * inflate.CHUNK + extra)
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    meta = spill.file_meta(CTImageStorage, "1.2.3", DeflatedExplicitVRLittleEndian)
    out = inflate.bounded(meta + packer.compress(data) + packer.flush(), tmp_path, SPILL, LIMIT)
    assert isinstance(out, Path) and out.read_bytes().endswith(data)
    assert len(out.read_bytes()) == len(inflate._header(dcmread(io.BytesIO(meta + b"\x08\x00")).file_meta)) + len(data)


def test_a_large_one_whose_file_meta_lacks_optional_uids_is_stored_with_that_meta(tmp_path):
    """The inflated copy keeps the sender's file meta (but its transfer syntax and group length):
    nothing added, and a meta without (0002,0002) is no error (STOW-RS checks the data set's UIDs)."""
    source = make.ct_small(tmp_path / "ct", "inflate-bare-meta")[0]
    path = deflated(source, tmp_path / "large.dcm", extra_zeros=3 << 20)
    raw = path.read_bytes()
    ds = dcmread(io.BytesIO(raw), stop_before_pixels=True)
    meta = ds.file_meta
    del meta.MediaStorageSOPClassUID, meta.ImplementationVersionName
    start = 144 + int.from_bytes(raw[140:144], "little")
    head = io.BytesIO()
    write_file_meta_info(head, meta, enforce_standard=False)
    bare = b"\0" * 128 + b"DICM" + head.getvalue() + raw[start:]
    ingest = _ingest(tmp_path / "spool")
    verdict = ingest.store(bare, 1, "STOWPEER", "127.0.0.1", "test", negotiated=False)
    assert verdict.stored, verdict
    [stored] = ingest.spool.root.glob(f"series/*/*/{ds.SOPInstanceUID}.dcm")
    got = dcmread(stored, stop_before_pixels=True).file_meta
    assert got.TransferSyntaxUID == ExplicitVRLittleEndian and "ImplementationVersionName" not in got
    assert "MediaStorageSOPClassUID" not in got
    assert not list(ingest.spool.incoming_dir.iterdir())


def test_no_inflated_file_is_started_below_min_free_bytes(tmp_path, monkeypatch):
    """As a spilled data set (node.spill): a few MB of deflate must not put GBs on a nearly full disk."""
    path = deflated(make.ct_small(tmp_path / "ct", "inflate-no-room")[0], tmp_path / "large.dcm", extra_zeros=3 << 20)
    ingest = _ingest(tmp_path / "spool")
    ingest.min_free_bytes = ingest.free_bytes() * 4
    monkeypatch.setattr(inflate, "new_file", lambda folder: pytest.fail("an inflated file was started"))
    verdict = ingest.store(path.read_bytes(), 1, "STORESCU", "127.0.0.1", "test", negotiated=False)
    assert (verdict.status, verdict.comment) == (0xA700, "node disk full")
    assert not list(ingest.spool.incoming_dir.iterdir())
