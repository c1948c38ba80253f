"""The event-driven pynetdicom reactors (node.fast_reactor) against real peers: dcmtk and pynetdicom.

Many instances over one association are all stored and acknowledged, release and abort end both
sides, an idle association still wakes, the network timeout still fires, a rejected association
still gets its A-ASSOCIATE-RJ, and unsupported pynetdicom versions fall back to the stock reactors.
"""
from __future__ import annotations

import logging
import threading
import time

import pynetdicom
import pytest
import yaml
from pydicom import dcmread
from pydicom.filewriter import write_file_meta_info
from pydicom.filebase import DicomBytesIO
from pynetdicom import AE, evt
from pynetdicom.dsutils import create_file_meta
from pynetdicom.sop_class import CTImageStorage, Verification

from node import fast_reactor
from node.assembly import Assembler
from node.config import load_config
from node.fast_reactor import FastAE, FastAssociation, FastDUL
from node.ingest import Ingest
from node.ledger import Ledger
from node.scp import StorageSCP
from node.spill import _explicit_le, _padded
from node.spool import Spool
from tests import series_factory as make
from tests.node_fixtures import node_config
from tests.peers import echoscu, free_port, storescu, wait_for


class Recorder:
    """A FastAE C-STORE SCP that keeps what it received and the association events."""

    def __init__(self, **ae_attrs):
        self.port = free_port()
        self.received: list[str] = []
        self.events: list[str] = []
        self.assocs: list = []
        ae = FastAE(ae_title="FASTSCP")
        for name, value in ae_attrs.items():
            setattr(ae, name, value)
        ae.add_supported_context(CTImageStorage)
        ae.add_supported_context(Verification)
        handlers = [
            (evt.EVT_C_STORE, self.store),
            (evt.EVT_C_ECHO, lambda event: 0x0000),
            (evt.EVT_ESTABLISHED, lambda event: self.assocs.append(event.assoc)),
            (evt.EVT_RELEASED, lambda event: self.events.append("released")),
            (evt.EVT_ABORTED, lambda event: self.events.append("aborted")),
        ]
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def store(self, event):
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def stop(self):
        self.server.shutdown()


@pytest.fixture
def recorder():
    scp = Recorder()
    yield scp
    scp.stop()


def test_storescu_many_instances_one_association(tmp_path, recorder):
    files = make.ct_volume(tmp_path / "ct", "fast-many", 120)
    storescu(files, recorder.port, called_ae="FASTSCP")
    wait_for(lambda: "released" in recorder.events, 5, what="EVT_RELEASED")
    assert sorted(recorder.received) == sorted(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files)
    assert len(recorder.assocs) == 1 and isinstance(recorder.assocs[0], FastAssociation)
    assert isinstance(recorder.assocs[0].dul, FastDUL)
    wait_for(lambda: not recorder.assocs[0].is_alive() and not recorder.assocs[0].dul.is_alive(), 5,
             what="association and DUL threads ended")


def test_fast_scu_to_fast_scp_store_echo_release(tmp_path, recorder):
    files = make.ct_volume(tmp_path / "ct", "fast-scu", 30)
    ae = FastAE(ae_title="FASTSCU")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", recorder.port, ae_title="FASTSCP")
    assert assoc.is_established and isinstance(assoc, FastAssociation)
    statuses = [assoc.send_c_store(dcmread(f)).Status for f in files]
    time.sleep(0.3)  # idle longer than IDLE_WAIT: both sides must still answer at once
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert statuses == [0x0000] * len(files) and assoc.is_released
    wait_for(lambda: "released" in recorder.events, 5, what="EVT_RELEASED on the SCP")
    assert len(recorder.received) == len(files)
    wait_for(lambda: not assoc.is_alive() and not assoc.dul.is_alive(), 5, what="SCU threads ended")


def test_abort_from_the_requestor_ends_the_acceptor(recorder):
    ae = FastAE(ae_title="FASTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", recorder.port, ae_title="FASTSCP")
    assert assoc.is_established
    assoc.abort()
    assert assoc.is_aborted
    wait_for(lambda: "aborted" in recorder.events, 5, what="EVT_ABORTED on the SCP")
    wait_for(lambda: all(not a.is_alive() and not a.dul.is_alive() for a in recorder.assocs), 5,
             what="acceptor threads ended")


def test_network_timeout_still_ends_an_idle_association():
    scp = Recorder(network_timeout=0.5)
    try:
        ae = AE(ae_title="STOCKSCU")  # the stock requestor against the fast acceptor
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="FASTSCP")
        assert assoc.is_established
        wait_for(lambda: not assoc.is_established, 5, what="the SCP's network timeout to end the association")
        assert assoc.is_released or assoc.is_aborted
    finally:
        scp.stop()


def test_unsupported_version_falls_back_to_stock(monkeypatch, caplog, recorder):
    monkeypatch.setattr(pynetdicom, "__version__", "9.0.0")
    monkeypatch.setattr(fast_reactor, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="node.fast_reactor"):
        ae = FastAE(ae_title="FASTSCU")
    assert "stock polling reactors" in caplog.text
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", recorder.port, ae_title="FASTSCP")
    assert assoc.is_established and type(assoc) is pynetdicom.association.Association
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


# -- the node's listener on the fast reactor -------------------------------------------------------
@pytest.fixture
def node_scp(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(node_config(free_port(), tmp_path / "spool", routes=[], destinations={})))
    config = load_config(path, check_pipelines=False)
    spool = Spool(tmp_path / "spool").ensure()
    ledger = Ledger(spool.ledger_path)
    scp = StorageSCP(config, Ingest(spool, ledger, Assembler(spool, ledger, 0.5)))
    scp.start()
    yield scp, spool
    scp.stop()


def test_node_scp_stores_every_instance_as_pynetdicom_would_encode_it(tmp_path, node_scp):
    scp, spool = node_scp
    files = make.ct_volume(tmp_path / "ct", "fast-node", 40)
    storescu(files, scp.config.node.port)
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        stored = spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        meta = create_file_meta(sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID,
                                transfer_syntax=dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, False
        write_file_meta_info(buf, meta, enforce_standard=True)
        data = stored.read_bytes()
        assert data[128:132] == b"DICM" and data[132:132 + len(buf.getvalue())] == buf.getvalue()
        assert dcmread(stored).PixelData == dcmread(f).PixelData


def test_node_scp_rejects_unknown_calling_ae(node_scp):
    scp, _ = node_scp
    out = echoscu(scp.config.node.port, calling_ae="INTRUDER", check=False)
    assert out.returncode != 0
    assert "Calling AE Title Not Recognized" in out.stdout + out.stderr
    assert echoscu(scp.config.node.port, calling_ae="STORESCU").returncode == 0


@pytest.mark.parametrize("text, pad", [("1.2.3", b"\0"), ("1.2.34", b"\0"), ("PYNETDICOM_304", b" "), ("ODD", b" ")])
def test_padding(text, pad):
    raw = _padded(text, pad)
    assert len(raw) % 2 == 0 and raw.rstrip(pad) == text.encode()
    assert _explicit_le(2, 0x0010, b"UI", raw)[:6] == b"\x02\x00\x10\x00UI"


def test_reactor_threads_do_not_spin_when_idle(recorder):
    """An idle association must block, not poll: its threads wake ~1/IDLE_WAIT times a second."""
    ae = FastAE(ae_title="FASTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", recorder.port, ae_title="FASTSCP")
    try:
        wakes = []
        original = FastDUL._wait

        def counting(self):
            wakes.append(threading.get_ident())
            return original(self)

        FastDUL._wait = counting
        try:
            time.sleep(0.5)
        finally:
            FastDUL._wait = original
        assert len(wakes) < 2 * 0.5 / fast_reactor.IDLE_WAIT + 4  # both DULs; the stock loop: ~1000
    finally:
        assoc.release()


# -- the pin: an upgrade of pynetdicom that moves what node.fast_reactor patches fails here --------
def test_patched_pynetdicom_internals_are_as_expected():
    """Fails LOUDLY on a pynetdicom upgrade: the version must be in SUPPORTED and every private
    method / attribute fast_reactor overrides or reads must still be there with the same shape.
    Re-read dul.py / association.py / transport.py of the new version before widening SUPPORTED."""
    from pynetdicom.association import Association
    from pynetdicom.dul import DULServiceProvider

    assert fast_reactor.supported(), (
        f"pynetdicom {pynetdicom.__version__} is not supported by node.fast_reactor: "
        f"{fast_reactor.internals_changed() or 'version outside SUPPORTED'}")
    assert fast_reactor.internals_changed() == []
    dul = DULServiceProvider(Association(FastAE(), "requestor"))
    missing = [name for name in fast_reactor.PATCHED_ATTRIBUTES if not hasattr(dul, name)]
    assert not missing, f"DULServiceProvider lost {missing}"
    from pynetdicom.fsm import TRANSITION_TABLE

    assert {("Evt18", "Sta2"), ("Evt19", "Sta2"), ("Evt19", "Sta6")} <= set(TRANSITION_TABLE)  # ARTIM, bad PDU


#: sha256 of ``inspect.getsource`` (pynetdicom 3.0.4) of each pynetdicom method whose body srnode
#: re-implements, and the copy to compare with the new version's before updating the digest.
REIMPLEMENTED = {
    "DULServiceProvider.run_reactor": (
        "e3a10eb3a0931e4854af33b9496e92d9679522aca26b0e04da8967559b9e2803", "node.fast_reactor.FastDUL.run_reactor"),
    "DULServiceProvider._is_transport_event": (
        "8725ed03bb8fbdefef249d5d9888c120e6277d7b6aa2c4f537e23027186e1253",
        "node.fast_reactor.FastDUL._is_transport_event"),
    "DULServiceProvider._read_pdu_data": (
        "19f2d4e38c13c83586365d93dd5cd96a0c7c665cb37251054b3e1f246e9f431b",
        "node.fast_reactor.FastDUL._read_pdu_data (and _recv_into, _count_dataset)"),
    "Association._run_reactor": (
        "f28838c5559e462a563750cfc9f3790027f4bb7e2223baf42c9f5d682c359dee",
        "node.fast_reactor.FastAssociation._run_reactor"),
    "RequestHandler.handle": (
        "034823fb4df3a87467bd0d45193f0d457fcf59c87fda8e97b2edfb89426f76dd", "node.dicom_guard.GuardedHandler.handle"),
}


def test_pynetdicom_code_that_srnode_reimplements_is_unchanged():
    """Fails LOUDLY when a pynetdicom release (3.0.x included) changes a method whose body srnode
    copies and modifies: the copy may now miss a fix or a new step. Diff the old and new method,
    carry the change into the copy named, then update the digest here."""
    import hashlib
    import inspect

    from pynetdicom.association import Association
    from pynetdicom.dul import DULServiceProvider
    from pynetdicom.transport import RequestHandler

    owners = {"DULServiceProvider": DULServiceProvider, "Association": Association, "RequestHandler": RequestHandler}
    changed = []
    for name, (digest, copy) in REIMPLEMENTED.items():
        owner, method = name.split(".")
        source = inspect.getsource(getattr(owners[owner], method))
        if hashlib.sha256(source.encode()).hexdigest() != digest:
            changed.append(f"pynetdicom {pynetdicom.__version__} changed {name}: re-check {copy} against it")
    assert changed == [], "\n".join(changed)


def test_a_changed_internal_is_reported_and_the_listener_refuses_to_start(monkeypatch):
    monkeypatch.setattr(fast_reactor, "_CHANGED", ["DULServiceProvider._read_pdu_data(self, x)"])
    assert not fast_reactor.supported()
    with pytest.raises(RuntimeError, match="PDU size cap and deadlines"):
        fast_reactor.require_supported()
