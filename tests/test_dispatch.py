"""Delivery: status-aware retries, backoff, parking and replay.

The PACS faults here (an SCP answering Out of Resources, a STOW-RS server answering 202 and 409
with FailedSOPSequence) cannot be provoked from a healthy Orthanc on demand, so a pynetdicom SCP
and a small HTTP server play them, speaking the real protocols.
"""
from __future__ import annotations

import http.server
import json
import threading
import time

import pytest
from pydicom import Dataset, dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from node.config import Config
from node.dispatch import Dispatcher
from node.dispatch.outcome import cstore_outcome
from node.ledger import Ledger
from node.spool import Spool
from tests import series_factory as make
from tests.peers import free_port


@pytest.mark.parametrize("status, kind", [
    (0x0000, "sent"), (0xB000, "warning"), (0xB007, "warning"), (0xA700, "retry"), (0xA7FF, "retry"),
    (0x0110, "retry"), (0xA900, "fail"), (0xC000, "fail"), (0x0122, "fail"), (0x0124, "fail"),
])
def test_cstore_status_classes(status, kind):
    assert cstore_outcome(status).kind == kind


def setup(tmp_path, destinations, n=2, max_attempts=3):
    config = Config.model_validate({
        "destinations": destinations,
        "routes": [{"name": "r", "pipeline": "interp", "send_to": list(destinations)}],
        "dispatch": {"max_attempts": max_attempts, "backoff_initial_s": 0.01, "backoff_max_s": 0.02},
    })
    spool = Spool(tmp_path / "spool").ensure()
    ledger = Ledger(spool.ledger_path)
    files = make.ct_volume(spool.root / "jobs" / "1" / "out", "dispatch", n)
    job = ledger.add_job("1.2.3", "1.2", "r", "interp", {}, list(destinations), "k")
    ledger.add_deliveries(job.id, [(str(dcmread(f).SOPInstanceUID), spool.rel(f)) for f in files], list(destinations))
    return Dispatcher(config, spool, ledger), ledger, job.id, files


def drain(dispatcher, ledger, job_id, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline and ledger.job(job_id).state == "dispatching":
        dispatcher.run_once()
        time.sleep(0.02)
    return ledger.job(job_id)


class FlakySCP:
    """A real C-STORE SCP answering with the statuses given, in order, then success."""

    def __init__(self, statuses):
        self.statuses = list(statuses)
        self.received = []
        self.port = free_port()
        ae = AE(ae_title="FLAKY")
        ae.add_supported_context(CTImageStorage)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self.store)])

    def store(self, event):
        status = self.statuses.pop(0) if self.statuses else 0x0000
        if status == 0x0000:
            self.received.append(event.request.AffectedSOPInstanceUID)
        return status

    def dest(self):
        return {"type": "dicom", "ae_title": "FLAKY", "host": "127.0.0.1", "port": self.port}


def test_out_of_resources_is_retried_then_delivered(tmp_path):
    scp = FlakySCP([0xA700, 0xA700])
    try:
        dispatcher, ledger, job_id, files = setup(tmp_path, {"pacs": scp.dest()})
        job = drain(dispatcher, ledger, job_id)
        assert job.state == "delivered"
        assert sorted(scp.received) == sorted(str(dcmread(f).SOPInstanceUID) for f in files)
        assert {d.attempts for d in ledger.deliveries(job_id)} == {2}
    finally:
        scp.server.shutdown()


def test_permanent_failure_parks_at_once_and_retry_replays(tmp_path):
    scp = FlakySCP([0xA900, 0xA900])
    try:
        dispatcher, ledger, job_id, _ = setup(tmp_path, {"pacs": scp.dest()})
        job = drain(dispatcher, ledger, job_id)
        assert job.state == "parked" and "0xA900" in job.reason
        assert {d.attempts for d in ledger.deliveries(job_id)} == {1}
        assert "queued again" in ledger.retry(job_id)
        assert drain(dispatcher, ledger, job_id).state == "delivered"
    finally:
        scp.server.shutdown()


def test_unreachable_destination_parks_after_max_attempts(tmp_path):
    dest = {"type": "dicom", "ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port(), "timeout_s": 2}
    dispatcher, ledger, job_id, _ = setup(tmp_path, {"pacs": dest}, max_attempts=3)
    job = drain(dispatcher, ledger, job_id)
    assert job.state == "parked" and "no association" in job.reason
    assert {d.attempts for d in ledger.deliveries(job_id)} == {3}


class StowServer(http.server.BaseHTTPRequestHandler):
    """Answers STOW-RS with the scripted (code, failed-reasons) per request."""

    script: list = []
    bodies: list = []

    def do_POST(self):
        length = int(self.headers["Content-Length"])
        body = self.rfile.read(length)
        type(self).bodies.append(body)
        code, failures, *form = type(self).script.pop(0) if type(self).script else (200, {})
        form = form[0] if form else "json"
        result = Dataset()
        if failures:
            items = []
            for sop, reason in failures.items():
                item = Dataset()
                item.ReferencedSOPInstanceUID = sop
                item.FailureReason = reason
                items.append(item)
            result.FailedSOPSequence = items
        if form == "xml":  # PS3.19 NativeDicomModel, as some PACS answer
            attrs = "".join(
                f'<Item number="{n}"><DicomAttribute tag="00081155" vr="UI"><Value number="1">{sop}</Value>'
                f'</DicomAttribute><DicomAttribute tag="00081197" vr="US"><Value number="1">{reason}</Value>'
                f'</DicomAttribute></Item>' for n, (sop, reason) in enumerate(failures.items(), 1))
            payload = ('<?xml version="1.0" encoding="UTF-8"?><NativeDicomModel xmlns="http://dicom.nema.org/PS3.19'
                       f'/models/NativeDICOM"><DicomAttribute tag="00081198" vr="SQ">{attrs}</DicomAttribute>'
                       '</NativeDicomModel>').encode()
        else:
            payload = b"" if form == "empty" else json.dumps(result.to_json_dict()).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/dicom+xml" if form == "xml" else "application/dicom+json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def stow():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), StowServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    StowServer.script, StowServer.bodies = [], []
    yield server
    server.shutdown()


def test_stow_202_retries_only_the_failed_instance_and_409_parks(tmp_path, stow):
    url = f"http://127.0.0.1:{stow.server_address[1]}/dicom-web"
    dispatcher, ledger, job_id, files = setup(tmp_path, {"web": {"type": "dicomweb", "url": url}}, n=3)
    uids = [str(dcmread(f).SOPInstanceUID) for f in files]
    StowServer.script = [
        (202, {uids[0]: 0xA700, uids[1]: 0xA900}),  # one transient, one permanent failure
        (200, {}),
    ]
    job = drain(dispatcher, ledger, job_id)
    states = {d.sop_uid: (d.state, d.attempts) for d in ledger.deliveries(job_id)}
    assert states[uids[0]] == ("sent", 2)      # retried alone in the second request
    assert states[uids[1]] == ("parked", 1)    # data set does not match: never retried
    assert states[uids[2]] == ("sent", 1)
    assert job.state == "parked"
    assert StowServer.bodies[1].count(b"Content-Type: application/dicom") == 1

    StowServer.script = [(409, {uids[1]: 0xC000})]
    ledger.retry(job_id)
    assert drain(dispatcher, ledger, job_id).state == "parked"
    assert "409" in ledger.job(job_id).reason


def test_stow_202_in_xml_or_without_a_readable_body_counts_nothing_as_stored(tmp_path, stow):
    url = f"http://127.0.0.1:{stow.server_address[1]}/dicom-web"
    dispatcher, ledger, job_id, files = setup(tmp_path, {"web": {"type": "dicomweb", "url": url}}, n=3)
    uids = [str(dcmread(f).SOPInstanceUID) for f in files]
    StowServer.script = [
        (202, {}, "empty"),  # some failed, which unknown: all three again
        (202, {uids[1]: 0xC000}, "xml"),  # the second refused (XML body): the other two stored
    ]
    job = drain(dispatcher, ledger, job_id)
    states = {d.sop_uid: (d.state, d.attempts) for d in ledger.deliveries(job_id)}
    assert states == {uids[0]: ("sent", 2), uids[1]: ("parked", 2), uids[2]: ("sent", 2)}
    assert job.state == "parked" and "C000" in ledger.job(job_id).reason.upper()
    assert StowServer.bodies[1].count(b"Content-Type: application/dicom") == 3


def test_a_hung_destination_costs_one_timeout_per_round_not_one_per_job(tmp_path):
    """A PACS that accepts TCP but never answers: the other jobs of the round wait for the next one."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    dest = {"type": "dicom", "ae_title": "HUNG", "host": "127.0.0.1", "port": listener.getsockname()[1], "timeout_s": 1}
    try:
        dispatcher, ledger, first, files = setup(tmp_path, {"pacs": dest}, max_attempts=5)
        others = []
        for n in range(2):
            job = ledger.add_job(f"1.2.4.{n}", "1.2", "r", "interp", {}, ["pacs"], f"k{n}")
            ledger.add_deliveries(job.id, [(f"1.2.5.{n}", spool_rel(dispatcher, files[0]))], ["pacs"])
            others.append(job.id)
        dispatcher.run_once()
        listener.settimeout(0.5)
        connections = []
        while True:
            try:
                connections.append(listener.accept()[0])
            except TimeoutError:
                break
        assert len(connections) == 1
        for job_id in [first, *others]:
            deliveries = ledger.deliveries(job_id)
            assert {d.state for d in deliveries} == {"pending"} and {d.attempts for d in deliveries} == {1}
            assert all("no association" in d.last_status for d in deliveries)
    finally:
        listener.close()


def spool_rel(dispatcher, path):
    return dispatcher.spool.rel(path)
