"""A job run by a worker: always ends in a result, never loops, delivers what is on disk."""
from __future__ import annotations

import shutil

from pydicom import dcmread

from node.jobs import MAX_STARTS, execute_job, write_job_spec
from node.spool import Spool
from tests import series_factory as make


def job(tmp_path, n=3):
    spool = Spool(tmp_path / "spool").ensure()
    files = make.ct_volume(spool.root / "series" / "1.2" / "1.2.3", "job", n)
    write_job_spec(spool, 1, files, "interp", {"inplane_scale": 2, "through_scale": 1}, 1)
    return spool


def test_a_job_runs_once_and_a_second_run_returns_the_same_result(tmp_path):
    spool = job(tmp_path)
    first = execute_job(spool, 1)
    assert first["state"] == "done" and len(first["outputs"]) == 3
    again = execute_job(spool, 1)
    assert again == first


def test_outputs_left_complete_by_a_killed_run_are_delivered_as_they_are_on_disk(tmp_path):
    spool = job(tmp_path)
    first = execute_job(spool, 1)
    (spool.job_dir(1) / "result.json").unlink()  # the worker died after renaming out/, before result.json
    again = execute_job(spool, 1)
    assert again["outputs"] == first["outputs"] and again["started"] == first["started"]
    for output in again["outputs"]:
        assert str(dcmread(spool.abs(output["file"])).SOPInstanceUID) == output["sop_uid"]


def test_a_job_whose_worker_keeps_dying_fails_instead_of_looping(tmp_path):
    spool = job(tmp_path)
    # What MAX_STARTS runs killed by the kernel (OOM) leave behind: the start count and no result.
    (spool.job_dir(1) / "starts").write_text(str(MAX_STARTS))
    result = execute_job(spool, 1)
    assert result["state"] == "failed" and f"interrupted {MAX_STARTS} times" in result["reason"]


def test_a_job_without_its_inputs_fails_with_the_reason(tmp_path):
    spool = job(tmp_path)
    shutil.rmtree(spool.root / "series")
    result = execute_job(spool, 1)
    assert result["state"] == "failed" and "FileNotFoundError" in result["reason"]


def test_a_job_without_its_spec_still_gets_a_result(tmp_path):
    spool = job(tmp_path)
    (spool.job_dir(1) / "job.json").unlink()
    result = execute_job(spool, 1)
    assert result["state"] == "failed" and "job.json" in result["reason"]
