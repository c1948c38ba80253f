"""`srnode process` offline, and the volume-assembly cases of ../shared/data/ct end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydicom import dcmread

from tests import series_factory as make
from tests.dicom_checks import dciodvfy_errors, new_dciodvfy_errors
from tests.paths import shared


def process(*args: str) -> tuple[int, dict, str]:
    out = subprocess.run([sys.executable, "-m", "node.cli", "process", "--quiet", *args],
                         capture_output=True, text=True, timeout=300)
    return out.returncode, json.loads(out.stdout), out.stderr


def test_process_ct_small_writes_a_valid_derived_series(tmp_path):
    files = make.ct_small(tmp_path / "in", "process-ct")
    code, summary, _ = process(str(tmp_path / "in"), "--pipeline", "interp", "--set", "scale=2",
                               "--set", "method=lanczos", "--out", str(tmp_path / "out"))
    assert code == 0
    [entry] = summary["series"]
    assert entry["status"] == "done"
    [output] = entry["outputs"]
    [path] = list((tmp_path / "out" / output["series_uid"]).glob("*.dcm"))
    out, src = dcmread(path), dcmread(files[0])
    assert (out.Rows, out.Columns) == (2 * src.Rows, 2 * src.Columns)
    assert dciodvfy_errors(path) == []
    # The same input and options give the same UIDs: a rerun is recognisably the same output.
    code, again, _ = process(str(tmp_path / "in"), "--pipeline", "interp", "--set", "scale=2",
                             "--set", "method=lanczos", "--out", str(tmp_path / "out2"))
    assert again["series"][0]["outputs"][0]["series_uid"] == output["series_uid"]


def test_process_rejects_bad_options_with_the_key():
    out = subprocess.run([sys.executable, "-m", "node.cli", "process", "x", "--pipeline", "interp",
                          "--set", "method=sinc", "--out", "/tmp/never"], capture_output=True, text=True)
    assert out.returncode != 0 and "method" in out.stderr


@pytest.mark.shared_data
@pytest.mark.parametrize("folder, status, words", [
    ("philips_phantom_ct_5mm", "done", []),
    ("dcmqi_ge_abdomen_ct_3slice", "done", []),
    ("ge_head_ct_tilt", "refused", ["tilt"]),
    ("totalseg_basel_abdomen_ct", "refused", ["UID"]),
])
def test_shared_ct_cases_end_in_a_result_or_a_clear_refusal(tmp_path, folder, status, words):
    src = shared("ct", folder)
    code, summary, stderr = process(str(src), "--pipeline", "interp", "--set", "inplane_scale=1",
                                    "--set", "through_scale=2", "--set", "method=linear", "--out", str(tmp_path))
    assert "Traceback" not in stderr
    [entry] = summary["series"]
    assert entry["status"] == status, entry
    assert code == (0 if status == "done" else 1)
    for word in words:
        assert word.lower() in entry["reason"].lower()
    if status == "done":
        n = sum(1 for p in src.iterdir() if p.is_file() and p.name != "manifest.csv")
        [output] = entry["outputs"]
        assert output["instances"] == 2 * n - 1
        first = sorted((tmp_path / output["series_uid"]).glob("*.dcm"))[0]
        source = next(p for p in sorted(src.iterdir()) if p.is_file() and p.name != "manifest.csv")
        assert new_dciodvfy_errors(first, source) == []  # some sources are already non-conformant
