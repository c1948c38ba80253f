"""The interp pipeline end to end: options, geometry, conformance (dciodvfy + derived checks)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

import pipelines
from pipelines import interp
from pipelines.base import Refusal, RunContext
from tests.dicom_checks import check_derived, dcentvfy_errors, dciodvfy_errors, new_dciodvfy_errors
from tests.paths import shared
from tests.synthetic import ct_series, read_testdata, write_all

PIPELINE = pipelines.get("interp")
CONTEXT = RunContext(uid_seed="test-seed", software_version="0.1.0")


def _run(datasets, options, context: RunContext = CONTEXT) -> list[pydicom.Dataset]:
    return list(PIPELINE.run(datasets, options, context))


def _round_trip(outputs, folder: Path, stem: str = "out") -> tuple[list[Path], list[pydicom.Dataset]]:
    paths = write_all(outputs, folder, stem)
    return paths, [pydicom.dcmread(p) for p in paths]


def _read_folder(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir()) if p.suffix != ".csv"]


# ---- options -------------------------------------------------------------------------------------

def test_registered_and_defaults() -> None:
    assert PIPELINE.name == "interp" and PIPELINE is interp.PIPELINE
    assert PIPELINE.validate_options({}) == {
        "method": "lanczos", "inplane_scale": 2.0, "through_scale": 1.0, "target_spacing": None}
    assert PIPELINE.validate_options({"scale": 3, "method": "cubic"})["inplane_scale"] == 3.0
    assert PIPELINE.validate_options({"through_scale": 2}) == {
        "method": "lanczos", "inplane_scale": 1.0, "through_scale": 2.0, "target_spacing": None}
    assert PIPELINE.validate_options({"target_spacing": 1.5})["target_spacing"] == [None, None, 1.5]
    norm = PIPELINE.validate_options({"target_spacing": [0.5, 0.5], "through_scale": 2})
    assert norm == {"method": "lanczos", "inplane_scale": None, "through_scale": 2.0,
                    "target_spacing": [0.5, 0.5, None]}
    assert PIPELINE.validate_options(norm) == norm  # normalised options validate to themselves


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"sclae": 2}, "sclae"),
        ({"method": "bilinear"}, "method"),
        ({"scale": 0.5}, "scale"),
        ({"scale": 9}, "scale"),
        ({"scale": "2"}, "scale"),
        ({"scale": True}, "scale"),
        ({"inplane_scale": float("nan")}, "inplane_scale"),
        ({"scale": 2, "inplane_scale": 2}, "inplane_scale"),
        ({"through_scale": 0}, "through_scale"),
        ({"target_spacing": -1}, "target_spacing"),
        ({"target_spacing": [1, 2, 3, 4]}, "target_spacing"),
        ({"target_spacing": [1, None]}, "target_spacing"),
        ({"target_spacing": [0.5, 0.5], "scale": 2}, "scale"),
        ({"target_spacing": 1.0, "through_scale": 2}, "through_scale"),
        ({"scale": 1}, "scale"),
    ],
)
def test_bad_options_name_the_key(options: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        PIPELINE.validate_options(options)


# ---- volumes ---------------------------------------------------------------------------------------

def test_volume_inplane_and_through_plane(tmp_path: Path, strict_pydicom: None) -> None:
    sources = ct_series(4, 5.0)
    progress: list[tuple[int, int]] = []
    context = RunContext(uid_seed="vol", software_version="0.1.0", progress=lambda d, t: progress.append((d, t)))
    iterator = PIPELINE.run(sources, {"scale": 2, "through_scale": 2, "method": "linear"}, context)
    assert iter(iterator) is iterator  # streams: a generator, not a list
    outputs = list(iterator)
    assert len(outputs) == (4 - 1) * 2 + 1
    assert progress[-1] == (7, 7)
    paths, written = _round_trip(outputs, tmp_path)
    check_derived(sources, written)

    by_z = sorted(written, key=lambda ds: float(ds.ImagePositionPatient[2]))
    src_by_z = sorted(sources, key=lambda ds: float(ds.ImagePositionPatient[2]))
    z = [float(ds.ImagePositionPatient[2]) for ds in by_z]
    np.testing.assert_allclose(np.diff(z), 2.5, atol=1e-4)
    assert z[0] == pytest.approx(float(src_by_z[0].ImagePositionPatient[2]))
    first = by_z[0]
    assert (first.Rows, first.Columns) == (256, 256)
    assert float(first.PixelSpacing[0]) == pytest.approx(0.661468 / 2, abs=1e-6)
    # first pixel centre moves by half the spacing change, so the image corner stays put
    x_src = float(src_by_z[0].ImagePositionPatient[0])
    assert float(first.ImagePositionPatient[0]) == pytest.approx(x_src - 0.661468 / 4, abs=1e-5)
    assert float(first.SpacingBetweenSlices) == pytest.approx(2.5)
    assert float(first.SliceThickness) == pytest.approx(5.0)  # kept when upsampling (see interp docstring)
    assert [float(ds.SliceLocation) for ds in by_z] == pytest.approx(
        [float(src_by_z[0].SliceLocation) + 2.5 * k for k in range(7)], abs=1e-4)
    assert [int(ds.InstanceNumber) for ds in by_z] == list(range(1, 8))
    # new slices reference the two bracketing sources; original positions reference one
    assert [len(ds.SourceImageSequence) for ds in by_z] == [1, 2, 1, 2, 1, 2, 1]
    assert by_z[1].SourceImageSequence[1].ReferencedSOPInstanceUID == src_by_z[1].SOPInstanceUID
    # linear midway slice is the mean of its neighbours (slice k carries +10 k)
    mid = by_z[1].pixel_array.astype(float) - by_z[0].pixel_array.astype(float)
    assert np.abs(mid[4:-4, 4:-4] - 5).max() <= 1
    for path in (paths[0], paths[3]):
        assert dciodvfy_errors(path) == []
    source_paths = write_all(sources, tmp_path, "src")
    assert dcentvfy_errors([*source_paths, *paths]) == []  # same patient and study as the sources


def test_inplane_only_keeps_each_slice_position() -> None:
    sources = ct_series(4, offsets=[0, 5.004, 10.0, 15.003])  # regular within tolerance
    outputs = _run(sources, {"scale": 2})
    z_out = sorted(float(ds.ImagePositionPatient[2]) for ds in outputs)
    z_src = sorted(float(ds.ImagePositionPatient[2]) for ds in sources)
    assert z_out == pytest.approx(z_src, abs=1e-6)
    assert all("SpacingBetweenSlices" in ds and float(ds.SpacingBetweenSlices) == 5.0 for ds in outputs)
    check_derived(sources, outputs)


def test_through_plane_reproduces_source_slices() -> None:
    sources = ct_series(3, 2.0)
    outputs = _run(sources, {"through_scale": 2, "method": "lanczos"})
    by_z = sorted(outputs, key=lambda ds: float(ds.ImagePositionPatient[2]))
    src_by_z = sorted(sources, key=lambda ds: float(ds.ImagePositionPatient[2]))
    for k in range(3):
        np.testing.assert_array_equal(by_z[2 * k].pixel_array, src_by_z[k].pixel_array)


def test_instance_numbers_follow_the_source_direction() -> None:
    sources = ct_series(3, descending_numbers=True)
    outputs = _run(sources, {"through_scale": 2})
    by_z = sorted(outputs, key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert [int(ds.InstanceNumber) for ds in by_z] == [5, 4, 3, 2, 1]


def test_target_spacing_downsampling_is_antialiased_and_thickened() -> None:
    sources = ct_series(9, 1.0)
    outputs = _run(sources, {"target_spacing": [1.3229, 1.3229, 2.0]})
    assert len(outputs) == 5
    ds = outputs[0]
    assert (ds.Rows, ds.Columns) == (64, 64)
    assert float(ds.SpacingBetweenSlices) == pytest.approx(2.0)
    assert float(ds.SliceThickness) == pytest.approx(5.0)  # max(source 5 mm, new spacing)
    assert "super-res 1.323x1.323mm, slices 2mm lanczos" in ds.SeriesDescription


def test_series_description_keeps_the_original_and_cannot_be_taken_for_a_structured_report() -> None:
    sources = ct_series(3)
    for ds in sources:
        ds.SeriesDescription = "Thorax 5mm"
    [first, *_] = _run(sources, {"scale": 2})
    assert first.SeriesDescription == "Thorax 5mm super-res x2 lanczos (interpolation) - research use"
    for ds in sources:
        ds.SeriesDescription = "Thorax arterial phase 0.625 mm soft tissue kernel B30f iterative"  # 64: LO's most
    [first, *_] = _run(sources, {"scale": 2}, RunContext(uid_seed="test-seed-v2", version=2))
    assert first.SeriesDescription == "Thorax super-res x2 lanczos (interpolation) - research use v2"
    assert len(first.SeriesDescription) <= 64



@pytest.mark.parametrize("description, version, original, flag, expected", [
    # the pipeline's words do not fit with the QA flag: cut at a word, and not inside the brackets
    ("super-res x2, slices x2 lanczos (interpolation)", 12, "Head", "QA low",
     "Head super-res x2, slices x2 lanczos - QA low - research use v12"),
    # the original is cut first, and not inside its brackets either
    ("super-res x2 Hydra (AI)", 1, "CHEST PA (STANDING PORTABLE) 2 view with markers and grid", None,
     "CHEST PA super-res x2 Hydra (AI) - research use"),
    ("super-res x2 lanczos (interpolation)", 1, "Thorax 1.0 B31f (lung window, sharp kernel) axial", None,
     "Thorax 1.0 super-res x2 lanczos (interpolation) - research use"),
])
def test_a_cut_series_description_leaves_no_bracket_open_and_keeps_the_suffix(description, version, original,
                                                                              flag, expected) -> None:
    from pipelines.dicom.derived import LO_MAX, series_description

    written = series_description(description, version, original, flag)
    assert written == expected and len(written) <= LO_MAX

def test_slabs_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    sources = ct_series(5, 3.0)
    whole = _run(sources, {"scale": 1.5, "through_scale": 3, "method": "cubic"})
    monkeypatch.setattr(interp, "SLAB_VOXELS", 1)
    sliced = _run(sources, {"scale": 1.5, "through_scale": 3, "method": "cubic"})
    assert [ds.SOPInstanceUID for ds in whole] == [ds.SOPInstanceUID for ds in sliced]
    for a, b in zip(whole, sliced, strict=True):
        np.testing.assert_array_equal(a.pixel_array, b.pixel_array)


def test_uids_are_deterministic_and_versioned() -> None:
    sources = ct_series(3)
    first = _run(sources, {"scale": 2})
    again = _run(list(reversed(sources)), {"scale": 2})
    other = _run(sources, {"scale": 2}, RunContext(uid_seed="another-seed", software_version="0.1.0"))
    version2 = _run(sources, {"scale": 2}, RunContext(uid_seed="test-seed-v2", version=2, software_version="0.1.0"))
    uids = lambda outs: [(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in outs]  # noqa: E731
    assert uids(first) == uids(again)
    assert not {u for pair in uids(first) for u in pair} & {u for pair in uids(other) for u in pair}
    original = " ".join(str(sources[0].get("SeriesDescription", "")).split())
    assert first[0].SeriesDescription == f"{original} super-res x2 lanczos (interpolation) - research use".strip()
    assert version2[0].SeriesDescription == f"{original} super-res x2 lanczos (interpolation) - research use v2".strip()
    assert first[0].SeriesNumber == version2[0].SeriesNumber == int(sources[0].SeriesNumber) + 1000
    equipment = first[0].ContributingEquipmentSequence[-1]
    assert equipment.Manufacturer == "srnode" and "0.1.0" in equipment.SoftwareVersions
    assert first[0].DerivationCodeSequence[0].CodeValue == "113085"


def test_constant_image_stays_constant_and_values_are_clipped() -> None:
    sources = ct_series(3, step=0)
    for ds in sources:
        ds.PixelData = np.full((128, 128), 1000, dtype=np.int16).tobytes()
    for out in _run(sources, {"scale": 2.5, "through_scale": 2}):
        assert np.all(out.pixel_array == 1000)
    # a step edge at the top of the range overshoots with Lanczos: clipped to BitsStored
    ds = read_testdata("MR_small.dcm")
    arr = np.zeros((64, 64), dtype=np.int16)
    arr[:, 32:] = 2**15 - 1
    ds.PixelData = arr.tobytes()
    (out,) = _run([ds], {"scale": 2})
    assert out.pixel_array.max() == 2**15 - 1 and out.pixel_array.min() >= -(2**15)


def test_single_slice_mr_inplane(tmp_path: Path) -> None:
    src = read_testdata("MR_small.dcm")
    (out,) = _run([src], {"scale": 2, "method": "cubic"})
    (path,), (written,) = _round_trip([out], tmp_path)
    check_derived([src], [written])
    assert written.SOPClassUID == src.SOPClassUID
    assert dciodvfy_errors(path) == []
    with pytest.raises(Refusal, match="at least 2"):
        _run([src], {"through_scale": 2})


def test_big_endian_source_gives_the_little_endian_output(tmp_path: Path) -> None:
    """Explicit VR Big Endian (retired, but the SCP accepts it from old modalities) is written as
    Explicit VR Little Endian with the same values as from the same image in little endian."""
    little, big = read_testdata("MR_small.dcm"), read_testdata("MR_small_bigendian.dcm")
    lut = pydicom.Dataset()
    lut.LUTDescriptor = [4, 0, 16]
    lut.add_new(0x00283006, "OW", np.array([0, 1000, 30000, 65535], ">u2").tobytes())  # LUTData: raw words
    big.VOILUTSequence = [lut]
    (expected,) = _run([little], {"scale": 2, "method": "cubic"})
    (out,) = _run([big], {"scale": 2, "method": "cubic"})
    (path,), (written,) = _round_trip([out], tmp_path)
    assert written.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    np.testing.assert_array_equal(written.pixel_array, expected.pixel_array)
    assert np.frombuffer(written.VOILUTSequence[0].LUTData, "<u2").tolist() == [0, 1000, 30000, 65535]
    check_derived([big], [written])
    assert new_dciodvfy_errors(path, little.filename) == []


def test_pixel_padding_stays_out_of_the_resampling_and_is_written_back(tmp_path: Path) -> None:
    """A CT whose first 6 columns are padding (-3024 HU, PixelPaddingValue, as outside a scanner's
    reconstruction circle) gives the same real pixels as one whose columns hold the slice's darkest
    real value, and padding exactly where the output samples padding (cubic would otherwise ring
    off the 2000 HU step into real pixels)."""
    def edited(padding: bool, n: int = 3) -> list[pydicom.Dataset]:
        series = sorted(ct_series(n), key=lambda ds: int(ds.InstanceNumber))
        for ds in series:
            pixels = ds.pixel_array.copy()
            pixels[:, :6] = -2000 if padding else pixels[:, 6:].min()
            ds.set_pixel_data(pixels, "MONOCHROME2", 16, generate_instance_uid=False)
            if padding:
                ds.PixelPaddingValue = -2000
        return series

    options = {"scale": 2, "through_scale": 2, "method": "cubic"}
    padded, plain = _run(edited(True), options), _run(edited(False), options)
    paths, written = _round_trip(padded, tmp_path)
    for out, reference in zip(written, plain, strict=True):
        assert out.PixelPaddingValue == -2000
        assert np.all(out.pixel_array[:, :12] == -2000)  # output columns 0-11 sample source columns 0-5
        np.testing.assert_array_equal(out.pixel_array[:, 12:], reference.pixel_array[:, 12:])
    assert dciodvfy_errors(paths[0]) == []
    # the same instance (same UIDs) without padding, right after: nothing of the padded one's mask is reused
    _run(edited(True, 1), {"scale": 2})
    (out,) = _run(edited(False, 1), {"scale": 2})
    assert not np.any(out.pixel_array == -2000)


def test_padding_declared_with_the_other_sign_and_in_monochrome1() -> None:
    from pipelines.dicom.series import decode

    series = sorted(ct_series(1), key=lambda ds: int(ds.InstanceNumber))
    pixels = series[0].pixel_array.copy()
    pixels[:, :6] = -2000
    series[0].set_pixel_data(pixels, "MONOCHROME2", 16, generate_instance_uid=False)
    series[0].add_new(0x00280120, "US", 63536)  # PixelPaddingValue -2000 written as US (a vendor quirk)
    (out,) = _run(series, {"scale": 2, "method": "cubic"})
    assert np.all(out.pixel_array[:, :12] == -2000)
    cr = read_testdata("RG1_UNCR.dcm")  # MONOCHROME1: padding is the dark end, the largest values
    pixels = cr.pixel_array[:64, :64].copy()
    pixels[:, :6] = 2**15 - 1
    cr.set_pixel_data(pixels, "MONOCHROME1", 15, generate_instance_uid=False)
    cr.PixelPaddingValue = 2**15 - 1
    values = decode(cr)
    assert values[:, :6].min() == values[:, :6].max() == pixels[:, 6:].max()  # the darkest real value


# ---- projection images -------------------------------------------------------------------------

def test_cr_monochrome1_keeps_sop_class_and_photometric(tmp_path: Path) -> None:
    src = read_testdata("RG1_UNCR.dcm")
    (out,) = _run([src], {"scale": 1.5, "method": "linear"})
    (path,), (written,) = _round_trip([out], tmp_path)
    check_derived([src], [written])
    assert written.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    assert written.PhotometricInterpretation == "MONOCHROME1"
    assert (written.Rows, written.Columns) == (round(1955 * 1.5), round(1841 * 1.5))
    assert (written.BitsAllocated, written.BitsStored, written.PixelRepresentation) == (16, 15, 0)
    assert "PixelSpacing" not in written  # the source's 0\0 means unknown: dropped, not scaled
    assert written.WindowCenter == src.WindowCenter
    # the source's only dciodvfy errors are its zero PixelSpacing, which the output drops
    assert dciodvfy_errors(path) == []
    with pytest.raises(Refusal, match="projection"):
        _run([src], {"through_scale": 2})
    with pytest.raises(Refusal, match="pixel spacing"):
        _run([src], {"target_spacing": [0.1, 0.1]})


def test_shutter_pixel_coordinates_scale() -> None:
    src = read_testdata("MR_small.dcm")
    src.ShutterShape = "RECTANGULAR"
    src.ShutterLeftVerticalEdge, src.ShutterRightVerticalEdge = 1, 64
    src.ShutterUpperHorizontalEdge, src.ShutterLowerHorizontalEdge = 10, 20
    (out,) = _run([src], {"scale": 2})
    assert (out.ShutterLeftVerticalEdge, out.ShutterRightVerticalEdge) == (1, 128)
    assert (out.ShutterUpperHorizontalEdge, out.ShutterLowerHorizontalEdge) == (19, 40)


# ---- ../shared/data ------------------------------------------------------------------------------

@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("series", "match"),
    [("totalseg_basel_abdomen_ct", "UID")],
)
def test_shared_ct_refusals(series: str, match: str) -> None:
    with pytest.raises(Refusal, match=match):
        _run(_read_folder(shared("ct", series)), {"scale": 2})


@pytest.mark.shared_data
def test_shared_philips_phantom_through_plane(tmp_path: Path) -> None:
    source_paths = {}
    for path in shared("ct", "philips_phantom_ct_5mm").iterdir():
        source_paths[pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID] = path
    sources = [pydicom.dcmread(path) for path in source_paths.values()]
    outputs = _run(sources, {"through_scale": 2})
    assert len(outputs) == 55
    paths, written = _round_trip(outputs, tmp_path)
    check_derived(sources, written)
    assert dcentvfy_errors([*source_paths.values(), *paths]) == []
    for path, ds in list(zip(paths, written, strict=True))[::27]:
        source_path = source_paths[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert new_dciodvfy_errors(path, source_path) == []


@pytest.mark.shared_data
def test_shared_ge_three_slices(tmp_path: Path) -> None:
    folder = shared("ct", "dcmqi_ge_abdomen_ct_3slice")
    sources = _read_folder(folder)
    outputs = _run(sources, {"scale": 2, "through_scale": 2, "method": "cubic"})
    assert len(outputs) == 5
    paths, written = _round_trip(outputs, tmp_path)
    check_derived(sources, written)
    # the source is Implicit VR with group lengths; the output is Explicit VR without them
    assert all(ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian for ds in written)
    for path in paths[::2]:
        assert new_dciodvfy_errors(path, folder / "01.dcm") == []


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("name", "sop_class"),
    [("highdicom_dx_image_dog_thorax.dcm", "1.2.840.10008.5.1.4.1.1.1.1"),
     ("siim-nih_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm", "1.2.840.10008.5.1.4.1.1.7"),
     ("pydicom-data_RG1_J2KR.dcm", "1.2.840.10008.5.1.4.1.1.1")],
    ids=["dx", "sc-jpeg", "cr-j2k"],
)
def test_shared_cxr_dicom(tmp_path: Path, name: str, sop_class: str) -> None:
    source_path = shared("cxr_dicom", name)
    src = pydicom.dcmread(source_path)
    (out,) = _run([src], {"scale": 2.5 if "dog" in name else 1.25})
    (path,), (written,) = _round_trip([out], tmp_path)
    check_derived([src], [written])
    assert written.SOPClassUID == sop_class
    assert written.PhotometricInterpretation == src.PhotometricInterpretation
    if "ImagerPixelSpacing" in src:
        fov = [int(src.Rows) * float(src.ImagerPixelSpacing[0]), int(src.Columns) * float(src.ImagerPixelSpacing[1])]
        assert [int(written.Rows) * float(written.ImagerPixelSpacing[0]),
                int(written.Columns) * float(written.ImagerPixelSpacing[1])] == pytest.approx(fov, abs=1e-3)
    # these sources have their own errors (empty Laterality, 2-character PatientAge, ...)
    assert new_dciodvfy_errors(path, source_path) == []
