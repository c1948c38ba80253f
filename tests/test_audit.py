"""The audit trail of a real node, and no patient data in it nor in the node's log."""
from __future__ import annotations

import json

import pytest
from pydicom import dcmread

from tests import series_factory as make
from tests.peers import storescu, wait_for
from tests.test_node_e2e import all_delivered, route

pytestmark = pytest.mark.integration

PHI = {"PatientName": "Zebedee^Quintessa", "PatientID": "PID-7391-XQ", "PatientBirthDate": "19310217"}


def _with_phi(files):
    for path in files:
        ds = dcmread(path)
        for keyword, value in PHI.items():
            setattr(ds, keyword, value)
        ds.SeriesDescription = "Audit probe"
        ds.save_as(path)
    return files


def test_audit_records_who_sent_what_and_where_it_went_without_patient_data(make_node, tmp_path):
    ct = _with_phi(make.ct_volume(tmp_path / "ct", "audit", 3))
    node = make_node(routes=[route("ct", {"Modality": "CT"}, {"inplane_scale": 2}, send_to=["archive"])],
                     destinations={"archive": {"type": "folder", "path": str(tmp_path / "archive")}})
    assert storescu(ct, node.port).returncode == 0
    assert storescu(ct[:1], node.port, calling_ae="STRANGER", check=False).returncode != 0
    [job] = node.wait_jobs(all_delivered(1), timeout=60, what="job delivered")
    # srnode jobs: the series' facts, counts and timeline.
    assert (job["modality"], job["series_description"], job["instances_in"], job["instances_out"]) == \
        ("CT", "Audit probe", 3, 3)
    assert job["received"] <= job["complete"] <= job["started"] <= job["finished"] <= job["delivered"]
    listing = node.cli("jobs").stdout
    assert "delivered" in listing and " CT " in listing and "Audit probe" in listing and "3->3" in listing

    wait_for(lambda: "job.settled" in node.cli("audit").stdout, 10, what="job settled in the audit")
    events = json.loads(node.cli("audit", "--json").stdout)
    kinds = [e["event"] for e in events]
    for kind in ("association.accepted", "association.rejected", "series.received", "job.created",
                 "job.finished", "delivery", "job.settled"):
        assert kind in kinds, kinds
    accepted = next(e for e in events if e["event"] == "association.accepted")
    assert (accepted["calling_ae"], accepted["address"], accepted["tls"]) == ("STORESCU", "127.0.0.1", False)
    rejected = next(e for e in events if e["event"] == "association.rejected")
    assert rejected["calling_ae"] == "STRANGER" and "not a configured peer" in rejected["reason"]
    received = next(e for e in events if e["event"] == "series.received")
    src = dcmread(ct[0], stop_before_pixels=True)
    assert (received["study_uid"], received["series_uid"], received["instances"], received["calling_ae"]) == \
        (src.StudyInstanceUID, src.SeriesInstanceUID, 3, "STORESCU")
    finished = next(e for e in events if e["event"] == "job.finished")
    assert finished["pipeline"] == "interp" and finished["software_version"] and finished["models"] == []
    delivery = next(e for e in events if e["event"] == "delivery")
    assert delivery["destination"] == "archive" and delivery["outcomes"] == {"sent": 3}
    assert node.cli("audit", "--since", "1h").stdout.count("\n") == len(events)
    assert node.cli("audit", "--since", "2999-01-01").stdout == ""

    # No patient name, ID or birth date anywhere (any spelling the DICOM text could take).
    audit_text = "".join(p.read_text() for p in (node.spool / "audit").glob("*.jsonl"))
    for text, where in ((audit_text, "audit"), (node.log(), "node log"), (listing, "srnode jobs")):
        for value in (*PHI.values(), "Zebedee", "Quintessa", "7391"):
            assert value.lower() not in text.lower(), f"{value!r} in the {where}"
