"""The QA of every output series: qa.png and qa.json beside the outputs of `srnode process`, the
consistency check and its threshold, and the flag in the SeriesDescription of a series that fails it."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread

from pipelines import qa, weights
from pipelines.dicom.derived import LO_MAX, flag_description, series_description
from tests import series_factory as make
from tests.test_cli_process import process


def _only_output(summary: dict, out) -> tuple[dict, object]:
    [entry] = summary["series"]
    assert entry["status"] == "done", entry
    [output] = entry["outputs"]
    return output, out / output["series_uid"]


def test_process_writes_a_qa_picture_and_numbers_beside_the_outputs(tmp_path):
    [src_path] = make.ct_small(tmp_path / "in", "qa-ok")
    code, summary, stderr = process(str(tmp_path / "in"), "--pipeline", "interp", "--set", "scale=2",
                                    "--out", str(tmp_path / "out"))
    assert code == 0 and "WARNING" not in stderr
    output, folder = _only_output(summary, tmp_path / "out")
    record = json.loads((folder / "qa.json").read_text())
    src, [out] = dcmread(src_path), [dcmread(p) for p in folder.glob("*.dcm")]

    assert record["pipeline"] == "interp" and record["options"]["method"] == "lanczos"
    assert record["model"] == "interp (lanczos)" and record["weights"] == []
    assert record["consistency"]["compared"] == 1 and record["consistency"]["psnr_db"] > 45
    assert record["threshold_db"] == qa.load_thresholds(weights.weights_dir())["interpolation"]["lanczos"]["threshold_db"]
    assert record["passed"] is True and output["qa"]["passed"] is True
    pixels = src.pixel_array * float(src.RescaleSlope) + float(src.RescaleIntercept)
    assert record["input_range"] == [float(pixels.min()), float(pixels.max())]
    low, high = record["output_range"]
    assert low >= pixels.min() - 0.02 * np.ptp(pixels) and high <= pixels.max() + 0.02 * np.ptp(pixels)
    assert record["seconds"] >= 0 and record["qa_seconds"] >= 0
    assert "QA" not in out.SeriesDescription
    # No patient data in the numbers (UIDs are left out too).
    text = json.dumps(record)
    for value in (src.PatientName, src.PatientID, src.StudyDate, src.StudyInstanceUID, src.SeriesInstanceUID):
        assert str(value) not in text
    picture = Image.open(io.BytesIO((folder / "qa.png").read_bytes()))
    size = min(out.Rows, qa.CROP)
    assert picture.format == "PNG" and picture.size == (3 * size + 8, size + qa.LEGEND_H)
    assert not (tmp_path / "out" / "tmp-in-progress").exists()


def test_an_output_inconsistent_with_its_input_is_flagged_and_still_delivered(tmp_path):
    """White noise has detail no interpolation can keep: Lanczos x2 degraded back is far from it."""
    ds = make._relabelled([dcmread(make.get_testdata_file("CT_small.dcm"))], "qa-noise")[0]
    rng = np.random.default_rng(0)
    ds.PixelData = rng.integers(0, 1000, (ds.Rows, ds.Columns)).astype(np.int16).tobytes()
    ds.SeriesDescription = "A series description long enough to be cut for the flag"
    (tmp_path / "in").mkdir()
    ds.save_as(tmp_path / "in" / "noise.dcm", enforce_file_format=True)
    code, summary, stderr = process(str(tmp_path / "in"), "--pipeline", "interp", "--set", "scale=2",
                                    "--out", str(tmp_path / "out"))
    assert code == 0
    output, folder = _only_output(summary, tmp_path / "out")
    record = json.loads((folder / "qa.json").read_text())
    assert record["passed"] is False and output["qa"]["passed"] is False
    assert record["consistency"]["psnr_db"] < record["threshold_db"] - 10
    [out] = [dcmread(p) for p in folder.glob("*.dcm")]
    assert out.SeriesDescription.endswith(f" - {qa.FLAG} - research use") and len(out.SeriesDescription) <= LO_MAX
    assert "super-res x2 lanczos" in out.SeriesDescription
    [line] = [line for line in stderr.splitlines() if "WARNING" in line]
    assert "below the threshold" in line and str(ds.PatientName) not in line and "long enough" not in line


@pytest.mark.parametrize("original, description, version", [
    ("CHEST PA", "super-res x2 MDRN (AI)", 1),
    (None, "super-res x2 lanczos (interpolation)", 1),
    ("An original series description that fills most of the room", "in-plane only super-res x2 cnn", 3),
    ("CHEST PA (STANDING PORTABLE) 2 view with markers and grid", "super-res x2 Hydra (AI)", 1),
    ("Head", "super-res x2, slices x2 lanczos (interpolation)", 12),  # the flag cuts the pipeline's words
])
def test_the_flag_is_added_as_the_writer_would_have_written_it(original, description, version):
    written = series_description(description, version, original)
    flagged = flag_description(written, qa.FLAG, version, original)
    assert flagged == series_description(description, version, original, qa.FLAG)
    assert f" - {qa.FLAG} - research use" in flagged and len(flagged) <= LO_MAX
    assert flag_description(flagged, qa.FLAG, version, original) == flagged  # once only


def test_thresholds_apply_to_the_weights_they_were_measured_on():
    table = {"models": {"mdrn.safetensors": {"sha256": "a" * 64, "threshold_db": 47.5}},
             "interpolation": {"lanczos": {"threshold_db": 44.0}}}
    assert qa.threshold_for(table, [{"file": "mdrn.safetensors", "sha256": "a" * 64}], "MDRN SR")[0] == 47.5
    value, why = qa.threshold_for(table, [{"file": "mdrn.safetensors", "sha256": "b" * 64}], "MDRN SR")
    assert value is None and "srnode eval qa" in why  # retrained: not measured yet, not flagged
    assert qa.threshold_for(table, [], "sr3d (lanczos)")[0] == 44.0
    assert qa.threshold_for(table, [], "interp (cubic)")[0] is None


@pytest.mark.parametrize("modality, eval_modality", [("CR", "CXR"), ("CT", "CT")])
def test_eval_qa_holds_outputs_to_the_rules_the_derived_writer_applies(modality, eval_modality):
    """`srnode eval qa` measures outputs under the writer's value rules 1 and 3 (range + 2 %, and on a
    projection image the local range): the same function, so the same values."""
    from pydicom import Dataset

    from pipelines.dicom import valid_field
    from pipelines.evaluation import eval_qa

    rng = np.random.default_rng(0)
    image = rng.uniform(100.0, 900.0, (24, 20)).astype(np.float32)
    image[8:12, :] = 2000.0  # an edge that an SR output overshoots
    out = rng.uniform(-500.0, 3000.0, (48, 40)).astype(np.float32)
    ds = Dataset()
    ds.Modality = modality
    valid_field.detect(ds, image.astype(np.int32) + 1, image, None, None)  # no air: nothing outside the field
    valid_field.note_range([ds], image)
    written, outside, _ = valid_field.guard(out, ds)
    assert outside is None
    measured = eval_qa.guard(out, image, eval_modality)
    assert np.array_equal(measured, written)
    local_rule = written[:12].max() <= 900.0 + valid_field.MARGIN * 1900.0 + 1e-3  # far from the bright rows
    assert local_rule == (modality == "CR")
