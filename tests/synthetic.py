"""Small synthetic series built from pydicom's test files, so tests run on a fresh clone."""
from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from tests.series_factory import cropped


def read_testdata(name: str) -> Dataset:
    """A pydicom (or pydicom-data) test file, read fresh; skips when the package lacks it."""
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed (pip install pydicom-data)")
    return pydicom.dcmread(path)


def ct_series(n: int = 4, spacing: float = 5.0, *, name: str = "CT_small.dcm", offsets: Sequence[float] | None = None,
              shear_mm: float = 0.0, step: int = 10, descending_numbers: bool = False,
              size: int | None = None) -> list[Dataset]:
    """``n`` slices of ``name`` stacked along the normal (returned in a shuffled order); ``size``:
    each its central ``size`` x ``size`` pixels.

    Slice ``k`` has stored values ``source + k * step`` so through-plane interpolation is visible;
    ``offsets`` replaces the regular positions ``k * spacing``; ``shear_mm`` shifts slice ``k`` by
    ``k * shear_mm`` along the row direction (a gantry-tilt-like stack).
    """
    src = read_testdata(name)
    if size is not None:
        src = cropped(src, (src.Rows - size) // 2, (src.Columns - size) // 2, size, size)
    iop = np.array([float(v) for v in src.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    origin = np.array([float(v) for v in src.ImagePositionPatient])
    base = src.pixel_array
    series_uid = generate_uid(entropy_srcs=["synthetic series", name, str(n)])
    offsets = [k * spacing for k in range(n)] if offsets is None else list(offsets)
    out = []
    for k, offset in enumerate(offsets):
        ds = copy.deepcopy(src)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["synthetic", name, str(n), str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = n - k if descending_numbers else k + 1
        ipp = origin + offset * normal + k * shear_mm * iop[:3]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        if "SliceLocation" in ds:
            ds.SliceLocation = f"{float(src.SliceLocation) + offset:.6f}"
        ds.PixelData = (base + k * step).astype(base.dtype).tobytes()
        out.append(ds)
    order = np.random.default_rng(n).permutation(len(out))
    return [out[i] for i in order]


def write_all(datasets: Sequence[Dataset], folder: Path, stem: str = "out") -> list[Path]:
    """Write datasets as DICOM files (enforcing the file format) and return their paths."""
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"{stem}{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
