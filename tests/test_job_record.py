"""What the ledger keeps of a job for admins: series facts, counts, timeline, progress, models."""
from __future__ import annotations

import json
import logging
import sqlite3
import time

from pydicom import Dataset

from node import cli, scheduler as scheduler_module
from node.assembly import Assembler
from node.audit import Audit, parse_since, read
from node.config import Config
from node.jobs import ProgressFile, execute_job, models_claimed
from node.ledger import Ledger
from node.scheduler import Scheduler
from node.spool import Spool
from pipelines import weights
from tests import series_factory as make


def _node_parts(tmp_path):
    config = Config.model_validate({
        "destinations": {"out": {"type": "folder", "path": str(tmp_path / "out")}},
        "routes": [{"name": "ct", "match": {"Modality": "CT"}, "pipeline": "interp",
                    "options": {"inplane_scale": 2}, "send_to": ["out"]}],
    })
    spool = Spool(tmp_path / "spool").ensure()
    ledger = Ledger(spool.ledger_path)
    assembler = Assembler(spool, ledger, quiet_seconds=0)
    audit = Audit(spool.audit_dir)
    submitted: list[int] = []
    return spool, ledger, assembler, Scheduler(config, spool, ledger, assembler, submitted.append, audit), submitted


def test_a_job_records_its_series_counts_timeline_and_progress(tmp_path, monkeypatch, caplog, capsys):
    spool, ledger, assembler, scheduler, submitted = _node_parts(tmp_path)
    files = make.ct_volume(spool.series_dir("1.2", "1.2.3"), "record", 3)
    ledger.note_series("1.2.3", "1.2", "STORESCU", "127.0.0.1")
    assembler.instance_stored(1, "1.2", "1.2.3", new=True, expected=None)
    assembler.association_ended(1)
    time.sleep(0.02)
    scheduler.tick()
    [job_id] = submitted
    job = ledger.job(job_id)
    assert (job.modality, job.instances_in, job.state) == ("CT", 3, "queued")
    assert job.received <= job.created and job.started is None

    # A running job: what its worker's progress file says reaches the ledger and, every
    # PROGRESS_LOG_S, the log.
    monkeypatch.setattr(scheduler_module, "PROGRESS_LOG_S", 0.0)
    monkeypatch.setattr(scheduler_module, "PROGRESS_POLL_S", 0.0)
    progress = ProgressFile(spool.job_dir(job_id))
    progress(2, 8)
    with caplog.at_level(logging.INFO, logger="node.scheduler"):
        scheduler.tick()
        scheduler.tick()
    job = ledger.job(job_id)
    assert job.progress == 0.25 and job.started == progress.started
    assert f"job {job_id} (ct/interp) running" in caplog.text and "2 of 8 slices (25%)" in caplog.text
    assert ledger.describe(job)["progress"] == 0.25
    (tmp_path / "node.yaml").write_text(f"node: {{spool: {spool.root}}}\n")
    assert cli.main(["jobs", "--config", str(tmp_path / "node.yaml")]) == 0
    assert "running 25%" in capsys.readouterr().out  # srnode jobs shows it too
    # Between PROGRESS_LOG_S, no more lines (the ledger still follows).
    monkeypatch.setattr(scheduler_module, "PROGRESS_LOG_S", 3600.0)
    monkeypatch.setattr("node.jobs.PROGRESS_EVERY_S", 0.0)  # the worker side writes at most this often
    progress(4, 8)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="node.scheduler"):
        scheduler.tick()
    assert "running" not in caplog.text and ledger.job(job_id).progress == 0.5

    (spool.job_dir(job_id) / "progress.json").unlink()
    result = execute_job(spool, job_id)  # the real run (interp reports each output slice)
    assert result["state"] == "done" and result["models"] == []  # interpolation: no weights
    scheduler.tick()
    job = ledger.job(job_id)
    assert job.state == "dispatching" and job.instances_out == len(files)
    assert job.created <= job.started <= job.finished and job.progress is None
    view = ledger.describe(job, deliveries=True)
    assert view["destinations"]["out"]["instances"] == {"pending": 3} and view["progress"] is None

    events = [e["event"] for e in read(spool.audit_dir)]
    assert events == ["series.received", "job.created", "job.finished"]


def test_a_ledger_from_before_the_job_details_gains_them(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, series_uid TEXT NOT NULL,"
                     " study_uid TEXT NOT NULL, route TEXT NOT NULL, pipeline TEXT NOT NULL, options TEXT NOT NULL,"
                     " send_to TEXT NOT NULL, input_key TEXT NOT NULL, version INTEGER NOT NULL, state TEXT NOT NULL,"
                     " reason TEXT, created REAL NOT NULL, updated REAL NOT NULL,"
                     " UNIQUE (series_uid, route, input_key));"
                     "INSERT INTO jobs VALUES (1, '1.2.3', '1.2', 'ct', 'interp', '{}', '[\"out\"]', 'k', 1,"
                     " 'delivered', NULL, 1.0, 2.0);")
    db.commit()
    db.close()
    ledger = Ledger(path)
    job = ledger.job(1)
    assert job.state == "delivered" and job.modality is None and job.purged is None
    assert ledger.describe(job)["instances_out"] is None


def test_the_models_an_output_names_are_found_with_their_full_digest():
    """SoftwareVersions as the pipelines write it: the node's version, then name:<digest prefix>."""
    path = weights.weights_dir() / "sr3d_inplane_x2.safetensors"
    digest = weights.read_card_header(path)["sha256"]
    ds, equipment = Dataset(), Dataset()
    equipment.SoftwareVersions = ["0.1.0", f"inplane_x2:{digest[:8]} through_x2:00000000"]
    ds.ContributingEquipmentSequence = [equipment]
    assert models_claimed([ds]) == [{"model": "sr3d-cnn", "file": path.name, "sha256": digest}]
    seg = Dataset()
    seg.SoftwareVersions = ["0.1.0", "sha256:" + weights.read_card_header(
        weights.weights_dir() / "cxr_hydra_lungs.safetensors")["sha256"][:12]]
    assert [m["file"] for m in models_claimed([seg])] == ["cxr_hydra_lungs.safetensors"]


def test_audit_lines_are_json_read_back_since_a_time(tmp_path):
    audit = Audit(tmp_path / "audit")
    audit.record("admin", actor="ops", action="retry", job=3)
    cut = time.time()
    time.sleep(0.01)
    audit.record("config.reload", ok=False, reasons=["line\nforged"])
    (next((tmp_path / "audit").glob("*.jsonl"))).open("a").write('{"cut by a cra')  # a crash mid-line
    audit.record("admin", actor="ops", action="reload")
    lines = next((tmp_path / "audit").glob("*.jsonl")).read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[1])["reasons"] == ["line\nforged"]
    assert [e["event"] for e in read(tmp_path / "audit")] == ["admin", "config.reload", "admin"]
    assert [e["event"] for e in read(tmp_path / "audit", since=cut, limit=1)] == ["admin"]
    assert parse_since("2h", now=10000.0) == 10000.0 - 7200
    assert parse_since("1970-01-01T00:01:00") == 60.0
