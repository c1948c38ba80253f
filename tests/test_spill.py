"""Large instances are received into a file and checked there (node.spill, issue 21): the same
answers as for one held in memory, the same bytes stored, nothing left behind."""
from __future__ import annotations

import copy
import errno
import io
import time

import numpy as np
import pytest
import yaml
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, RLELossless
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import CTImageStorage

from node import spill
from node.assembly import Assembler
from node.config import load_config
from node.ingest import Ingest
from node.ledger import Ledger
from node.scp import StorageSCP
from node.spool import Spool
from tests import dicom_wire as wire
from tests import malformed_corpus as corpus
from tests.node_fixtures import node_config
from tests.peers import free_port, storescu, wait_for

SPILL = 65536  # node.limits.spill_dataset_bytes in these tests (its minimum; the default is 16 MiB)


def _ingest(root):
    spool = Spool(root).ensure()
    ledger = Ledger(spool.ledger_path)
    return Ingest(spool, ledger, Assembler(spool, ledger, 60))


def _encapsulated_cases() -> list[corpus.Case]:
    """RLE (undefined-length encapsulated pixel data): valid, cut inside its last item, an item
    whose length runs past the data."""
    ds = corpus._relabel(dcmread(get_testdata_file("MR_small_RLE.dcm")), "spill-rle")
    whole = corpus.part10(ds, RLELossless)
    lying = bytearray(whole)
    first_item = lying.index(b"\xfe\xff\x00\xe0", lying.index(b"\xe0\x7f\x10\x00") + 12)  # after the offset table
    lying[first_item + 4:first_item + 8] = (1 << 24).to_bytes(4, "little")
    meta = dict(sop=str(ds.SOPInstanceUID), sop_class=str(ds.SOPClassUID), syntax=RLELossless)
    return [corpus.Case("rle", whole, corpus.OK, **meta), corpus.Case("rle-cut", whole[:-3000], 0, **meta),
            corpus.Case("rle-lying-item", bytes(lying), 0, **meta)]


def test_every_corpus_case_gets_the_same_answer_from_a_file_as_from_memory(tmp_path):
    """The malformed corpus (and RLE cases), each stored from bytes by one ingest and from a file,
    large values left in it, by another: the same status and comment, the same file stored."""
    in_memory, from_file = _ingest(tmp_path / "a"), _ingest(tmp_path / "b")
    from_file.defer_bytes = 64  # every pixel data (and any long value) stays in the file
    cases = corpus.cases() + corpus.duplicates() + _encapsulated_cases()
    incoming = from_file.spool.incoming_dir
    for n, case in enumerate(cases):
        args = dict(session=1, sender="STORESCU", host="127.0.0.1", via=f"case {case.name}", negotiated=False)
        want = in_memory.store(case.data, **args)
        path = incoming / f".tmp-{n}.dcm"
        path.write_bytes(case.data)
        got = from_file.store(path, **args)
        path.unlink()
        assert (got.status, got.comment) == (want.status, want.comment), case.name
        if want.stored:
            stored = from_file.spool.instance_path(want.study, want.series, want.sop_instance)
            assert stored.read_bytes() == case.data, case.name
    assert not list(incoming.iterdir())


def multiframe(tmp_path, frames: int, name: str):
    """CT_small as a multi-frame instance of ``frames`` x 32 KiB of random pixels."""
    ds = copy.deepcopy(corpus._relabel(dcmread(get_testdata_file("CT_small.dcm")), name))
    for tag in [elem.tag for elem in ds if elem.tag.element == 0 or elem.tag == 0xFFFCFFFC]:
        del ds[tag]  # what storescu leaves out (group lengths, trailing padding): sent as they are
    ds.NumberOfFrames = frames
    ds.PixelData = np.random.default_rng(frames).integers(0, 4096, (frames, 128, 128), np.uint16).tobytes()
    path = tmp_path / f"{name}.dcm"
    path.write_bytes(corpus.part10(ds, ExplicitVRLittleEndian))
    return path, ds


class SeenIngest(Ingest):
    """The real ingest, noting whether each instance came as bytes or as a file."""

    seen: list[str]

    def store(self, raw, *args, **kwargs):
        self.seen.append(type(raw).__name__)
        return super().store(raw, *args, **kwargs)


@pytest.fixture
def node_scp(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(node_config(free_port(), tmp_path / "spool", routes=[], destinations={},
                                               limits={"spill_dataset_bytes": SPILL})))
    config = load_config(path, check_pipelines=False)
    spool = Spool(tmp_path / "spool").ensure()
    ledger = Ledger(spool.ledger_path)
    ingest = SeenIngest(spool, ledger, Assembler(spool, ledger, 60))
    ingest.seen = []
    scp = StorageSCP(config, ingest)
    scp.start()
    yield scp, spool, ingest
    scp.stop()


def _data_set(part10: bytes) -> bytes:
    return corpus.body_of(part10)


def test_a_large_instance_from_storescu_is_spooled_from_a_file_byte_for_byte(tmp_path, node_scp):
    scp, spool, ingest = node_scp
    large, ds = multiframe(tmp_path, 40, "spill-large")  # 1.3 MB: past the threshold
    small, small_ds = multiframe(tmp_path, 1, "spill-small")  # 32 KiB: in memory, as ever
    assert storescu([large, small], scp.config.node.port).returncode == 0
    assert sorted(ingest.seen) == ["PosixPath", "bytes"]
    for path, sent in ((large, ds), (small, small_ds)):
        stored = spool.instance_path(sent.StudyInstanceUID, sent.SeriesInstanceUID, sent.SOPInstanceUID)
        assert _data_set(stored.read_bytes()) == _data_set(path.read_bytes())
    assert not list(spool.incoming_dir.iterdir())


def _send(port: int, part10: bytes, sop: str) -> int:
    """One C-STORE of these data set bytes as they are (pynetdicom would re-encode a Dataset; storescu
    leaves out group lengths and trailing padding)."""
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="SRNODE")
    assert assoc.is_established
    try:
        request = C_STORE()
        request.MessageID, request.Priority = 1, 2
        request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = CTImageStorage, sop
        request.DataSet = io.BytesIO(_data_set(part10))
        assoc._reactor_checkpoint.clear()  # as Association.send_c_store does
        while not assoc._is_paused:
            time.sleep(0.0001)
        try:
            assoc.dimse.send_msg(request, assoc.accepted_contexts[0].context_id)
            _, response = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        return response.Status
    finally:
        assoc.release()


def test_a_large_instance_cut_short_or_repeated_gets_the_in_memory_answers(tmp_path, node_scp):
    scp, spool, ingest = node_scp
    path, ds = multiframe(tmp_path, 40, "spill-cut")
    whole = path.read_bytes()
    assert _send(scp.config.node.port, whole[:-50000], str(ds.SOPInstanceUID)) == 0xC000  # Pixel Data cut short
    assert _send(scp.config.node.port, whole, str(ds.SOPInstanceUID)) == 0x0000
    assert _send(scp.config.node.port, whole, str(ds.SOPInstanceUID)) == 0x0000  # a repeat: kept once
    other = bytearray(whole)
    other[-10:] = bytes(10)  # another image under the same SOP Instance UID
    assert _send(scp.config.node.port, bytes(other), str(ds.SOPInstanceUID)) == 0x0111
    assert ingest.seen == ["PosixPath"] * 4
    stored = spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert _data_set(stored.read_bytes()) == _data_set(whole)
    assert not list(spool.incoming_dir.iterdir())


def test_a_data_set_cut_off_mid_message_leaves_no_file(node_scp):
    scp, spool, _ = node_scp
    sock = wire.associate(scp.config.node.port, "127.0.0.1", max_pdu=262144)
    try:
        sock.sendall(wire.p_data(3, 3, wire.c_store_rq_command("1.2.3.4.5")))
        for _ in range(4):
            sock.sendall(wire.p_data(3, 0, b"\0" * 65536))  # data set fragments, never the last
        wait_for(lambda: list(spool.incoming_dir.iterdir()), 5, what="the data set in spool/incoming")
    finally:
        sock.close()
    wait_for(lambda: not list(spool.incoming_dir.iterdir()), 5, what="spool/incoming emptied")


def test_a_large_instance_that_cannot_be_spilled_is_refused_not_held(tmp_path, node_scp, caplog):
    """The spool's incoming/ folder cannot take the file (here it is not a folder): the C-STORE gets
    0xA700 with one log line, its data set is dropped as it arrives, the next instance is stored."""
    scp, spool, ingest = node_scp
    large, ds = multiframe(tmp_path, 40, "spill-unwritable")
    small, small_ds = multiframe(tmp_path, 1, "spill-after")
    spool.incoming_dir.rmdir()
    spool.incoming_dir.write_bytes(b"")
    result = storescu([large, small], scp.config.node.port, extra=("-nh", "-v"), check=False)  # -nh: go on after a failure
    assert ingest.seen == ["bytes"]  # only the small one reached the ingest
    assert "could not be written to the spool" in caplog.text and "0xA700" in caplog.text
    assert not spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID).exists()
    assert spool.instance_path(small_ds.StudyInstanceUID, small_ds.SeriesInstanceUID, small_ds.SOPInstanceUID).exists()
    assert "Received Store Response (Refused: OutOfResources)" in result.stderr, result.stderr


def test_a_large_instance_is_not_spilled_below_min_free_bytes(tmp_path, node_scp):
    scp, spool, ingest = node_scp
    large, ds = multiframe(tmp_path, 40, "spill-no-room")
    ingest.min_free_bytes = ingest.free_bytes() * 4  # the spool's disk is "nearly full"
    result = storescu([large], scp.config.node.port, extra=("-v",), check=False)
    assert "Received Store Response (Refused: OutOfResources)" in result.stderr, result.stderr
    assert ingest.seen == [] and not list(spool.incoming_dir.iterdir())


class _FullDisk(io.RawIOBase):
    """A file in ``incoming/`` on a disk that is full: every write fails with ENOSPC."""

    def __init__(self, path):
        super().__init__()
        self.name = str(path)
        path.touch()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_large_instance_on_a_full_disk_is_refused_and_leaves_no_file(tmp_path, node_scp, monkeypatch):
    """ENOSPC on the spill file's first write (its buffered file meta fails again at close): still
    0xA700 for that C-STORE, the next instance stored, no file left in incoming/."""
    scp, spool, ingest = node_scp
    large, ds = multiframe(tmp_path, 40, "spill-enospc")
    small, small_ds = multiframe(tmp_path, 1, "spill-enospc-after")
    monkeypatch.setattr(spill, "new_file", lambda folder: io.BufferedWriter(_FullDisk(folder / ".tmp-full.dcm")))
    result = storescu([large, small], scp.config.node.port, extra=("-nh", "-v"), check=False)
    assert "Received Store Response (Refused: OutOfResources)" in result.stderr, result.stderr
    assert ingest.seen == ["bytes"]
    assert spool.instance_path(small_ds.StudyInstanceUID, small_ds.SeriesInstanceUID, small_ds.SOPInstanceUID).exists()
    assert not list(spool.incoming_dir.iterdir())


def test_a_partial_file_that_cannot_be_flushed_is_still_removed(tmp_path):
    """An association cut off while its spill file holds a fragment the full disk refused: the
    file goes and nothing is raised (FastAssociation.run then releases the association's slot)."""
    out = io.BufferedWriter(_FullDisk(tmp_path / ".tmp-partial.dcm"))
    out.write(b"a fragment, buffered")

    class Message:
        _data_set_file = out

    class Dimse:
        message = Message()

    spill.drop_partial(Dimse())
    assert not list(tmp_path.iterdir())
