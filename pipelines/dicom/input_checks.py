"""What a pipeline computes from, checked before it runs, and what it made, checked before it is kept.

The node's ingest (:mod:`node.instance_checks`) refuses values that are no measurement at all (NaN,
``1e300``); ``srnode process`` reads files that never went through it, and values that pass it can
still break the pipeline's arithmetic. :func:`check_inputs` is called by
:func:`pipelines.dicom.series.load_series` on every instance (frames of multi-frame instances
included) and raises :class:`~pipelines.base.Refusal` naming the element and why:

- **Modality rescale** (PS3.3 C.11.1): RescaleSlope/RescaleIntercept must be finite numbers, the slope
  not 0. The decoder computes modality values ``stored x slope + intercept`` in 32-bit floats
  (24-bit significand); when the largest modality value the header allows is ``MAX_STEPS`` (2^22)
  stored steps (|slope|) or more, float32 rounding merges distinct stored values, so an intercept of
  1e9 on 16-bit data turns the image into a few dozen values (or one) and the inverse rescale cannot
  give the stored values back. A real CT (slope 1, intercept -1024) is at about 2^16.
- **Plane geometry** (C.7.6.2): ImagePositionPatient, ImageOrientationPatient, PixelSpacing and
  SliceThickness must be finite numbers where present (the loader's own checks compare with NaN,
  which is never larger than a tolerance); PixelSpacing within ``MIN_SPACING_MM`` .. ``MAX_SPACING_MM``
  (1 um to 1 m: no CT, MR or radiograph is outside, and an output's positions and spacings computed
  from such a value would be meaningless). Orthonormal orientation, one orientation and one spacing
  per series, no duplicate positions and equal matrix sizes are checked by the loader itself.

:func:`check_contrast` is for pipelines that normalise to a fixed window (the CT networks'
[-1024, 2976] HU): a series whose values span less than ``MIN_CONTRAST`` of the window (a slope of
1e-9 leaves 16-bit data 6.5e-5 HU wide) would reach the network as one value.

:func:`check_output_pixels` (called by the derived writer on every output slice, in modality values,
before they are rounded to stored values, which would silently turn NaN into 0) and
:func:`check_output` (called by :func:`node.jobs.run_pipeline` on every output dataset: every DS,
FL, FD, OF and OD value, sequences included) raise :class:`~pipelines.base.InvalidOutput`: the
job fails with that reason and nothing is delivered.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from pydicom import Dataset
from pydicom.datadict import keyword_for_tag
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from pipelines.base import InvalidOutput, Refusal

MAX_STEPS = 2**22
MIN_SPACING_MM = 1e-3
MAX_SPACING_MM = 1e3
MIN_CONTRAST = 1e-4
_GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness")
_FLOAT_VRS = frozenset({"DS", "FL", "FD", "OF", "OD"})


def element(keyword: str) -> str:
    """``"(0028,1053) RescaleSlope"``: how every reason names an element."""
    tag = Tag(keyword)
    return f"({tag.group:04X},{tag.element:04X}) {keyword}"


def check_inputs(datasets: Iterable[Dataset]) -> None:
    """Refuse the first instance whose rescale or plane geometry the pipelines cannot compute from."""
    for ds in datasets:
        _check_rescale(ds)
        for keyword in _GEOMETRY:
            _numbers(ds, keyword)
        spacing = _numbers(ds, "PixelSpacing")
        if spacing and any(v != 0 and not MIN_SPACING_MM <= abs(v) <= MAX_SPACING_MM for v in spacing):
            raise Refusal(f"{element('PixelSpacing')} {_show(spacing)} mm is outside "
                          f"{MIN_SPACING_MM:g}..{MAX_SPACING_MM:g} mm")


def _numbers(ds: Dataset, keyword: str) -> list[float] | None:
    try:
        value = ds.get(keyword)
    except (TypeError, ValueError):  # a raw DS/IS that pydicom cannot convert (strict reading)
        raise Refusal(f"{element(keyword)} is not a number") from None
    if value is None or value == "":
        return None
    values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        raise Refusal(f"{element(keyword)} is not a number") from None
    if not all(math.isfinite(v) for v in numbers):
        raise Refusal(f"{element(keyword)} is not a finite number")
    return numbers


def _one(ds: Dataset, keyword: str, default: float) -> float:
    numbers = _numbers(ds, keyword)
    if numbers is None:
        return default
    if len(numbers) != 1:
        raise Refusal(f"{element(keyword)} has {len(numbers)} values, not 1")
    return numbers[0]


def _check_rescale(ds: Dataset) -> None:
    slope = _one(ds, "RescaleSlope", 1.0)
    intercept = _one(ds, "RescaleIntercept", 0.0)
    if slope == 0:
        raise Refusal(f"{element('RescaleSlope')} is 0: every pixel would have the same value")
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    largest = max(abs(lo * slope + intercept), abs(hi * slope + intercept))
    if largest >= MAX_STEPS * abs(slope):
        raise Refusal(f"{element('RescaleIntercept')} {intercept:g} with {element('RescaleSlope')} {slope:g}: "
                      f"modality values up to {largest:.3g} are {largest / abs(slope):.3g} stored steps, beyond "
                      f"the {MAX_STEPS} that 32-bit arithmetic keeps apart (distinct pixels would become one value)")


def check_contrast(voxels: np.ndarray, window: tuple[float, float], what: str) -> None:
    """Refuse a series that is one value once clipped to ``window`` (``what`` names the window)."""
    low, high = window
    lo = min(max(float(np.min(voxels)), low), high)
    hi = min(max(float(np.max(voxels)), low), high)
    if (hi - lo) < MIN_CONTRAST * (high - low):
        raise Refusal(f"the series' values ({float(np.min(voxels)):.6g} to {float(np.max(voxels)):.6g}) hold no "
                      f"contrast in the {what} window [{low:g}, {high:g}] (check {element('RescaleSlope')} and "
                      f"{element('RescaleIntercept')})")


def check_output_pixels(pixels: np.ndarray, index: int) -> None:
    """Fail on an output slice holding NaN or infinity (before rounding hides it)."""
    bad = int(np.size(pixels) - np.count_nonzero(np.isfinite(pixels)))
    if bad:
        raise InvalidOutput(f"output image {index + 1} has {bad} non-finite pixel value{'s' * (bad > 1)} "
                            "(NaN or infinity): not delivered")


def check_output(ds: Dataset) -> None:
    """Fail on an output dataset holding a non-finite DS/FL/FD/OF/OD value (sequences included)."""
    path = _non_finite(ds)
    if path:
        raise InvalidOutput(f"output instance has a non-finite value in {path}: not delivered")


def _non_finite(ds: Dataset) -> str | None:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value or []:
                inner = _non_finite(item)
                if inner:
                    return f"{elem.keyword or elem.tag} > {inner}"
            continue
        if elem.VR not in _FLOAT_VRS or elem.value is None or elem.value == "":
            continue
        if elem.VR in ("OF", "OD"):
            values = np.frombuffer(elem.value, "<f4" if elem.VR == "OF" else "<f8")
        else:
            raw = elem.value if isinstance(elem.value, (MultiValue, list, tuple)) else [elem.value]
            try:
                values = np.array([float(v) for v in raw], dtype=float)
            except (TypeError, ValueError):
                return f"({elem.tag.group:04X},{elem.tag.element:04X}) {keyword_for_tag(elem.tag)} (not a number)"
        if not np.isfinite(values).all():
            return f"({elem.tag.group:04X},{elem.tag.element:04X}) {keyword_for_tag(elem.tag)}"
    return None


def _show(values: list[float]) -> str:
    return "\\".join(f"{v:g}" for v in values)
