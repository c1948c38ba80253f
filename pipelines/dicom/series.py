"""One series of DICOM instances -> pixel arrays with their geometry, checked.

:func:`load_series` is the entry point every pipeline uses. It decides whether the instances form
a volume (CT/MR slices with ImagePositionPatient/ImageOrientationPatient, see :class:`Volume`) or
projection images (CR, DX, SC, or any image without plane geometry, see :class:`Image2D`), checks
what the resampling code relies on, decodes the pixel data (all transfer syntaxes pydicom can decode
with pylibjpeg, openjpeg, libjpeg and pyjpegls) and applies the modality rescale. Anything it cannot
handle raises :class:`~pipelines.base.Refusal` with a reason that carries no patient data.

Every instance (each frame of a multi-frame one) first passes :func:`pipelines.dicom.input_checks.check_inputs`
(finite rescale that 32-bit arithmetic can apply, finite plane geometry, plausible PixelSpacing).

Volume checks and tolerances (PS3.3 C.7.6.2 Image Plane module)
--------------------------------------------------------------
- one SeriesInstanceUID and SOP class; non-blank Study/Series/SOP Instance UIDs, no duplicate SOP UID;
- grayscale (MONOCHROME1/2) instances with the same Rows/Columns, BitsAllocated 8 or 16; multi-frame
  only as (Legacy Converted) Enhanced CT/MR, whose frames are slices here (:mod:`pipelines.dicom.multiframe`
  reads their functional groups and refuses what is not one volume);
- ImageOrientationPatient: orthonormal within 1e-3 and equal on all slices within ``ORIENTATION_TOL``
  (1e-3 per direction cosine, about 0.06 deg);
- PixelSpacing present, non-zero and equal within ``SPACING_RTOL`` (0.1 %);
- slices are sorted along the normal ``row_dir x col_dir``; positions closer than ``DUPLICATE_TOL_MM``
  (0.01 mm) are duplicates;
- positions lie on a line along the normal: every position is within
  ``max(0.01 mm, 0.1 x smallest pixel spacing)`` of the axis through the first slice, i.e. the total
  shear is below a tenth of a pixel. Otherwise (gantry tilt, or a stack that is not perpendicular to its
  slices) the angle between the stack direction and the normal is noted in ``Volume.irregular``;
- regular spacing: every gap within ``max(0.01 mm, 1 %)`` of the median gap (highdicom's default
  ``rtol`` is also 1 %); otherwise the range of gaps is noted in ``Volume.irregular``.
A tilted or irregular stack is still a volume, for in-plane work only: no regular grid through the
slices can be justified, so :func:`in_plane_only` drops a through-plane request (or refuses one that
asks for nothing else) and every output slice stays where its source slice is.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_voi, get_decoder
from pydicom.uid import UID

from pipelines.base import Refusal
from pipelines.dicom import input_checks, multiframe, valid_field

logger = logging.getLogger(__name__)

ORIENTATION_TOL = 1e-3
SPACING_RTOL = 1e-3
DUPLICATE_TOL_MM = 0.01
GAP_ATOL_MM = 0.01
GAP_RTOL = 0.01
SHEAR_ATOL_MM = 0.01
SHEAR_PIXEL_FRACTION = 0.1

#: Modalities/SOP classes that are projection images even if a header carries plane attributes.
PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "IO", "PX", "RG", "XC", "OT"})
SECONDARY_CAPTURE = UID("1.2.840.10008.5.1.4.1.1.7")
_PLANE_VM = {"ImagePositionPatient": 3, "ImageOrientationPatient": 6}


@dataclass(frozen=True, eq=False)
class Image2D:
    """A single projection image (CR/DX/SC...).

    Attributes
    ----------
    pixels : numpy.ndarray
        float32 (rows, columns) in the source's convention after RescaleSlope/Intercept (for most
        CR/DX/SC there is no rescale, so these are the stored values; MONOCHROME1 is *not* inverted).
    dataset : pydicom.Dataset
        The source instance.
    pixel_spacing : tuple of float or None
        (row, column) spacing in mm from ``spacing_attr``; ``None`` when unknown (absent or zero).
    spacing_attr : str or None
        ``"PixelSpacing"``, ``"ImagerPixelSpacing"`` or ``None``.
    """

    pixels: np.ndarray
    dataset: Dataset
    pixel_spacing: tuple[float, float] | None
    spacing_attr: str | None

    @property
    def monochrome1(self) -> bool:
        return self.dataset.PhotometricInterpretation == "MONOCHROME1"

    @property
    def bits_stored(self) -> int:
        return int(self.dataset.BitsStored)

    def display_array(self) -> np.ndarray:
        """Intensities in [0, 1] as displayed (MONOCHROME2-like: bright = dense), for models."""
        return display_array(self.pixels, self.dataset)


@dataclass(frozen=True, eq=False)
class Volume:
    """Parallel slices of one series, sorted along the slice normal.

    ``voxels[k]`` is ``datasets[k]``; the centre of voxel (k, i, j) (slice, row, column) is at
    ``origin + j * pixel_spacing[1] * row_dir + i * pixel_spacing[0] * col_dir
    + k * slice_spacing * normal`` in patient coordinates (mm), with ``normal = row_dir x col_dir``.
    ``slice_spacing`` is ``None`` for a single slice, and for a stack that is not regular
    (``irregular`` then says why: gantry tilt or irregular gaps); such a stack is resampled in-plane
    only, every output slice where its source slice is (:func:`in_plane_only`).
    """

    voxels: np.ndarray
    datasets: tuple[Dataset, ...]
    origin: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    normal: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_spacing: float | None
    slice_thickness: float | None
    irregular: str | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.voxels.shape)  # type: ignore[return-value]

    @property
    def instance_numbers_ascending(self) -> bool:
        """Whether the source InstanceNumbers increase along the normal (outputs keep that sense)."""
        first = self.datasets[0].get("InstanceNumber")
        last = self.datasets[-1].get("InstanceNumber")
        if first is None or last is None or first == "" or last == "":
            return True
        return int(first) <= int(last)

    def position(self, k: float, pixel_spacing: tuple[float, float] | None = None, *,
                 from_source: bool = False) -> np.ndarray:
        """ImagePositionPatient of a slice at fractional index ``k`` (along the normal).

        With ``pixel_spacing`` (a resampled in-plane grid covering the same field of view), the
        first pixel centre moves by half the spacing change: grids are aligned on pixel edges.
        With ``from_source`` (integer ``k``), the base is source slice ``k``'s own position rather
        than the regular grid, so in-plane-only resampling leaves every slice exactly where it was.
        """
        if from_source:
            pos = np.array([float(v) for v in self.datasets[int(round(k))].ImagePositionPatient])
        else:
            pos = self.origin + k * (self.slice_spacing or 0.0) * self.normal
        if pixel_spacing is not None:
            pos = pos + 0.5 * (pixel_spacing[1] - self.pixel_spacing[1]) * self.row_dir
            pos = pos + 0.5 * (pixel_spacing[0] - self.pixel_spacing[0]) * self.col_dir
        return pos

    def sources_at(self, k: float) -> list[Dataset]:
        """The source slice at fractional index ``k``, or the two around it (clamped to the stack)."""
        lo = min(max(int(math.floor(k + 1e-6)), 0), self.shape[0] - 1)
        hi = min(max(int(math.ceil(k - 1e-6)), 0), self.shape[0] - 1)
        return [self.datasets[lo]] if lo >= hi else [self.datasets[lo], self.datasets[hi]]

    def slice_location(self, k: float) -> float | None:
        """SliceLocation at fractional index ``k``, extrapolated linearly from the sources."""
        values = [ds.get("SliceLocation") for ds in (self.datasets[0], self.datasets[-1])]
        if any(v is None or v == "" for v in values):
            return None
        first, last = (float(v) for v in values)
        if len(self.datasets) == 1:
            return first
        return first + k * (last - first) / (len(self.datasets) - 1)


def in_plane_only(vol: Volume, through_wanted: bool, inplane_changes: bool) -> str | None:
    """Whether a through-plane request must be dropped: ``None`` when the stack is regular (or no
    through-plane resampling is asked for), else the note for the SeriesDescription. A regular grid
    cannot be justified on a tilted or irregularly spaced stack (each slice's own position is kept
    instead); with nothing left to do in-plane, :class:`Refusal`."""
    if not through_wanted or vol.irregular is None:
        return None
    if not inplane_changes:
        raise Refusal(f"through-plane resampling needs regularly spaced slices along their normal; this series "
                      f"has {vol.irregular} (an in-plane factor would still apply)")
    logger.info("series %s: through-plane resampling skipped, in-plane only: %s",
                vol.datasets[0].get("SeriesInstanceUID", "?"), vol.irregular)
    return "in-plane only"


def load_series(datasets: Sequence[Dataset], *, min_slices: int = 1) -> Volume | list[Image2D]:
    """Check and decode one series.

    Parameters
    ----------
    datasets
        The instances of one series, in any order.
    min_slices
        Fewest slices accepted for a volume (pass 2 when through-plane resampling is wanted).

    Returns
    -------
    Volume or list of Image2D
        A :class:`Volume` for CT/MR-like slices, else one :class:`Image2D` per instance.

    Raises
    ------
    Refusal
        With a human-readable reason when the series cannot be processed.
    """
    if not datasets:
        raise Refusal("the series has no instances")
    for ds in datasets:
        _check_instance(ds)
    _check_same_series(datasets)
    datasets = multiframe.expand(datasets)
    input_checks.check_inputs(datasets)
    if _is_volume(datasets):
        volume = _load_volume(datasets, min_slices)
        valid_field.note_range(volume.datasets, volume.voxels)
        return volume
    images = [_load_image2d(ds) for ds in datasets]
    for image in images:
        valid_field.note_range([image.dataset], image.pixels)
    return images


def decode(ds: Dataset) -> np.ndarray:
    """Stored pixel values of a single-frame grayscale instance as float32, modality rescale applied.

    Uses the decoder directly (not ``ds.pixel_array``) so the decoded array is not cached on the
    caller's dataset.
    """
    if "ModalityLUTSequence" in ds:
        raise Refusal("a Modality LUT Sequence is not supported (only linear rescale)")
    ts = _transfer_syntax(ds) or UID("")
    source, index = multiframe.pixel_source(ds)
    try:
        arr, _ = get_decoder(ts).as_array(source, index=index)
    except Exception as exc:  # decoder errors have no common base class
        raise Refusal(f"pixel data could not be decoded ({ts.name}): {exc}") from exc
    out = arr.astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope != 1 or intercept != 0:
        out = out * np.float32(slope) + np.float32(intercept)
    values = padding_values(ds)
    outside = valid_field.detect(ds, arr, out, padding_mask(ds, arr), values[0] if values else None)
    if outside is not None and not outside.all():
        # Padding and the air outside a CT's reconstruction field (e.g. -3024 HU) take the darkest
        # real value, so that resampling does not ring off their step into real pixels; the derived
        # writer puts the input's value back where the output samples them (:mod:`valid_field`).
        real = out[~outside]
        out[outside] = np.clip(out[outside], real.min(), real.max())
    return out


def padding_values(ds: Dataset) -> tuple[int, int] | None:
    """(PixelPaddingValue, PixelPaddingRangeLimit or the value again) as stored values of the
    instance's pixel representation, or None when it declares no usable padding. Values written
    with the other sign's VR (US 63536 on signed pixels, a known vendor quirk) are read as the same
    bits."""
    def stored(value) -> int:
        value = int(value)
        bits = int(ds.get("BitsAllocated") or 16)
        if int(ds.get("PixelRepresentation") or 0) == 1 and value >= 2 ** (bits - 1):
            return value - 2**bits
        if int(ds.get("PixelRepresentation") or 0) == 0 and value < 0:
            return value + 2**bits
        return value

    try:
        value = stored(ds.PixelPaddingValue)
    except (AttributeError, TypeError, ValueError):
        return None
    try:
        return value, stored(ds.PixelPaddingRangeLimit)
    except (AttributeError, TypeError, ValueError):
        return value, value


def padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    """Where ``stored`` holds padding (C.7.5.1.1.2: the values from PixelPaddingValue to
    PixelPaddingRangeLimit); None when the instance declares none."""
    values = padding_values(ds)
    if values is None:
        return None
    return (stored >= min(values)) & (stored <= max(values))


def display_array(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    """Map modality values to displayed intensity in [0, 1], bright = dense (MONOCHROME2-like).

    Applies the first VOI window (WindowCenter/Width with VOILUTFunction, PS3.3 C.11.2.1.2) or else
    the first VOI LUT; without either, the image's min..max. MONOCHROME1 is inverted afterwards.
    """
    arr = pixels.astype(np.float64)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        out = _window(arr, _first(ds.WindowCenter), _first(ds.WindowWidth),
                      str(ds.get("VOILUTFunction", "LINEAR")).upper())
    elif ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2])
        out = apply_voi(arr, ds) / float(2**bits - 1)
    else:
        lo, hi = float(arr.min()), float(arr.max())
        out = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    out = np.clip(out, 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32)


def _window(arr: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (arr - center) / width))
    if function == "LINEAR_EXACT":
        return (arr - center) / width + 0.5
    return (arr - (center - 0.5)) / max(width - 1.0, 1e-6) + 0.5


def _first(value: object) -> float:
    """The first value of a DS that may be multi-valued (several VOI windows)."""
    return float(value[0] if isinstance(value, MultiValue) else value)  # type: ignore[arg-type,index]


def _check_instance(ds: Dataset) -> None:
    for keyword, words in (
        ("SOPInstanceUID", "SOP Instance UID"),
        ("SeriesInstanceUID", "Series Instance UID"),
        ("StudyInstanceUID", "Study Instance UID"),
        ("SOPClassUID", "SOP Class UID"),
    ):
        if not str(ds.get(keyword, "") or "").strip():
            raise Refusal(f"instance has no {words}")
    if "PixelData" not in ds:
        raise Refusal("instance has no Pixel Data (only uncompressed or encapsulated Pixel Data is supported)")
    if not _transfer_syntax(ds):
        raise Refusal("instance has no Transfer Syntax UID (file meta information missing)")
    multiframe.check_class(ds)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise Refusal(f"photometric interpretation {photometric or '(none)'} is not supported (grayscale only)")
    if int(ds.get("BitsAllocated", 0)) not in (8, 16):
        raise Refusal(f"BitsAllocated {ds.get('BitsAllocated')} is not supported (8 or 16)")
    if not 0 < int(ds.get("BitsStored", 0)) <= int(ds.BitsAllocated):
        raise Refusal(f"BitsStored {ds.get('BitsStored')} is not valid for BitsAllocated {ds.BitsAllocated}")
    ts = _transfer_syntax(ds)
    decoder = _decoder_or_none(ts)
    if decoder is None or not decoder.is_available:
        raise Refusal(f"no decoder available for transfer syntax {ts.name or ts}")


def _transfer_syntax(ds: Dataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    value = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(value) if value else None


def _decoder_or_none(ts: UID):  # noqa: ANN202 - pydicom's Decoder type is internal
    try:
        return get_decoder(ts)
    except NotImplementedError:
        return None


def _check_same_series(datasets: Sequence[Dataset]) -> None:
    if len({ds.SeriesInstanceUID for ds in datasets}) > 1:
        raise Refusal(f"instances belong to {len({ds.SeriesInstanceUID for ds in datasets})} different series")
    if len({ds.SOPClassUID for ds in datasets}) > 1:
        raise Refusal("instances of one series have different SOP classes")
    if len({ds.SOPInstanceUID for ds in datasets}) != len(datasets):
        raise Refusal("the same SOP Instance UID occurs more than once")


def _is_volume(datasets: Sequence[Dataset]) -> bool:
    with_plane = [all(k in ds and ds[k].VM == vm for k, vm in _PLANE_VM.items()) for ds in datasets]
    modality = str(datasets[0].get("Modality", ""))
    if modality in PROJECTION_MODALITIES or datasets[0].SOPClassUID == SECONDARY_CAPTURE:
        return False
    if all(with_plane):
        return True
    if any(with_plane):
        raise Refusal("some instances have ImagePositionPatient/ImageOrientationPatient and some do not")
    return False


def _load_image2d(ds: Dataset) -> Image2D:
    spacing, attr = None, None
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        value = _spacing(ds, keyword)
        if value is not None:
            spacing, attr = value, keyword
            break
    return Image2D(pixels=decode(ds), dataset=ds, pixel_spacing=spacing, spacing_attr=attr)


def _spacing(ds: Dataset, keyword: str) -> tuple[float, float] | None:
    """A (row, column) spacing in mm, or ``None`` when absent, malformed or not positive."""
    value = ds.get(keyword)
    try:
        row, col = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    if not (row > 0 and col > 0 and math.isfinite(row) and math.isfinite(col)):
        return None
    return row, col


def _load_volume(datasets: Sequence[Dataset], min_slices: int) -> Volume:
    n = len(datasets)
    if n < min_slices:
        raise Refusal(f"the series has {n} slice{'s' * (n != 1)}; at least {min_slices} are needed")
    first = datasets[0]
    if any((ds.Rows, ds.Columns) != (first.Rows, first.Columns) for ds in datasets):
        raise Refusal("slices have different matrix sizes (Rows/Columns)")

    iops = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in datasets])
    row_dir, col_dir = iops[0, :3], iops[0, 3:]
    if (abs(np.linalg.norm(row_dir) - 1) > ORIENTATION_TOL or abs(np.linalg.norm(col_dir) - 1) > ORIENTATION_TOL
            or abs(row_dir @ col_dir) > ORIENTATION_TOL):
        raise Refusal("ImageOrientationPatient is not a pair of orthogonal unit vectors")
    if np.abs(iops - iops[0]).max() > ORIENTATION_TOL:
        raise Refusal("slices have different orientations (ImageOrientationPatient)")
    row_dir = row_dir / np.linalg.norm(row_dir)
    col_dir = col_dir / np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)

    spacings = [_spacing(ds, "PixelSpacing") for ds in datasets]
    if any(s is None for s in spacings):
        raise Refusal("PixelSpacing is missing or zero")
    spacing_arr = np.array(spacings, dtype=float)
    if (np.abs(spacing_arr - spacing_arr[0]) > SPACING_RTOL * spacing_arr[0]).any():
        raise Refusal("slices have different PixelSpacing")
    spacing = (float(spacing_arr[0, 0]), float(spacing_arr[0, 1]))

    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    positions, along = positions[order], along[order]
    sorted_ds = tuple(datasets[i] for i in order)
    slice_spacing, irregular = _check_stack(positions, along, normal, spacing) if n > 1 else (None, None)

    voxels = np.empty((n, int(first.Rows), int(first.Columns)), dtype=np.float32)
    for k, ds in enumerate(sorted_ds):
        voxels[k] = decode(ds)
    thickness = first.get("SliceThickness")
    logger.debug("volume %s slices, spacing %s x %s mm", voxels.shape, spacing, slice_spacing)
    return Volume(
        voxels=voxels,
        datasets=sorted_ds,
        origin=positions[0],
        row_dir=row_dir,
        col_dir=col_dir,
        normal=normal,
        pixel_spacing=spacing,
        slice_spacing=slice_spacing,
        slice_thickness=float(thickness) if thickness not in (None, "") else None,
        irregular=irregular,
    )


def _check_stack(positions: np.ndarray, along: np.ndarray, normal: np.ndarray,
                 spacing: tuple[float, float]) -> tuple[float | None, str | None]:
    """Check sorted slice positions: (slice spacing in mm, None) for a regular stack along the
    normal, else (None, why not: gantry tilt or irregular gaps). Duplicates are refused."""
    gaps = np.diff(along)
    duplicates = int((gaps < DUPLICATE_TOL_MM).sum())
    if duplicates:
        raise Refusal(f"{duplicates} slice position{'s are' if duplicates > 1 else ' is'} duplicated "
                      "(several instances at the same position)")
    offsets = positions - positions[0]
    shear = offsets - np.outer(offsets @ normal, normal)
    shear_tol = max(SHEAR_ATOL_MM, SHEAR_PIXEL_FRACTION * min(spacing))
    problems = []
    if np.linalg.norm(shear, axis=1).max() > shear_tol:
        stack = offsets[-1] / np.linalg.norm(offsets[-1])
        angle = math.degrees(math.acos(min(1.0, abs(float(stack @ normal)))))
        problems.append(f"gantry tilt {angle:.1f} deg (slice positions are not along the slice normal)")
    median = float(np.median(gaps))
    worst = float(np.abs(gaps - median).max())
    if worst > max(GAP_ATOL_MM, GAP_RTOL * median):
        problems.append(f"irregular slice spacing (gaps from {gaps.min():.2f} to {gaps.max():.2f} mm)")
    if problems:
        return None, " and ".join(problems)
    return float((along[-1] - along[0]) / (len(along) - 1)), None
