"""The scheduler loop keeps going when a series cannot be routed or the ledger cannot be written, and tries again."""
from __future__ import annotations

import sqlite3
import time

import pytest

from node.assembly import Assembler
from node.config import Config
from node.ledger import Ledger
from node.scheduler import Scheduler
from node.spool import Spool
from tests import series_factory as make


def _scheduler(tmp_path):
    """(spool, ledger, assembler, scheduler, submitted job ids) for one CT route to a folder."""
    config = Config.model_validate({
        "destinations": {"out": {"type": "folder", "path": str(tmp_path / "out")}},
        "routes": [{"name": "ct", "match": {"Modality": "CT"}, "pipeline": "interp", "send_to": ["out"]}],
    })
    spool = Spool(tmp_path / "spool").ensure()
    ledger = Ledger(spool.ledger_path)
    assembler = Assembler(spool, ledger, quiet_seconds=0)
    submitted = []
    return spool, ledger, assembler, Scheduler(config, spool, ledger, assembler, submitted.append), submitted


def test_a_series_that_cannot_be_routed_waits_and_does_not_stop_the_others(tmp_path, caplog):
    spool, ledger, assembler, scheduler, submitted = _scheduler(tmp_path)

    bad = spool.instance_path("1.2", "1.2.1", "1.2.1.1")
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not DICOM")  # what a damaged disk block reads as
    make.ct_volume(spool.series_dir("1.2", "1.2.2"), "good", 2)
    for uid in ("1.2.1", "1.2.2"):
        assembler.instance_stored(1, "1.2", uid, new=True, expected=None)
    assembler.association_ended(1)
    time.sleep(0.05)

    scheduler.tick()
    assert [j.series_uid for j in ledger.jobs()] == ["1.2.2"]
    assert "routing failed" in caplog.text
    assert submitted == [ledger.jobs()[0].id]
    scheduler.tick()
    assert len(ledger.jobs()) == 1  # the bad series is not retried in a tight loop
    assert assembler._open["1.2", "1.2.1"].not_before > time.monotonic()


def test_a_ledger_that_cannot_be_written_does_not_queue_the_job_again_and_again(tmp_path, monkeypatch):
    """A full disk: the job's 'queued' state cannot be recorded, so it must not be queued (each
    tick would queue it again); when the ledger works again it is queued once."""
    spool, ledger, assembler, scheduler, submitted = _scheduler(tmp_path)
    make.ct_volume(spool.series_dir("1.2", "1.2.2"), "full", 2)
    assembler.instance_stored(1, "1.2", "1.2.2", new=True, expected=None)
    assembler.association_ended(1)
    time.sleep(0.05)

    original = ledger.set_job_state

    def full(job_id, state, reason=None):
        if state == "queued":
            raise sqlite3.OperationalError("database or disk is full")
        return original(job_id, state, reason)

    monkeypatch.setattr(ledger, "set_job_state", full)
    for _ in range(3):
        with pytest.raises(sqlite3.OperationalError):
            scheduler.tick()
    assert submitted == []
    monkeypatch.setattr(ledger, "set_job_state", original)
    scheduler.tick()
    scheduler.tick()
    assert submitted == [ledger.jobs()[0].id] and ledger.jobs()[0].state == "queued"


def test_a_loop_failing_the_same_way_logs_one_traceback_then_one_line_and_backs_off(caplog):
    import threading
    import types

    from node.server import GUARD_MAX_PAUSE_S, Node

    pauses = []
    stop = threading.Event()
    fake = types.SimpleNamespace(_stop=types.SimpleNamespace(
        is_set=stop.is_set, wait=lambda s: (pauses.append(s), len(pauses) >= 7 and stop.set())))

    def loop():
        raise sqlite3.OperationalError("database or disk is full")

    Node._guard(fake, loop)()
    assert pauses == [1, 2, 4, 8, 16, GUARD_MAX_PAUSE_S, GUARD_MAX_PAUSE_S]
    assert caplog.text.count("Traceback") == 1
    assert caplog.text.count("loop still failing (OperationalError: database or disk is full)") == 6


def test_a_series_uid_reused_in_another_study_is_another_series(tmp_path):
    """Both studies are routed (the second was stored and never processed when a series was its
    Series UID alone), each job with its own instances; `sender` resolves per study."""
    spool, ledger, assembler, scheduler, submitted = _scheduler(tmp_path)
    for study, peer in (("1.2", "CT_A"), ("1.3", "CT_B")):
        make.ct_volume(spool.series_dir(study, "1.9.9"), f"reused {study}", 2)
        ledger.note_series("1.9.9", study, peer, "127.0.0.1")
        assembler.instance_stored(1, study, "1.9.9", new=True, expected=None)
    assembler.association_ended(1)
    time.sleep(0.05)
    scheduler.tick()
    jobs = ledger.jobs()
    assert sorted((j.study_uid, j.series_uid, j.version) for j in jobs) == [("1.2", "1.9.9", 1), ("1.3", "1.9.9", 1)]
    assert len(submitted) == 2  # same file names here, so the same input key: unique per study too
    assert [ledger.series(s, "1.9.9")["calling_ae"] for s in ("1.2", "1.3")] == ["CT_A", "CT_B"]
    assert all(ledger.series(s, "1.9.9")["routed_count"] == 2 for s in ("1.2", "1.3"))


def test_a_ledger_keyed_by_series_uid_alone_is_rebuilt_keeping_its_rows(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE series (series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, calling_ae TEXT, peer_host TEXT,
            first_seen REAL NOT NULL, routed_count INTEGER NOT NULL DEFAULT 0, routed_at REAL);
        CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, series_uid TEXT NOT NULL, study_uid TEXT NOT NULL,
            route TEXT NOT NULL, pipeline TEXT NOT NULL, options TEXT NOT NULL, send_to TEXT NOT NULL,
            input_key TEXT NOT NULL, version INTEGER NOT NULL, state TEXT NOT NULL, reason TEXT,
            created REAL NOT NULL, updated REAL NOT NULL, UNIQUE (series_uid, route, input_key));
        CREATE INDEX jobs_state ON jobs (state);
        INSERT INTO series VALUES ('1.9.9', '1.2', 'CT_A', 'h', 1.0, 2, 2.0);
        INSERT INTO jobs VALUES (7, '1.9.9', '1.2', 'ct', 'interp', '{}', '["out"]', 'k', 1, 'delivered', NULL, 1, 2);
    """)
    old.close()
    ledger = Ledger(path)
    assert ledger.series("1.2", "1.9.9")["routed_count"] == 2 and ledger.job(7).state == "delivered"
    ledger.note_series("1.9.9", "1.3", "CT_B", "h")
    assert ledger.series("1.3", "1.9.9")["calling_ae"] == "CT_B"
    assert ledger.add_job("1.9.9", "1.3", "ct", "interp", {}, ["out"], "k").id == 8  # same key, other study
    assert Ledger(path).series("1.2", "1.9.9") is not None  # opened again: nothing to rebuild
