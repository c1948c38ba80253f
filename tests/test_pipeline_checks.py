"""Pipelines refuse what they cannot compute from, and never deliver an output with NaN in it (issue 21).

Values that pass the node's ingest checks (RescaleIntercept 1e9 is below its 1e10 cap) but break the
pipeline's 32-bit arithmetic, geometry the loader would compare with NaN, and outputs with non-finite
values: the job ends refused or failed with the element and the reason, and nothing is delivered.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
from pydicom import Dataset

import pipelines
from node.jobs import execute_job, run_pipeline, write_job_spec
from node.spool import Spool
from pipelines.dicom import input_checks
from pipelines.dicom.series import decode, load_series
from pipelines.models import intensity
from tests.peers import free_port, storescu
from tests.synthetic import ct_series, write_all

OPTIONS = {"inplane_scale": 2, "through_scale": 1}


def _set(keyword, value, which=None):
    def change(series):
        for k, ds in enumerate(series):
            if which is None or k == which:
                setattr(ds, keyword, value)
    return change


def _duplicate(series):
    series[1].ImagePositionPatient = list(series[0].ImagePositionPatient)


def _rows(series):
    series[2].Rows = int(series[2].Rows) // 2


BAD = {
    "RescaleIntercept 1e9 on 16-bit data": (_set("RescaleIntercept", "1e9"), "(0028,1052) RescaleIntercept 1e+09"),
    "RescaleSlope 1e-9 with intercept -1024": (lambda s: (_set("RescaleSlope", "1e-9")(s),
                                                          _set("RescaleIntercept", "-1024")(s)),
                                               "beyond the 4194304 that 32-bit arithmetic keeps apart"),
    "RescaleSlope NaN": (_set("RescaleSlope", "NaN"), "(0028,1053) RescaleSlope is not a finite number"),
    "RescaleSlope 0": (_set("RescaleSlope", "0"), "(0028,1053) RescaleSlope is 0"),
    "ImageOrientationPatient NaN": (_set("ImageOrientationPatient", ["1", "0", "0", "0", "NaN", "0"]),
                                    "(0020,0037) ImageOrientationPatient is not a finite number"),
    "ImageOrientationPatient zero vectors": (_set("ImageOrientationPatient", ["0"] * 6),
                                             "not a pair of orthogonal unit vectors"),
    "ImageOrientationPatient not orthogonal": (_set("ImageOrientationPatient", ["1", "0", "0", "0.7", "0.7", "0"]),
                                               "not a pair of orthogonal unit vectors"),
    "one slice turned": (_set("ImageOrientationPatient", ["0", "1", "0", "0", "0", "-1"], which=1),
                         "different orientations"),
    "ImagePositionPatient inf": (_set("ImagePositionPatient", ["0", "inf", "0"], which=2),
                                 "(0020,0032) ImagePositionPatient is not a finite number"),
    "two slices at one position": (_duplicate, "duplicated"),
    "PixelSpacing 0": (_set("PixelSpacing", ["0", "0"]), "PixelSpacing is missing or zero"),
    "PixelSpacing 5 km": (_set("PixelSpacing", ["5e6", "5e6"]), "(0028,0030) PixelSpacing 5e+06\\5e+06 mm is outside"),
    "PixelSpacing 1 nm": (_set("PixelSpacing", ["1e-6", "1e-6"]), "(0028,0030) PixelSpacing 1e-06\\1e-06 mm"),
    "one slice with other Rows": (_rows, "different matrix sizes (Rows/Columns)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_series_the_pipeline_cannot_compute_from_is_refused_naming_the_element(case, tmp_path):
    change, words = BAD[case]
    series = ct_series(3)
    change(series)
    with pytest.raises(pipelines.Refusal) as refused:
        run_pipeline(series, "interp", OPTIONS, tmp_path)
    assert words in str(refused.value)
    assert not list(tmp_path.glob("*.dcm"))


def test_the_rescale_bound_is_where_float32_starts_merging_stored_values():
    """What the check stands for: with intercept 1e9 the 16-bit stored values of CT_small collapse
    to a few dozen float32 values; with a real CT rescale (slope 1, intercept -1024) every stored
    value stays itself."""
    ds = ct_series(1)[0]
    stored = len(np.unique(ds.pixel_array))
    ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
    assert len(np.unique(decode(ds))) == stored
    input_checks.check_inputs([ds])
    ds.RescaleIntercept = "1e9"
    assert len(np.unique(decode(ds))) < stored / 10
    with pytest.raises(pipelines.Refusal):
        input_checks.check_inputs([ds])


def test_a_ct_that_is_one_value_in_the_ct_window_is_refused():
    """Slope 1e-9 with intercept 0 keeps the values apart in float32 (it passes the rescale check),
    but 16-bit data then spans 6.5e-5 HU: the CT networks' window would see one value."""
    series = ct_series(2)
    volume = load_series(series)
    assert intensity.normaliser(volume.voxels, "CT") == intensity.CT_RANGE
    for ds in series:
        ds.RescaleSlope, ds.RescaleIntercept = "1e-9", "0"
    volume = load_series(series)
    with pytest.raises(pipelines.Refusal, match=r"no contrast in the CT window .*\(0028,1053\) RescaleSlope"):
        intensity.normaliser(volume.voxels, "CT")


def test_an_output_with_non_finite_values_fails_the_job_and_nothing_is_kept(tmp_path, monkeypatch, caplog):
    """A model that returns NaN (a fault no peer can send: injected into interp's resampler)."""
    import pipelines.interp

    spool = Spool(tmp_path / "spool").ensure()
    (spool.root / "series" / "a").mkdir(parents=True)
    files = write_all(ct_series(3), spool.root / "series" / "a", "in")
    write_job_spec(spool, 1, files, "interp", OPTIONS, 1)
    real = pipelines.interp.apply_axis
    monkeypatch.setattr(pipelines.interp, "apply_axis", lambda *a: np.where(real(*a) > 900, np.nan, real(*a)))
    with caplog.at_level("INFO", logger="node.jobs"):
        result = execute_job(spool, 1)
    assert result["state"] == "failed"
    assert "non-finite pixel value" in result["reason"] and "not delivered" in result["reason"]
    assert not (spool.job_dir(1) / "out").exists() and "outputs" not in result
    assert not [r for r in caplog.records if r.exc_info], "no traceback for an invalid output"
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("job 1 failed")]


def test_an_output_header_with_a_non_finite_value_is_not_kept():
    ds = Dataset()
    ds.SliceThickness = "1.0"
    input_checks.check_output(ds)
    item = Dataset()
    item.ImagePositionPatient = ["0", "nan", "0"]
    ds.PlanePositionSequence = [item]
    with pytest.raises(pipelines.InvalidOutput, match=r"PlanePositionSequence > \(0020,0032\) ImagePositionPatient"):
        input_checks.check_output(ds)
    ds.FloatPixelData = np.array([0, math.inf], "<f4").tobytes()
    ds.PlanePositionSequence = []
    with pytest.raises(pipelines.InvalidOutput, match="FloatPixelData"):
        input_checks.check_output(ds)


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk storescu is not installed")
def test_through_the_node_the_job_is_refused_with_the_reason_and_nothing_is_delivered(tmp_path, make_node):
    """RescaleIntercept 1e9 passes ingest (cap 1e10): the node stores it, the job is refused with the
    element named in `srnode jobs` and in one log line, and no delivery is ever made."""
    series = ct_series(3)
    for ds in series:
        ds.RescaleIntercept = "1e9"
    (tmp_path / "in").mkdir()
    files = write_all(series, tmp_path / "in")
    node = make_node(routes=[{"name": "ct", "match": {"Modality": "CT"}, "pipeline": "interp",
                              "options": OPTIONS, "send_to": ["pacs"]}],
                     destinations={"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1",
                                            "port": free_port()}})
    assert storescu(files, node.port).returncode == 0
    jobs = node.wait_jobs(lambda jobs: jobs and jobs[0]["state"] == "refused", timeout=30, what="job refused")
    assert "(0028,1052) RescaleIntercept 1e+09" in jobs[0]["reason"], jobs
    assert not jobs[0].get("deliveries"), jobs
    log = node.log()
    assert "Traceback" not in log
    lines = [line for line in log.splitlines() if "RescaleIntercept 1e+09" in line]
    # one warning from the node (the embedded worker adds its own INFO line, as for every job)
    assert len([line for line in lines if "WARNING" in line]) == 1, lines
    assert all(str(series[0].PatientName) not in line for line in lines)
    assert not list(node.spool.glob("jobs/*/out/*.dcm"))


def test_a_normal_series_still_runs(tmp_path):
    outputs = run_pipeline(copy.deepcopy(ct_series(3)), "interp", OPTIONS, tmp_path)
    assert len(outputs) == 3


def test_srnode_process_reports_the_refusal_and_writes_nothing(tmp_path):
    series = ct_series(2)
    for ds in series:
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "nan", "0"]
    (tmp_path / "in").mkdir()
    write_all(series, tmp_path / "in")
    out = subprocess.run([sys.executable, "-m", "node.cli", "process", "--quiet", str(tmp_path / "in"), "--pipeline",
                          "interp", "--set", "inplane_scale=2", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=60)
    summary = json.loads(out.stdout)
    assert out.returncode == 1, out.stderr
    assert summary["series"][0]["status"] == "refused"
    assert "(0020,0037) ImageOrientationPatient is not a finite number" in summary["series"][0]["reason"]
    assert not list((tmp_path / "out").rglob("*.dcm"))
