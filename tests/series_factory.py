"""Test inputs: real DICOM files from pydicom's test data (and ../shared/data), re-identified with
fresh UIDs per test so that tests sharing one Orthanc never collide."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from tests.paths import SHARED_DATA, shared


def _relabelled(datasets: list[Dataset], tag: str) -> list[Dataset]:
    """Same pixels and geometry, new Study/Series/SOP UIDs derived from ``tag``."""
    study = generate_uid(entropy_srcs=[tag, "study"])
    series_map: dict[str, str] = {}
    out = []
    for i, src in enumerate(datasets):
        ds = copy.deepcopy(src)
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series_map.setdefault(str(src.SeriesInstanceUID), generate_uid(entropy_srcs=[tag, str(src.SeriesInstanceUID)]))
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[tag, "sop", str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out.append(ds)
    return out


def _write(datasets: list[Dataset], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = out / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _relabel(datasets: list[Dataset], out: Path, tag: str) -> list[Path]:
    return _write(_relabelled(datasets, tag), out)


def _group(ds: Dataset, frame: int, name: str) -> Dataset:
    """Frame ``frame``'s functional group ``name`` (per-frame wins over shared)."""
    item = ds.PerFrameFunctionalGroupsSequence[frame]
    return (item if name in item else ds.SharedFunctionalGroupsSequence[0])[name][0]


def cropped(ds: Dataset, top: int, left: int, rows: int, cols: int) -> Dataset:
    """A copy of a slice (or of every frame of an enhanced instance) cut to ``rows`` x ``cols`` pixels
    from (``top``, ``left``): real pixels, and ImagePositionPatient moved to the new first pixel, so the
    geometry stays honest. Written uncompressed; the smallest/largest pixel values are dropped."""
    import numpy as np
    from pydicom.uid import ExplicitVRLittleEndian

    out = copy.deepcopy(ds)
    arr = ds.pixel_array
    enhanced = "PerFrameFunctionalGroupsSequence" in ds
    if enhanced and arr.ndim == 2:
        arr = arr[None]
    arr = arr[..., top:top + rows, left:left + cols]
    assert arr.shape[-2:] == (rows, cols), f"crop outside the {ds.Rows}x{ds.Columns} image"

    def move(position: Dataset, orientation, spacing) -> None:
        iop = np.array([float(v) for v in orientation])
        row_spacing, col_spacing = (float(v) for v in spacing)
        ipp = np.array([float(v) for v in position.ImagePositionPatient])
        position.ImagePositionPatient = [f"{v:.6f}" for v in ipp + left * col_spacing * iop[:3] + top * row_spacing * iop[3:]]

    if enhanced:
        moved: set[int] = set()
        for k in range(len(out.PerFrameFunctionalGroupsSequence)):
            position = _group(out, k, "PlanePositionSequence")
            if id(position) not in moved:
                moved.add(id(position))
                move(position, _group(out, k, "PlaneOrientationSequence").ImageOrientationPatient,
                     _group(out, k, "PixelMeasuresSequence").PixelSpacing)
    else:
        move(out, out.ImageOrientationPatient, out.PixelSpacing)
    out.Rows, out.Columns = rows, cols
    out.PixelData = np.ascontiguousarray(arr).tobytes()
    out["PixelData"].VR = "OW" if int(ds.BitsAllocated) > 8 else "OB"
    if out.file_meta.TransferSyntaxUID.is_compressed:
        out.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue"):
        if keyword in out:
            delattr(out, keyword)
    return out


def legacy_enhanced_datasets(folder: Path, tag: str, first: int = 0, count: int | None = None,
                             crop: tuple[int, int, int, int] | None = None) -> list[Dataset]:
    """One Legacy Converted Enhanced CT/MR instance made by highdicom's converter from ``count``
    consecutive slices (along the stack, from ``first``) of the classic series in ``folder``;
    ``crop`` (top, left, rows, cols) cuts each slice first (:func:`cropped`)."""
    import highdicom as hd
    import numpy as np

    slices = [dcmread(p) for p in sorted(folder.iterdir()) if p.suffix != ".csv" and p.is_file()]
    iop = np.array([float(v) for v in slices[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    slices.sort(key=lambda ds: float(np.array([float(v) for v in ds.ImagePositionPatient]) @ normal))
    slices = slices[first:None if count is None else first + count]
    if crop is not None:
        slices = [cropped(ds, *crop) for ds in slices]
    slices = _relabelled(slices, tag)
    convert = {"CT": hd.legacy.LegacyConvertedEnhancedCTImage, "MR": hd.legacy.LegacyConvertedEnhancedMRImage}
    with warnings.catch_warnings():  # the sources' one-component patient names
        warnings.simplefilter("ignore", UserWarning)
        enhanced = convert[str(slices[0].Modality)](
            slices, series_instance_uid=generate_uid(entropy_srcs=[tag, "enhanced series"]), series_number=1,
            sop_instance_uid=generate_uid(entropy_srcs=[tag, "enhanced"]), instance_number=1)
    return [enhanced]


def legacy_enhanced(out: Path, tag: str, folder: Path, first: int = 0, count: int | None = None,
                    crop: tuple[int, int, int, int] | None = None) -> list[Path]:
    """:func:`legacy_enhanced_datasets`, written to ``out``."""
    return _write(legacy_enhanced_datasets(folder, tag, first, count, crop), out)


def ct_small(out: Path, tag: str) -> list[Path]:
    return _relabel([dcmread(get_testdata_file("CT_small.dcm"))], out, tag)


def cr(out: Path, tag: str) -> list[Path]:
    """A real CR (RG1_UNCR.dcm from the pydicom-data package)."""
    return _relabel([dcmread(get_testdata_file("RG1_UNCR.dcm"))], out, tag)


def mr_series(out: Path, tag: str) -> list[Path]:
    """A real multi-slice MR series: ../shared/data/mr/decubitus_hfs_t1_sag (35 slices) when
    present, else a 6-slice series built from pydicom's MR_small.dcm stepped along its normal."""
    folder = SHARED_DATA / "mr" / "decubitus_hfs_t1_sag"
    if folder.is_dir():
        return _relabel([dcmread(p) for p in sorted(folder.glob("*.dcm"))], out, tag)
    return _relabel(stepped(dcmread(get_testdata_file("MR_small.dcm")), 6), out, tag)


def stepped(ds: Dataset, n: int, spacing: float | None = None) -> list[Dataset]:
    """``n`` copies of a slice moved along its normal: a regular volume with real pixels."""
    import numpy as np

    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    step = spacing or float(ds.get("SliceThickness", 1) or 1)
    origin = np.array([float(v) for v in ds.ImagePositionPatient])
    series = generate_uid(entropy_srcs=[str(ds.SOPInstanceUID), str(n)])
    out = []
    for k in range(n):
        s = copy.deepcopy(ds)
        s.SeriesInstanceUID = series
        s.SOPInstanceUID = generate_uid(entropy_srcs=[series, str(k)])
        s.file_meta.MediaStorageSOPInstanceUID = s.SOPInstanceUID
        s.ImagePositionPatient = [f"{v:.4f}" for v in origin + k * step * normal]
        s.InstanceNumber = k + 1
        if "SliceLocation" in s:
            del s.SliceLocation
        out.append(s)
    return out


def ct_volume(out: Path, tag: str, n: int, size: int | None = None) -> list[Path]:
    """``n`` slices of pydicom's CT_small (128x128) 5 mm apart; ``size``: each cut to its central
    ``size`` x ``size`` pixels (networks cost by the pixel: the suite's time)."""
    ct = dcmread(get_testdata_file("CT_small.dcm"))
    if size is not None:
        ct = cropped(ct, (ct.Rows - size) // 2, (ct.Columns - size) // 2, size, size)
    return _relabel(stepped(ct, n, 5.0), out, tag)


def tilted_ct(out: Path, tag: str, first: int = 0, count: int | None = None,
              crop: tuple[int, int, int, int] | None = None) -> list[Path]:
    """The real GE head CT with an 18.5 deg gantry tilt and irregular gaps (../shared/data); ``count``
    files from the ``first`` (in file order), each cut to ``crop`` (top, left, rows, cols) when given."""
    folder = shared("ct", "ge_head_ct_tilt")
    slices = [dcmread(p) for p in sorted(folder.glob("*.dcm"))[first:None if count is None else first + count]]
    return _relabel([cropped(ds, *crop) for ds in slices] if crop else slices, out, tag)
