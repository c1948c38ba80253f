"""The scheduler loop keeps going when one series cannot be routed, and tries it again."""
from __future__ import annotations

import time

from node.assembly import Assembler
from node.config import Config
from node.ledger import Ledger
from node.scheduler import Scheduler
from node.spool import Spool
from tests import series_factory as make


def test_a_series_that_cannot_be_routed_waits_and_does_not_stop_the_others(tmp_path, caplog):
    config = Config.model_validate({
        "destinations": {"out": {"type": "folder", "path": str(tmp_path / "out")}},
        "routes": [{"name": "ct", "match": {"Modality": "CT"}, "pipeline": "interp", "send_to": ["out"]}],
    })
    spool = Spool(tmp_path / "spool").ensure()
    ledger = Ledger(spool.ledger_path)
    assembler = Assembler(spool, ledger, quiet_seconds=0)
    submitted = []
    scheduler = Scheduler(config, spool, ledger, assembler, submitted.append)

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
