"""Series -> arrays with geometry: sorting, checks, refusals, decoding of compressed syntaxes."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipelines.base import Refusal
from pipelines.dicom.series import Image2D, Volume, decode, display_array, load_series
from tests.paths import shared
from tests.synthetic import ct_series, read_testdata


def _read_folder(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir()) if p.suffix != ".csv"]


def test_volume_is_sorted_along_the_normal() -> None:
    series = ct_series(5, 2.5)
    vol = load_series(series)
    assert isinstance(vol, Volume)
    assert vol.shape == (5, 128, 128)
    assert vol.slice_spacing == pytest.approx(2.5)
    assert vol.pixel_spacing == pytest.approx((0.661468, 0.661468))
    np.testing.assert_allclose(vol.normal, [0, 0, 1])
    along = [float(ds.ImagePositionPatient[2]) for ds in vol.datasets]
    assert along == sorted(along)
    np.testing.assert_allclose(vol.origin, [float(v) for v in vol.datasets[0].ImagePositionPatient])
    # modality units: stored * slope + intercept, slice k carries +10 * k
    first = vol.datasets[0]
    np.testing.assert_array_equal(vol.voxels[0], first.pixel_array.astype(np.float32) - 1024)
    np.testing.assert_array_equal(vol.voxels[3] - vol.voxels[0], 30)
    assert vol.voxels.dtype == np.float32
    assert vol.instance_numbers_ascending
    np.testing.assert_allclose(vol.position(2.0), vol.origin + [0, 0, 5.0])
    assert vol.slice_location(4.0) == pytest.approx(float(vol.datasets[-1].SliceLocation))


def test_instance_number_direction_is_reported() -> None:
    assert not load_series(ct_series(3, descending_numbers=True)).instance_numbers_ascending


def test_three_slices_are_a_volume_and_one_slice_only_when_allowed() -> None:
    assert load_series(ct_series(3)).shape[0] == 3
    single = load_series([read_testdata("MR_small.dcm")])
    assert isinstance(single, Volume) and single.slice_spacing is None
    with pytest.raises(Refusal, match="at least 2"):
        load_series([read_testdata("CT_small.dcm")], min_slices=2)


def test_duplicate_positions_are_refused() -> None:
    with pytest.raises(Refusal, match="duplicated"):
        load_series(ct_series(4, offsets=[0, 5, 5, 10]))


def test_spacing_within_tolerance_is_regular() -> None:
    vol = load_series(ct_series(4, offsets=[0, 5.004, 10.0, 15.003]))
    assert vol.slice_spacing == pytest.approx(5.001)


def test_mixed_headers_are_refused() -> None:
    series = ct_series(3)
    series[1].ImageOrientationPatient = [1, 0, 0, 0, 0.9, 0.43588989]
    with pytest.raises(Refusal, match="orientation"):
        load_series(series)
    series = ct_series(3)
    series[0].PixelSpacing = [0.7, 0.7]
    with pytest.raises(Refusal, match="PixelSpacing"):
        load_series(series)
    series = ct_series(3)
    series[2].SeriesInstanceUID = "1.2.3.4"
    with pytest.raises(Refusal, match="2 different series"):
        load_series(series)
    series = ct_series(3)
    del series[1].ImagePositionPatient
    with pytest.raises(Refusal, match="some instances"):
        load_series(series)


@pytest.mark.parametrize(
    ("keyword", "match"),
    [("SOPInstanceUID", "no SOP Instance UID"), ("SeriesInstanceUID", "no Series Instance UID"),
     ("StudyInstanceUID", "no Study Instance UID")],
)
def test_blank_uids_are_refused(keyword: str, match: str) -> None:
    series = ct_series(3)
    setattr(series[1], keyword, "")
    with pytest.raises(Refusal, match=match):
        load_series(series)


def test_multiframe_of_other_classes_and_color_are_refused() -> None:
    ds = read_testdata("CT_small.dcm")
    ds.NumberOfFrames = 2
    with pytest.raises(Refusal, match="multi-frame CT Image Storage instances are not supported"):
        load_series([ds])
    with pytest.raises(Refusal, match="RGB"):
        load_series([read_testdata("SC_rgb.dcm")])


def test_refusals_carry_no_patient_data() -> None:
    series = ct_series(4, offsets=[0, 5, 5, 10])
    with pytest.raises(Refusal) as info:
        load_series(series)
    for keyword in ("PatientName", "PatientID"):
        value = str(series[0].get(keyword, ""))
        assert not value or value not in str(info.value)


def test_cr_monochrome1_image() -> None:
    ds = read_testdata("RG1_UNCR.dcm")
    (image,) = load_series([ds])
    assert isinstance(image, Image2D)
    assert image.monochrome1 and image.bits_stored == 15
    assert image.pixel_spacing is None and image.spacing_attr is None  # PixelSpacing is 0\0: unknown
    np.testing.assert_array_equal(image.pixels, ds.pixel_array.astype(np.float32))
    shown = image.display_array()
    assert shown.min() >= 0 and shown.max() <= 1
    # MONOCHROME1: the highest stored value is displayed darkest
    hi = np.unravel_index(np.argmax(image.pixels), image.pixels.shape)
    lo = np.unravel_index(np.argmin(image.pixels), image.pixels.shape)
    assert shown[hi] < shown[lo]


def test_display_array_windowing() -> None:
    ds = read_testdata("CT_small.dcm")
    ds.WindowCenter, ds.WindowWidth = 40, 400
    hu = np.array([[-1000.0, -160.0, 40.0, 240.0, 3000.0]], dtype=np.float32)
    np.testing.assert_allclose(display_array(hu, ds), [[0.0, 0.0, 0.5, 1.0, 1.0]], atol=2e-3)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"])
def test_compressed_syntaxes_decode_like_the_uncompressed_file(name: str) -> None:
    np.testing.assert_array_equal(decode(read_testdata(name)), decode(read_testdata("MR_small.dcm")))


def test_jpeg2000_cr_decodes_like_uncompressed() -> None:
    np.testing.assert_array_equal(decode(read_testdata("RG1_J2KR.dcm")), decode(read_testdata("RG1_UNCR.dcm")))


def test_decode_does_not_cache_on_the_dataset() -> None:
    ds = read_testdata("CT_small.dcm")
    decode(ds)
    assert getattr(ds, "_pixel_array", None) is None


# ---- ../shared/data ---------------------------------------------------------------------------

@pytest.mark.shared_data
@pytest.mark.parametrize("series", ["phantom_t1_j2k", "phantom_t1_jpegll"])
def test_shared_mr_compressed(series: str) -> None:
    vol = load_series(_read_folder(shared("mr", series)))
    assert isinstance(vol, Volume)
    assert vol.shape == (96, 128, 128)
    assert vol.slice_spacing == pytest.approx(2.0, abs=1e-3)
    assert vol.voxels.max() > 0


@pytest.mark.shared_data
def test_shared_jpeg2000_ct_decodes_but_blank_uids_are_refused() -> None:
    datasets = _read_folder(shared("ct", "totalseg_basel_abdomen_ct"))
    pixels = decode(datasets[0])
    assert pixels.shape == (512, 512) and pixels.min() >= -1024 and pixels.max() > 0
    with pytest.raises(Refusal, match="UID"):
        load_series(datasets)


@pytest.mark.shared_data
def test_shared_tilted_ct_is_a_volume_for_in_plane_work_only() -> None:
    vol = load_series(_read_folder(shared("ct", "ge_head_ct_tilt")))
    assert vol.slice_spacing is None
    assert vol.irregular.startswith("gantry tilt 18.5 deg") and "irregular slice spacing" in vol.irregular


@pytest.mark.shared_data
def test_shared_cxr_dicom_images() -> None:
    folder = shared("cxr_dicom")
    expected = {  # file prefix -> (photometric, spacing attribute)
        "highdicom_dx": ("MONOCHROME1", "PixelSpacing"),
        "pydicom-data_RG1_J2KR": ("MONOCHROME1", None),
        "pydicom-data_RG1_UNCR": ("MONOCHROME1", None),
        "siim-nih": ("MONOCHROME2", "PixelSpacing"),
    }
    for path in sorted(folder.glob("*.dcm")):
        (image,) = load_series([pydicom.dcmread(path)])
        prefix = next(p for p in expected if path.name.startswith(p))
        photometric, attr = expected[prefix]
        assert image.dataset.PhotometricInterpretation == photometric
        assert image.spacing_attr == attr
        assert image.pixels.shape == (int(image.dataset.Rows), int(image.dataset.Columns))
        assert image.pixels.max() > image.pixels.min()
        assert 0 <= image.display_array().mean() <= 1


def test_copy_of_series_is_not_modified() -> None:
    series = ct_series(3)
    before = [copy.deepcopy(ds) for ds in series]
    load_series(series)
    assert [ds.to_json_dict() for ds in series] == [ds.to_json_dict() for ds in before]


def test_the_tilted_ct_factory_skips_with_the_reason_without_shared_data(tmp_path, monkeypatch) -> None:
    import tests.paths
    from tests import series_factory

    monkeypatch.setattr(tests.paths, "SHARED_DATA", tmp_path / "absent")
    with pytest.raises(pytest.skip.Exception, match=r"absent/ct/ge_head_ct_tilt is absent \(real data lives in "
                                                     r"\.\./shared/data"):
        series_factory.tilted_ct(tmp_path / "out", "tilt")
