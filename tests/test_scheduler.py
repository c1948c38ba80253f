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
    assert assembler._open["1.2.1"].not_before > time.monotonic()


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
