"""Conformance checks for pipeline outputs (shared/notes/dicom-outputs.md, "Checks a test suite should make").

``dciodvfy`` (dicom3tools) checks the IOD; it does not check SourceImageSequence or derivation
codes, so :func:`check_derived` does.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"
DCENTVFY = shutil.which("dcentvfy") or "/usr/bin/dcentvfy"

SOURCE_IMAGE_PURPOSE = "121322"
SPATIAL_RESAMPLING = "113085"
PROCESSING_EQUIPMENT = "109102"
RESEARCH_USE = "research use"


def dciodvfy_errors(path: str | os.PathLike[str]) -> list[str]:
    """Lines starting with ``Error`` that dciodvfy prints (on stderr) for one file; skips without it."""
    if not Path(DCIODVFY).exists():
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    result = subprocess.run([DCIODVFY, os.fspath(path)], capture_output=True, text=True, timeout=120)
    lines = (result.stderr + result.stdout).splitlines()
    return [line.strip() for line in lines if line.startswith("Error")]


def dcentvfy_errors(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Lines starting with ``Error`` from dcentvfy: patient/study/series inconsistencies across files."""
    if not Path(DCENTVFY).exists():
        pytest.skip("dcentvfy (dicom3tools) is not installed")
    result = subprocess.run([DCENTVFY, *map(os.fspath, paths)], capture_output=True, text=True, timeout=120)
    lines = (result.stderr + result.stdout).splitlines()
    return [line.strip() for line in lines if line.startswith("Error")]


def new_dciodvfy_errors(output: str | os.PathLike[str], source: str | os.PathLike[str]) -> list[str]:
    """dciodvfy errors of ``output`` that ``source`` does not already have.

    Some sources are non-conformant in ways a derived copy inherits (an empty Laterality, a
    2-character PatientAge, ...): the writer must not add errors, and does not rewrite the patient or
    study modules, so such tests compare with the source.
    """
    before = set(dciodvfy_errors(source))
    return [line for line in dciodvfy_errors(output) if line not in before]


def _codes(seq: Sequence[Dataset] | None) -> set[tuple[str, str]]:
    return {(str(item.CodeValue), str(item.CodingSchemeDesignator)) for item in (seq or [])}


def _spacing(ds: Dataset, keyword: str) -> tuple[float, float] | None:
    value = ds.get(keyword)
    if value is None:
        return None
    row, col = (float(v) for v in value)
    return (row, col) if row > 0 and col > 0 else None


def check_derived(sources: Sequence[Dataset], outputs: Sequence[Dataset], *, one_to_one: bool | None = None,
                  atol_mm: float = 0.01, slab_edges: bool = False) -> None:
    """Assert the "Derived" conformance checks for one derived series.

    Parameters
    ----------
    sources, outputs
        The source instances and the derived instances of one series (any order).
    one_to_one
        Require that each output references exactly one source and each source is referenced by
        exactly one output (in-plane only); default: when the counts are equal.
    atol_mm
        Tolerance on positions and fields of view.
    slab_edges
        Through-plane, the output covers the source's slabs edge to edge (sub-pixel SR: N*r slices
        at s/r) rather than first to last slice centre (interpolation: (N-1)*r+1 slices).
    """
    assert outputs, "no outputs"
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    study = {str(ds.StudyInstanceUID) for ds in sources}
    source_series = {str(ds.SeriesInstanceUID) for ds in sources}
    assert len({str(o.SeriesInstanceUID) for o in outputs}) == 1, "outputs span several series"
    assert str(outputs[0].SeriesInstanceUID) not in source_series, "output reuses the source Series UID"
    out_uids = [str(o.SOPInstanceUID) for o in outputs]
    assert len(set(out_uids)) == len(out_uids), "duplicate output SOP Instance UIDs"
    assert not set(out_uids) & set(by_uid), "output reuses a source SOP Instance UID"
    assert sorted(int(o.InstanceNumber) for o in outputs) == list(range(1, len(outputs) + 1))
    assert len({int(o.SeriesNumber) for o in outputs}) == 1

    referenced: list[str] = []
    for out in outputs:
        assert {str(out.StudyInstanceUID)} == study, "StudyInstanceUID differs from the source"
        assert out.get("PatientID") == sources[0].get("PatientID")
        assert str(out.SOPClassUID) == str(sources[0].SOPClassUID), "SOP class changed"
        assert out.ImageType[0] == "DERIVED" and out.ImageType[1] == "SECONDARY"
        assert RESEARCH_USE in str(out.SeriesDescription).lower()
        assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
        assert out.file_meta.MediaStorageSOPClassUID == out.SOPClassUID
        assert str(out.get("DerivationDescription", "")).strip()
        assert (SPATIAL_RESAMPLING, "DCM") in _codes(out.get("DerivationCodeSequence"))

        refs = out.get("SourceImageSequence") or []
        assert refs, "SourceImageSequence missing"
        for ref in refs:
            uid = str(ref.ReferencedSOPInstanceUID)
            assert uid in by_uid, "SourceImageSequence references an instance that is not a source"
            assert str(ref.ReferencedSOPClassUID) == str(by_uid[uid].SOPClassUID)
            assert (SOURCE_IMAGE_PURPOSE, "DCM") in _codes(ref.get("PurposeOfReferenceCodeSequence"))
            referenced.append(uid)
        if one_to_one or (one_to_one is None and len(outputs) == len(sources)):
            assert len(refs) == 1, "in-plane output should reference exactly one source"

        equipment = [item for item in out.get("ContributingEquipmentSequence", [])
                     if (PROCESSING_EQUIPMENT, "DCM") in _codes(item.get("PurposeOfReferenceCodeSequence"))]
        assert equipment, "no ContributingEquipmentSequence item with purpose 109102"
        assert any(item.get("Manufacturer") and item.get("ManufacturerModelName") and item.get("SoftwareVersions")
                   for item in equipment)

        _check_pixels(out)
        template = by_uid[str(refs[0].ReferencedSOPInstanceUID)]
        _check_field_of_view(template, out, atol_mm)

    if one_to_one or (one_to_one is None and len(outputs) == len(sources)):
        assert sorted(referenced) == sorted(by_uid), "SourceImageSequence is not 1:1 to the sources"
    else:
        assert set(referenced) == set(by_uid), "some sources are not referenced by any output"
    if all("ImagePositionPatient" in ds for ds in sources):
        _check_volume_geometry(sources, outputs, atol_mm, slab_edges)


def _check_pixels(out: Dataset) -> None:
    arr = out.pixel_array
    assert arr.shape == (int(out.Rows), int(out.Columns))
    bits = int(out.BitsStored)
    if int(out.PixelRepresentation):
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        lo, hi = 0, 2**bits - 1
    assert lo <= int(arr.min()) and int(arr.max()) <= hi, "stored values outside BitsStored range"
    assert int(out.HighBit) == bits - 1


def _check_field_of_view(src: Dataset, out: Dataset, atol_mm: float) -> None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        before, after = _spacing(src, keyword), _spacing(out, keyword)
        if before is None:
            continue
        assert after is not None, f"{keyword} lost"
        assert abs(int(src.Rows) * before[0] - int(out.Rows) * after[0]) < atol_mm * 10, f"{keyword}: FOV changed"
        assert abs(int(src.Columns) * before[1] - int(out.Columns) * after[1]) < atol_mm * 10, f"{keyword}: FOV changed"


def _corner(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corner of the image (edge of the first pixel) and the slice normal."""
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    row_dir, col_dir = iop[:3], iop[3:]
    row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    return ipp - 0.5 * col_mm * row_dir - 0.5 * row_mm * col_dir, np.cross(row_dir, col_dir)


def _check_volume_geometry(sources: Sequence[Dataset], outputs: Sequence[Dataset], atol_mm: float,
                           slab_edges: bool = False) -> None:
    iop = np.array([float(v) for v in sources[0].ImageOrientationPatient])
    for out in outputs:
        assert np.allclose([float(v) for v in out.ImageOrientationPatient], iop, atol=1e-6), "IOP changed"
    src_corners = [_corner(ds)[0] for ds in sources]
    out_corners = [_corner(ds)[0] for ds in outputs]
    normal = _corner(sources[0])[1]
    src_along = np.sort([c @ normal for c in src_corners])
    out_along = np.sort([c @ normal for c in out_corners])
    # Same extent along the normal, positions regular along it.
    src_half = out_half = 0.0
    if slab_edges and len(src_along) > 1 and len(out_along) > 1:
        src_half, out_half = 0.5 * (src_along[1] - src_along[0]), 0.5 * (out_along[1] - out_along[0])
    assert abs((src_along[0] - src_half) - (out_along[0] - out_half)) < atol_mm
    assert abs((src_along[-1] + src_half) - (out_along[-1] + out_half)) < atol_mm
    if len(out_along) > 2:
        gaps = np.diff(out_along)
        assert np.abs(gaps - gaps.mean()).max() < max(atol_mm, 0.01 * gaps.mean()), "irregular output spacing"
        spacing = outputs[0].get("SpacingBetweenSlices")
        if spacing is not None and len(outputs) != len(sources):
            assert abs(float(spacing) - gaps.mean()) < atol_mm
    # Corners lie on the source stack axis: the in-plane field of view did not move.
    for corner in out_corners:
        offset = corner - src_corners[0]
        assert np.linalg.norm(offset - (offset @ normal) * normal) < atol_mm, "image corner moved in-plane"


# ---- multi-frame outputs and in-place (in-plane only) outputs ---------------------------------

def check_enhanced_derived(source: Dataset, out: Dataset, source_path: Path, out_path: Path) -> None:
    """The derived multi-frame instance: same SOP class and study, derived image and frame types,
    every frame's Derivation Image item referencing existing source frames (purpose 121322, code
    113085), the evidence listing the source, the node as equipment, no new dciodvfy error."""
    assert out.SOPClassUID == source.SOPClassUID
    assert out.StudyInstanceUID == source.StudyInstanceUID and out.SeriesInstanceUID != source.SeriesInstanceUID
    assert out.SOPInstanceUID != source.SOPInstanceUID
    assert list(out.ImageType)[:2] == ["DERIVED", "PRIMARY"] and out.ImageType[3] == "RESAMPLED"
    assert RESEARCH_USE in out.SeriesDescription
    assert int(out.NumberOfFrames) == len(out.PerFrameFunctionalGroupsSequence)
    n_source = int(source.NumberOfFrames)
    referenced = set()
    for item in out.PerFrameFunctionalGroupsSequence:
        [derivation] = item.DerivationImageSequence
        assert (SPATIAL_RESAMPLING, "DCM") in _codes(derivation.DerivationCodeSequence)
        for ref in derivation.SourceImageSequence:
            assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
            assert ref.ReferencedSOPClassUID == source.SOPClassUID
            assert 1 <= int(ref.ReferencedFrameNumber) <= n_source
            assert (SOURCE_IMAGE_PURPOSE, "DCM") in _codes(ref.PurposeOfReferenceCodeSequence)
            referenced.add(int(ref.ReferencedFrameNumber))
    assert referenced == set(range(1, n_source + 1)), "some source frames are not referenced"
    [evidence] = out.SourceImageEvidenceSequence
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    [series] = evidence.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert [r.ReferencedSOPInstanceUID for r in series.ReferencedSOPSequence] == [source.SOPInstanceUID]
    assert any((PROCESSING_EQUIPMENT, "DCM") in _codes(e.PurposeOfReferenceCodeSequence)
               for e in out.ContributingEquipmentSequence)
    assert new_dciodvfy_errors(out_path, source_path) == []


def check_grid(source_path: Path, out_path: Path, inplane: int, through: int, *, slab_edges: bool = False,
               mean_atol: float = 1.0) -> None:
    """highdicom reads the output as one regular volume on the new grid: same orientation, the pixel
    spacing divided by ``inplane``, the slice spacing by ``through``, the first pixel centre moved by
    half the spacing change in-plane; interpolated from the first to the last source frame (or slab
    edge to slab edge); the output frames on source positions hold those frames' content (in-plane
    mean within 2 % + ``mean_atol``: interpolation keeps it within 1, a network may move it more)."""
    src = hd.imread(str(source_path)).get_volume()
    out = hd.imread(str(out_path)).get_volume()
    n = src.spatial_shape[0]
    n_out = n * through if slab_edges else (n - 1) * through + 1
    assert out.spatial_shape == (n_out, src.spatial_shape[1] * inplane, src.spatial_shape[2] * inplane)
    np.testing.assert_allclose(out.direction, src.direction, atol=1e-6)
    np.testing.assert_allclose(out.spacing, [src.spacing[0] / through, src.spacing[1] / inplane,
                                             src.spacing[2] / inplane], rtol=1e-5)
    half = 0.5 * (np.array(out.spacing) - np.array(src.spacing))
    half[0] = half[0] if slab_edges else 0.0
    np.testing.assert_allclose(out.position, src.position + src.direction @ half, atol=1e-3)
    if not slab_edges:  # frames on source positions: in-plane mean of the same slice
        src_means = src.array.reshape(n, -1).mean(axis=1)
        out_means = out.array[::through].reshape(n, -1).mean(axis=1)
        np.testing.assert_allclose(out_means, src_means, rtol=0.02, atol=mean_atol)


def _vector(value) -> np.ndarray:
    return np.array([float(v) for v in value])


def check_in_place(sources: list[Dataset], outputs: list[Dataset], scale: int) -> None:
    """One output per source slice, at the source slice's own position (moved only by half the
    in-plane spacing change), same orientation, the spacing divided by ``scale``."""
    by_uid = {ds.SOPInstanceUID: ds for ds in sources}
    assert len(outputs) == len(sources)
    for out in outputs:
        [ref] = out.SourceImageSequence
        src = by_uid[ref.ReferencedSOPInstanceUID]
        iop = _vector(src.ImageOrientationPatient)
        np.testing.assert_allclose(_vector(out.ImageOrientationPatient), iop, atol=1e-6)
        old, new = _vector(src.PixelSpacing), _vector(out.PixelSpacing)
        np.testing.assert_allclose(new, old / scale, rtol=1e-5)
        expected = _vector(src.ImagePositionPatient) + 0.5 * (new[1] - old[1]) * iop[:3] + 0.5 * (new[0] - old[0]) * iop[3:]
        np.testing.assert_allclose(_vector(out.ImagePositionPatient), expected, atol=1e-3)
        assert "in-plane only" in out.SeriesDescription
