"""Retention: finished work leaves the spool after its time; the record and everything else stay."""
from __future__ import annotations

import time

import pytest
from pydicom import dcmread

from node.assembly import Assembler
from node.audit import Audit, read
from node.config import Config
from node.ingest import Ingest
from node.ledger import Ledger
from node.retention import Retention
from node.spool import Spool
from tests import series_factory as make
from tests.peers import free_port, storescu, wait_for
from tests.test_node_e2e import route


def test_an_open_series_or_one_being_stored_is_not_removed(tmp_path):
    config = Config.model_validate({"retention": {"delivered_seconds": 0, "failed_seconds": 0}})
    spool = Spool(tmp_path / "spool").ensure()
    ledger = Ledger(spool.ledger_path)
    assembler = Assembler(spool, ledger, quiet_seconds=0)
    ingest = Ingest(spool, ledger, assembler)
    retention = Retention(config, spool, ledger, ingest, Audit(spool.audit_dir))
    make.ct_volume(spool.series_dir("1.2", "1.2.3"), "kept", 2)
    ledger.note_series("1.2.3", "1.2", "STORESCU", "127.0.0.1")
    job = ledger.add_job("1.2.3", "1.2", "ct", "interp", {}, ["out"], "k")
    spool.job_dir(job.id).mkdir(parents=True)
    (spool.job_dir(job.id) / "result.json").write_text("{}")
    ledger.mark_routed("1.2", "1.2.3", 2)
    ledger.set_job_state(job.id, "delivered")
    assembler.instance_stored(7, "1.2", "1.2.3", new=True, expected=None)  # a late instance: open again

    time.sleep(0.01)
    assert retention.sweep()["jobs"] == [job.id]
    assert not spool.job_dir(job.id).exists() and len(spool.instances("1.2", "1.2.3")) == 2
    assert ledger.job(job.id).purged is not None and "nothing to retry" in ledger.retry(job.id)

    assembler.association_ended(7)
    assert retention.sweep()["series"] == 0  # open until the scheduler takes it
    assembler.due()  # routed now ...
    ingest._writing[("1.2", "1.2.3")] = 1  # ... but another instance is being written
    assert retention.sweep()["series"] == 0
    del ingest._writing[("1.2", "1.2.3")]
    assert retention.sweep()["series"] == 1 and spool.instances("1.2", "1.2.3") == []
    assert [e["event"] for e in read(spool.audit_dir)] == ["retention", "retention"]


@pytest.mark.integration
def test_delivered_work_leaves_the_spool_and_nothing_else_is_touched(make_node, tmp_path):
    archive = tmp_path / "archive"
    node = make_node(
        routes=[route("parked", {"calling_ae": "PARKER"}, {"inplane_scale": 2}, send_to=["down"]),
                route("ct", {"Modality": "CT"}, {"inplane_scale": 2}, send_to=["archive"])],
        destinations={"archive": {"type": "folder", "path": str(archive)},
                      "down": {"type": "dicom", "ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port(),
                               "timeout_s": 2}},
        peers=[{"ae_title": "STORESCU"}, {"ae_title": "PARKER"}], max_attempts=1,
        retention={"delivered_seconds": 1, "failed_seconds": 3600})
    kept = make.ct_volume(tmp_path / "kept", "retention-kept", 2)
    assert storescu(kept, node.port, calling_ae="PARKER").returncode == 0
    node.wait_jobs(lambda jobs: [j["state"] for j in jobs] == ["parked"], timeout=60, what="first job parked")
    parked_files = {p: p.read_bytes() for p in (node.spool / "series").rglob("*.dcm")}
    parked_files.update({p: p.read_bytes() for p in (node.spool / "jobs").rglob("*") if p.is_file()})

    gone = make.ct_volume(tmp_path / "gone", "retention-gone", 3)
    assert storescu(gone, node.port).returncode == 0
    study = str(dcmread(gone[0]).StudyInstanceUID)
    wait_for(lambda: (node.spool / "series" / study).exists(), 10, what="second series spooled")
    wait_for(lambda: any(j["purged"] for j in node.jobs()), 60, what="delivered job purged")
    wait_for(lambda: not list((node.spool / "series" / study).glob("*/*.dcm")), 10, what="its series removed")

    jobs = {j["route"]: j for j in node.jobs()}
    assert jobs["ct"]["state"] == "delivered" and jobs["ct"]["instances_out"] == 3  # the record stays
    assert jobs["parked"]["purged"] is None
    assert not node.spool.joinpath("jobs", str(jobs["ct"]["id"])).exists()
    assert len(list(archive.rglob("*.dcm"))) == 3  # delivered results are not the spool's
    # Nothing else touched: the parked job's series and outputs are there, byte for byte.
    now = {p: p.read_bytes() for p in (node.spool / "series").rglob("*.dcm")}
    now.update({p: p.read_bytes() for p in (node.spool / "jobs").rglob("*") if p.is_file()})
    assert now == parked_files
    events = [e for e in read(node.spool / "audit") if e["event"] == "retention"]
    assert [i for e in events for i in e["jobs"]] == [jobs["ct"]["id"]] and sum(e["series"] for e in events) == 1
    # The audit keeps the purged job's story (retention never touches it).
    told = {e["event"] for e in read(node.spool / "audit") if e.get("job") == jobs["ct"]["id"]}
    assert {"job.created", "job.finished", "delivery", "job.settled"} <= told, told
    assert "left the spool" in node.cli("retry", str(jobs["ct"]["id"])).stdout
