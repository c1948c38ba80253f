"""Enhanced and Legacy Converted Enhanced CT/MR: frames -> a volume, refusals with reasons, and the
derived result written in the same family (one multi-frame instance of the source's SOP class)."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from pipelines.arbitrary import PIPELINE as ARBITRARY
from pipelines.base import Refusal, RunContext
from pipelines.dicom.series import Volume, load_series
from pipelines.interp import PIPELINE as INTERP
from pipelines.sr3d import PIPELINE as SR3D
from tests.dicom_checks import check_enhanced_derived, check_grid
from tests.paths import shared
from tests.series_factory import cropped, legacy_enhanced_datasets
from tests.synthetic import read_testdata

CONTEXT = RunContext(uid_seed="multiframe test", software_version="test")


def _run(datasets: list[Dataset], options: dict, pipeline=INTERP) -> Dataset:
    [out] = list(pipeline.run(datasets, options, CONTEXT))
    return out


def _saved(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


# ---- pydicom-data: a real Enhanced CT, the Enhanced MR without functional groups -----------------

def test_enhanced_ct_frames_make_a_volume_sorted_along_the_normal() -> None:
    ds = read_testdata("eCT_Supplemental.dcm")
    vol = load_series([ds])
    assert isinstance(vol, Volume) and vol.shape == (2, 512, 512)
    assert vol.slice_spacing == pytest.approx(10.0) and vol.irregular is None
    np.testing.assert_allclose(vol.normal, [0, 0, -1])
    assert [f.number for f in vol.datasets] == [2, 1]  # frame 2 (z -149) comes first along -z
    np.testing.assert_allclose(vol.origin, [99.5, -301.5, -149.0])
    frame = ds.pixel_array[1]
    inside = frame > frame.min()  # the air outside the field takes the darkest real value (valid_field)
    np.testing.assert_array_equal(vol.voxels[0][inside], frame[inside].astype(np.float32) - 1024)  # rescale applied
    assert ds.InstanceNumber == 1, "reading frames must not change the instance"


def test_enhanced_ct_in_gives_one_enhanced_ct_out_on_the_new_grid(tmp_path: Path) -> None:
    source = read_testdata("eCT_Supplemental.dcm")
    source_path = _saved(source, tmp_path / "source.dcm")
    out = _run([source], {"inplane_scale": 2, "through_scale": 2, "method": "linear"})
    out_path = _saved(out, tmp_path / "out.dcm")
    check_enhanced_derived(source, pydicom.dcmread(out_path), source_path, out_path)
    check_grid(source_path, out_path, 2, 2)
    shared_groups = out.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared_groups.PixelMeasuresSequence[0].PixelSpacing] == pytest.approx([0.194336] * 2)
    assert list(shared_groups.CTImageFrameTypeSequence[0].FrameType) == ["DERIVED", "PRIMARY", "PERFUSION", "RESAMPLED"]
    contents = [item.FrameContentSequence[0] for item in out.PerFrameFunctionalGroupsSequence]
    assert [c.InStackPositionNumber for c in contents] == [1, 2, 3]  # the source's in-stack sense (1 at z -149)
    z = [float(item.PlanePositionSequence[0].ImagePositionPatient[2]) for item in out.PerFrameFunctionalGroupsSequence]
    assert z == pytest.approx([-149.0, -154.0, -159.0])
    refs = [[int(r.ReferencedFrameNumber) for r in item.DerivationImageSequence[0].SourceImageSequence]
            for item in out.PerFrameFunctionalGroupsSequence]
    assert refs == [[2], [2, 1], [1]]
    [dimension] = out.DimensionIndexSequence
    assert dimension.DimensionIndexPointer == 0x00200032
    assert [list(c.DimensionIndexValues) if c["DimensionIndexValues"].VM > 1 else [c.DimensionIndexValues]
            for c in contents] == [[1], [2], [3]]


@pytest.mark.parametrize(("pipeline", "options", "label"), [
    (SR3D, {"inplane_scale": 2}, "super-res x2 CNN"),
    (ARBITRARY, {"scale": 2}, "super-res x2 Meta-Upscale"),
], ids=["sr3d", "arbitrary"])
def test_enhanced_ct_through_the_networks_gives_one_enhanced_ct(tmp_path: Path, pipeline, options: dict,
                                                                label: str) -> None:
    """The networks (not only interpolation) on a real Enhanced CT, cut to 128x128 around its centre.
    Both darken this crop's mean by 8-9 HU (interpolation: 1.4), so the content check only keeps the
    frames apart (their means differ by 76 HU): each output frame holds its own source frame."""
    source = cropped(read_testdata("eCT_Supplemental.dcm"), 192, 192, 128, 128)
    source_path = _saved(source, tmp_path / "source.dcm")
    out = _run([pydicom.dcmread(source_path)], options, pipeline)
    out_path = _saved(out, tmp_path / "out.dcm")
    assert out.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2.1" and label in out.SeriesDescription  # Enhanced CT
    check_enhanced_derived(source, pydicom.dcmread(out_path), source_path, out_path)
    check_grid(source_path, out_path, 2, 1, mean_atol=12)


def test_an_enhanced_mr_without_functional_groups_is_refused_with_the_reason() -> None:
    with pytest.raises(Refusal, match="no Shared and Per-frame Functional Groups Sequence"):
        load_series([read_testdata("emri_small.dcm")])


def test_other_multiframe_classes_are_refused_by_name() -> None:
    with pytest.raises(Refusal, match="multi-frame Secondary Capture Image Storage instances are not supported"):
        load_series([read_testdata("SC_rgb_2frame.dcm")])


def _frames(ds: Dataset) -> list[Dataset]:
    return list(ds.PerFrameFunctionalGroupsSequence)


def _per_frame(ds: Dataset, frame: int, group: str) -> Dataset:
    """Frame ``frame``'s own copy of a shared functional group (per-frame values win)."""
    item = ds.PerFrameFunctionalGroupsSequence[frame]
    if group not in item:
        setattr(item, group, copy.deepcopy(ds.SharedFunctionalGroupsSequence[0][group].value))
    return item[group][0]


def _orientation(ds):
    _per_frame(ds, 1, "PlaneOrientationSequence").ImageOrientationPatient = [0, 1, 0, 0, 0, -1]


def _pixel_measures(ds):
    _per_frame(ds, 1, "PixelMeasuresSequence").PixelSpacing = [0.5, 0.5]


def _stacks(ds):
    _frames(ds)[1].FrameContentSequence[0].StackID = "2"


def _temporal(ds):
    for i, item in enumerate(_frames(ds)):
        item.FrameContentSequence[0].TemporalPositionIndex = i + 1


def _echoes(ds):
    extra = copy.deepcopy(ds.DimensionIndexSequence[0])
    extra.DimensionIndexPointer, extra.FunctionalGroupPointer = 0x00189082, 0x00189114  # Effective Echo Time
    extra.DimensionDescriptionLabel = "Effective Echo Time"
    ds.DimensionIndexSequence.append(extra)
    for i, item in enumerate(_frames(ds)):
        item.FrameContentSequence[0].DimensionIndexValues = [1, i + 1, i + 1]


def _no_position(ds):
    del _frames(ds)[1].PlanePositionSequence


def _same_position(ds):
    _frames(ds)[1].PlanePositionSequence = copy.deepcopy(_frames(ds)[0].PlanePositionSequence)


def _frame_count(ds):
    ds.NumberOfFrames = 3


@pytest.mark.parametrize(("change", "match"), [
    (_orientation, "2 different orientations"),
    (_pixel_measures, "different Pixel Measures"),
    (_stacks, "2 stacks"),
    (_temporal, "2 temporal positions"),
    (_echoes, "dimension 'Effective Echo Time'"),
    (_no_position, "frame 2 of the multi-frame instance has no Plane Position"),
    (_same_position, "duplicated"),
    (_frame_count, "2 items for 3 frames"),
], ids=lambda v: v.__name__.strip("_") if callable(v) else "")
def test_what_cannot_be_one_volume_is_refused_with_the_reason(change, match: str) -> None:
    ds = read_testdata("eCT_Supplemental.dcm")
    change(ds)
    with pytest.raises(Refusal, match=match):
        load_series([ds])


# ---- ../shared/data: Legacy Converted Enhanced CT and MR from real series (highdicom) -------------

@pytest.mark.shared_data
def test_legacy_converted_ct_through_plane_gives_one_legacy_converted_ct(tmp_path: Path) -> None:
    [source] = legacy_enhanced_datasets(shared("ct", "philips_phantom_ct_5mm"), "lce ct", first=10, count=4)
    source_path = _saved(source, tmp_path / "source.dcm")
    out = _run([pydicom.dcmread(source_path)], {"inplane_scale": 2, "through_scale": 2, "method": "linear"})
    out_path = _saved(out, tmp_path / "out.dcm")
    assert out.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2.2"  # Legacy Converted Enhanced CT Image Storage
    check_enhanced_derived(source, pydicom.dcmread(out_path), source_path, out_path)
    check_grid(source_path, out_path, 2, 2)
    for item in out.PerFrameFunctionalGroupsSequence:  # values of the converted slices are not the new frames'
        assert "ConversionSourceAttributesSequence" not in item
        converted = item.UnassignedPerFrameConvertedAttributesSequence[0]
        assert "InstanceNumber" not in converted and "SliceLocation" not in converted


@pytest.mark.shared_data
def test_legacy_converted_mr_in_plane_gives_one_legacy_converted_mr(tmp_path: Path) -> None:
    [source] = legacy_enhanced_datasets(shared("mr", "decubitus_hfs_t1_sag"), "lce mr", first=10, count=3)
    source_path = _saved(source, tmp_path / "source.dcm")
    out = _run([pydicom.dcmread(source_path)], {"inplane_scale": 2, "method": "lanczos"})
    out_path = _saved(out, tmp_path / "out.dcm")
    check_enhanced_derived(source, pydicom.dcmread(out_path), source_path, out_path)
    check_grid(source_path, out_path, 2, 1)


MR_CROP = (96, 96, 64, 64)  # 64x64 pixels of anatomy in the middle of the 256x256 slices


@pytest.mark.shared_data
@pytest.mark.parametrize(("pipeline", "options", "label", "through"), [
    (SR3D, {"inplane_scale": 2, "through_scale": 2}, "super-res x2, slices x2 CNN", 2),
    (ARBITRARY, {"scale": 2}, "super-res x2 Meta-Upscale", 1),
], ids=["sr3d-through", "arbitrary"])
def test_legacy_converted_mr_through_the_networks_gives_one_legacy_converted_mr(tmp_path: Path, pipeline,
                                                                              options: dict, label: str,
                                                                              through: int) -> None:
    [source] = legacy_enhanced_datasets(shared("mr", "decubitus_hfs_t1_sag"), "lce mr net", first=10, count=3,
                                        crop=MR_CROP)
    source_path = _saved(source, tmp_path / "source.dcm")
    out = _run([pydicom.dcmread(source_path)], options, pipeline)
    out_path = _saved(out, tmp_path / "out.dcm")
    assert out.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4.4" and label in out.SeriesDescription
    assert int(out.NumberOfFrames) == 3 * through
    check_enhanced_derived(source, pydicom.dcmread(out_path), source_path, out_path)
    check_grid(source_path, out_path, 2, through, slab_edges=through > 1)
