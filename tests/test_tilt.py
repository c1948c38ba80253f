"""Tilted and irregularly spaced stacks: in-plane only, every slice where its source slice is, and
the SeriesDescription says so; a through-plane-only request is refused with the reason."""
from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset

from pipelines.arbitrary import PIPELINE as ARBITRARY
from pipelines.base import Refusal, RunContext
from pipelines.dicom.series import Volume, load_series
from pipelines.interp import PIPELINE as INTERP
from pipelines.sr3d import PIPELINE as SR3D
from tests.dicom_checks import check_in_place, new_dciodvfy_errors
from tests.paths import shared
from tests.series_factory import tilted_ct
from tests.synthetic import ct_series

CONTEXT = RunContext(uid_seed="tilt test", software_version="test")
PIPELINES = {"interp": (INTERP, {"method": "linear"}, "inplane_scale"),
             "sr3d": (SR3D, {"model": "lanczos"}, "inplane_scale"),
             "arbitrary": (ARBITRARY, {"model": "lanczos"}, "scale")}


def _read_folder(folder: Path) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir()) if p.suffix != ".csv"]


def test_a_tilted_or_irregular_stack_loads_and_says_why_it_is_not_regular() -> None:
    tilted = load_series(ct_series(4, shear_mm=1.7))
    assert isinstance(tilted, Volume) and tilted.slice_spacing is None
    assert tilted.irregular.startswith("gantry tilt 18.8 deg")
    gaps = load_series(ct_series(4, offsets=[0, 5, 10, 17]))
    assert gaps.irregular == "irregular slice spacing (gaps from 5.00 to 7.00 mm)"
    assert load_series(ct_series(4)).irregular is None


@pytest.mark.parametrize("name", PIPELINES)
@pytest.mark.parametrize("stack", [{"shear_mm": 1.7}, {"offsets": [0, 5, 10, 17]}], ids=["tilt", "gaps"])
def test_through_plane_is_dropped_and_in_plane_runs(name: str, stack: dict) -> None:
    pipeline, options, scale_key = PIPELINES[name]
    sources = ct_series(4, **stack)
    outputs = list(pipeline.run(sources, {**options, scale_key: 2, "through_scale": 2}, CONTEXT))
    check_in_place(sources, outputs, 2)
    with pytest.raises(Refusal, match="through-plane resampling needs regularly spaced slices along their normal; "
                                      "this series has (gantry tilt|irregular)"):
        list(pipeline.run(ct_series(4, **stack), {**options, scale_key: 1, "through_scale": 2}, CONTEXT))


@pytest.mark.shared_data
def test_the_real_tilted_ge_head_ct_gets_an_in_plane_result(tmp_path: Path, caplog) -> None:
    folder = shared("ct", "ge_head_ct_tilt")
    sources = _read_folder(folder)
    with caplog.at_level("INFO", logger="pipelines.dicom.series"):
        outputs = list(INTERP.run(sources, {"inplane_scale": 2, "through_scale": 2, "method": "linear"}, CONTEXT))
    assert (f"series {sources[0].SeriesInstanceUID}: through-plane resampling skipped, in-plane only: "
            "gantry tilt 18.5 deg") in caplog.text
    check_in_place(sources, outputs, 2)
    assert outputs[0].SeriesDescription.endswith("in-plane only super-res x2 linear (interpolation) - research use")
    assert "gantry tilt 18.5 deg" in outputs[0].DerivationDescription
    source_paths = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in sorted(folder.glob("*.dcm"))}
    for k, out in enumerate(outputs[::9]):
        path = tmp_path / f"out{k}.dcm"
        out.save_as(path, enforce_file_format=True)
        assert new_dciodvfy_errors(path, source_paths[out.SourceImageSequence[0].ReferencedSOPInstanceUID]) == []


@pytest.mark.shared_data
def test_the_real_tilted_ge_head_ct_through_the_sr3d_cnn_is_in_plane_only(tmp_path: Path, caplog) -> None:
    """The shipped CT route (sr3d, x2 in-plane and between slices) on 3 slices of the tilted GE head CT,
    cut to 192x192 px around the brain: the CNN runs in-plane only, every slice where it was, and the
    log line names the series."""
    paths = tilted_ct(tmp_path / "in", "tilt sr3d", first=10, count=3, crop=(160, 160, 192, 192))
    sources = [pydicom.dcmread(p) for p in paths]
    with caplog.at_level("INFO", logger="pipelines.dicom.series"):
        outputs = list(SR3D.run(sources, {"inplane_scale": 2, "through_scale": 2}, CONTEXT))
    assert (f"series {sources[0].SeriesInstanceUID}: through-plane resampling skipped, in-plane only: "
            "gantry tilt 18.5 deg") in caplog.text
    check_in_place(sources, outputs, 2)
    assert outputs[0].SeriesDescription.endswith("in-plane only super-res x2 CNN - research use")
    assert "gantry tilt 18.5 deg" in outputs[0].DerivationDescription
    assert "through-plane" not in outputs[0].DerivationDescription  # the through-plane network did not run
    by_uid = {ds.SOPInstanceUID: p for ds, p in zip(sources, paths)}
    out = outputs[1]
    out.save_as(tmp_path / "out.dcm", enforce_file_format=True)
    assert new_dciodvfy_errors(tmp_path / "out.dcm", by_uid[out.SourceImageSequence[0].ReferencedSOPInstanceUID]) == []
