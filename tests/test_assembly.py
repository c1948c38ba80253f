"""Series assembly: when a series counts as complete, and what holds it back."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

import node.assembly as assembly
from node.assembly import Assembler
from node.ingest import Ingest
from node.ledger import Ledger
from node.spool import Spool, make_dirs, remove_partial_writes, write_new

STUDY, SERIES = "1.2.3", "1.2.3.4"


@pytest.fixture()
def assembler(tmp_path):
    spool = Spool(tmp_path / "spool").ensure()
    return Assembler(spool, Ledger(spool.ledger_path), quiet_seconds=0.2)


def store(assembler, n, assoc=1, expected=None, acquisition=""):
    """Put instance ``n`` on disk and tell the assembler, as the listener does."""
    path = assembler.spool.instance_path(STUDY, SERIES, f"1.2.3.4.{n}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    assembler.instance_stored(assoc, STUDY, SERIES, new=True, expected=expected, acquisition=acquisition)


def test_instances_stored_at_once_by_two_threads_count_once_each(assembler):
    """Both files of a new series are on disk before either store tells the assembler (the parts of
    one STOW-RS request are stored by several threads): 2 instances, not 3, so an expected count of
    3 does not complete the series early (the old count started from the files on disk minus one)."""
    for n in (0, 1):
        path = assembler.spool.instance_path(STUDY, SERIES, f"1.2.3.4.{n}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    for n in (0, 1):
        assembler.instance_stored(n, STUDY, SERIES, new=True, expected=3, acquisition="1", sop=f"1.2.3.4.{n}")
    assert assembler._open[(STUDY, SERIES)].count == 2 and assembler.due() == []
    path = assembler.spool.instance_path(STUDY, SERIES, "1.2.3.4.2")
    path.write_bytes(b"x")
    assembler.instance_stored(0, STUDY, SERIES, new=True, expected=3, acquisition="1", sop="1.2.3.4.2")
    assert [e.count for e in assembler.due()] == [3]


def test_expected_count_of_one_acquisition_completes_before_the_association_ends(assembler):
    for n in range(3):
        assert assembler.due() == []
        store(assembler, n, expected=3, acquisition="1")
    [entry] = assembler.due()
    assert entry.count == 3


def test_a_series_of_several_acquisitions_waits_for_the_quiet_period(assembler):
    # Some scanners make one acquisition per slice: ImagesInAcquisition=1 on every instance.
    store(assembler, 0, expected=1, acquisition="1")
    store(assembler, 1, expected=1, acquisition="2")
    assert assembler.due() == []
    store(assembler, 2, expected=2, acquisition="3")
    assembler.association_ended(1)
    assert assembler.due() == []
    time.sleep(0.3)
    [entry] = assembler.due()
    assert entry.count == 3


def test_a_single_image_expectation_waits_for_the_end_of_its_association(assembler):
    store(assembler, 0, expected=1, acquisition="1")
    assert assembler.due() == []
    assembler.association_ended(1)
    assert [e.count for e in assembler.due()] == [1]


def test_more_instances_than_expected_fall_back_to_the_quiet_period(assembler):
    for n in range(3):
        store(assembler, n, expected=2)
    assert assembler.due() == []
    assembler.association_ended(1)
    time.sleep(0.3)
    assert [e.count for e in assembler.due()] == [3]


def test_a_store_finishing_after_its_connection_closed_does_not_hold_the_series(assembler):
    store(assembler, 0, assoc=7)
    assembler.association_ended(7)
    store(assembler, 1, assoc=7)  # the handler of an aborted association returns late
    time.sleep(0.3)
    assert [e.count for e in assembler.due()] == [2]


def test_a_silent_open_association_stops_holding_the_series(assembler, monkeypatch):
    monkeypatch.setattr(assembly, "STALLED_SECONDS", 0.2)
    store(assembler, 0, assoc=3)
    time.sleep(0.3)
    assert assembler.due() == []  # still within stall + quiet
    time.sleep(0.2)
    assert [e.count for e in assembler.due()] == [1]


def test_a_reopened_series_waits_before_it_is_due_again(assembler):
    store(assembler, 0)
    assembler.association_ended(1)
    time.sleep(0.3)
    [entry] = assembler.due()
    assembler.reopen(entry, after_seconds=0.3)
    assert assembler.due() == []
    time.sleep(0.35)
    assert [e.series_uid for e in assembler.due()] == [SERIES]


def test_a_temporary_file_left_by_a_crash_is_not_an_instance(assembler):
    store(assembler, 1)
    series_dir = assembler.spool.series_dir(STUDY, SERIES)
    (series_dir / ".tmp-k2j3h4.dcm").write_bytes(b"half an instance")  # write_atomic cut short by kill -9
    assert [p.name for p in assembler.spool.instances(STUDY, SERIES)] == ["1.2.3.4.1.dcm"]
    fresh = Assembler(assembler.spool, assembler.ledger, quiet_seconds=0.2)
    fresh.recover()
    assert fresh._open[STUDY, SERIES].count == 1


def test_an_instance_is_written_once_and_partial_writes_are_cleared_at_start(tmp_path):
    spool = Spool(tmp_path / "spool").ensure()
    path = spool.instance_path(STUDY, SERIES, "1.2.3.4.1")
    make_dirs(path.parent)
    assert write_new(path, b"first") and not write_new(path, b"second")  # a second sender's copy is not written
    assert path.read_bytes() == b"first" and [p.name for p in path.parent.iterdir()] == [path.name]
    (path.parent / ".tmp-abc.dcm").write_bytes(b"cut short")
    assert remove_partial_writes(spool.root / "series") == 1
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_one_multiframe_instance_is_a_whole_series_when_its_association_ends(tmp_path):
    # An Enhanced CT/MR instance typically holds the whole series: no quiet period to wait for.
    spool = Spool(tmp_path / "spool").ensure()
    ledger = Ledger(spool.ledger_path)
    assembler = Assembler(spool, ledger, quiet_seconds=60)
    ingest = Ingest(spool, ledger, assembler)
    raw = Path(get_testdata_file("eCT_Supplemental.dcm")).read_bytes()
    assert ingest.store(raw, session=1, sender="SCANNER", host="127.0.0.1", via="C-STORE from SCANNER").stored
    assert assembler.due() == []  # its association may still send more
    ingest.session_ended(1)
    [entry] = assembler.due()
    assert entry.count == 1
