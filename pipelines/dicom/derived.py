"""Derived-series writer: resampled pixel arrays -> DICOM instances of the source's SOP class.

Every pipeline that produces images (interp, cxr, sr3d, arbitrary, ...) writes them with
:func:`write_derived`, following ``shared/notes/dicom-outputs.md`` ("Super-resolved (derived)
images"): one ``copy.deepcopy`` of a source instance per output instance, same SOP class, Study and
Patient, new deterministic Series/SOP Instance UIDs, ``DERIVED\\SECONDARY`` image type, geometry
updated so the field of view is kept, the source referenced (General Image module Source Image
Sequence, CID 7202 purpose 121322), the derivation coded (CID 7203, 113085 "Spatial resampling"),
the node listed as contributing equipment (SOP Common module, purpose 109102), and pixel data in the
source's stored representation, uncompressed Explicit VR Little Endian.

Series numbers: ``source SeriesNumber + series_number_offset`` (1000 for interp; each pipeline uses
its own offset so outputs of different pipelines on one series do not share a number); when that
leaves the IS range, or the source has none, the offset alone. Reruns (``context.version > 1``)
keep the number and add `` vN`` to the description.

Kept from the source: patient, study, equipment, acquisition and dates (ContentDate/Time too, so a
rerun gives identical instances), VOI windows and LUTs (valid: the stored representation is
unchanged), LossyImageCompression (set to 01 when the source syntax is lossy, or may be and the source
does not say).
Dropped from the copy because they would be wrong or stale: private elements (vendor data about
the original slice), group lengths, overlay and curve groups (60xx/50xx, sized to the old matrix),
Smallest/Largest pixel values, encapsulation leftovers and trailing padding.
Values: an output slice holding NaN or infinity fails the job (:mod:`pipelines.dicom.input_checks`:
rounding to stored values would hide it); every output slice goes through :func:`pipelines.dicom.valid_field.guard` (the input
series' range plus 2 %, no ringing at the edges of projection images, and the input's own value
where the output samples padding or the air outside a CT's reconstruction field).
"""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian
from pydicom.valuerep import DSfloat

from pipelines.base import RunContext
from pipelines.dicom import input_checks, multiframe, valid_field
from pipelines.dicom.derived_multiframe import combine
from pipelines.dicom.series import Volume

logger = logging.getLogger(__name__)

RESEARCH_USE = "research use"
MANUFACTURER = "srnode"
IS_MAX = 2**31 - 1
LO_MAX = 64

SOURCE_IMAGE_PURPOSE = ("121322", "DCM", "Source image for image processing operation")
SPATIAL_RESAMPLING = ("113085", "DCM", "Spatial resampling")
PROCESSING_EQUIPMENT = ("109102", "DCM", "Processing Equipment")

#: Bytes per word of the binary VRs whose raw value depends on the byte order.
WORD_BYTES = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}
#: Spacing attributes scaled with the matrix (mm per pixel; FOV = Rows x spacing is kept).
SPACING_ATTRIBUTES = ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing")
#: Pixel-coordinate attributes (1-based; display shutter C.7.6.11, DX collimator C.8.11.6):
#: keyword -> kind of each value: a pixel centre ("row"/"col"), the first or last pixel inside an
#: edge ("first_*"/"last_*": the edge keeps enclosing the same area), or a length ("radius").
PIXEL_COORDINATES = {
    "ShutterLeftVerticalEdge": ("first_col",), "ShutterRightVerticalEdge": ("last_col",),
    "ShutterUpperHorizontalEdge": ("first_row",), "ShutterLowerHorizontalEdge": ("last_row",),
    "CenterOfCircularShutter": ("row", "col"), "RadiusOfCircularShutter": ("radius",),
    "VerticesOfThePolygonalShutter": ("row", "col"),
    "CollimatorLeftVerticalEdge": ("first_col",), "CollimatorRightVerticalEdge": ("last_col",),
    "CollimatorUpperHorizontalEdge": ("first_row",), "CollimatorLowerHorizontalEdge": ("last_row",),
    "CenterOfCircularCollimator": ("row", "col"), "RadiusOfCircularCollimator": ("radius",),
    "VerticesOfThePolygonalCollimator": ("row", "col"),
}
STALE_ATTRIBUTES = (
    "SmallestImagePixelValue", "LargestImagePixelValue", "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries", "SmallestImagePixelValueInPlane", "LargestImagePixelValueInPlane",
    "ExtendedOffsetTable", "ExtendedOffsetTableLengths", "DataSetTrailingPadding",
    "SourceImageSequence", "DerivationCodeSequence", "DerivationDescription",
)
#: Transfer syntaxes that are always lossy (PS3.3 C.7.6.1.1.5: once lossy, always flagged).
LOSSY_SYNTAXES = {"1.2.840.10008.1.2.4.50": "ISO_10918_1", "1.2.840.10008.1.2.4.51": "ISO_10918_1"}
#: Syntaxes that may be lossy (JPEG 2000, JPEG-LS near-lossless): flagged unless the source says 00.
MAYBE_LOSSY_SYNTAXES = {"1.2.840.10008.1.2.4.91": "ISO_15444_1", "1.2.840.10008.1.2.4.81": "ISO_14495_1"}


@dataclass(frozen=True)
class DerivedSeries:
    """What every instance of one derived series shares.

    Attributes
    ----------
    description
        What was done, e.g. ``"super-res x2 lanczos (interpolation)"``; the writer puts the source's
        SeriesDescription before it and ``" - research use"`` (``" v{version}"`` for reruns) after it.
    derivation_description
        Free text for DerivationDescription and the equipment's ContributionDescription.
    model_name
        ManufacturerModelName of the contributing equipment (pipeline or model name).
    model_version
        Version (or weights sha256) of the model, listed after the node version in SoftwareVersions.
    key
        Names this series inside a run, for UIDs (a run that writes several series uses several keys).
    series_number_offset
        Added to the source SeriesNumber (see the module docstring).
    slice_thickness, spacing_between_slices
        Values to write (mm); ``None`` keeps the source's (and does not add an absent attribute).
    images_in_acquisition
        New ImagesInAcquisition, written only where the source has the attribute.
    """

    description: str
    derivation_description: str
    model_name: str
    model_version: str | None = None
    key: str = "derived"
    series_number_offset: int = 1000
    slice_thickness: float | None = None
    spacing_between_slices: float | None = None
    images_in_acquisition: int | None = None


@dataclass(frozen=True, eq=False)
class DerivedSlice:
    """One output instance before encoding.

    Attributes
    ----------
    pixels
        (rows, columns) values in the template's modality units (after its rescale), same photometric
        convention; they are inverse-rescaled, rounded and clipped to the stored range.
    template
        The source instance whose header is copied (for new slices: the nearest source slice).
    sources
        Source instances the pixels were computed from, for SourceImageSequence.
    index
        0-based position in the output series: InstanceNumber is ``index + 1``.
    position
        New ImagePositionPatient (mm), or ``None`` where the template has no plane geometry.
    slice_location
        New SliceLocation, written only where the template has the attribute.
    """

    pixels: np.ndarray
    template: Dataset
    sources: Sequence[Dataset]
    index: int
    position: Sequence[float] | None = None
    slice_location: float | None = None


def volume_slice(volume: Volume, pixels: np.ndarray, k: float, j: int, n_out: int,
                 pixel_spacing: tuple[float, float], through: bool) -> DerivedSlice:
    """Output slice ``j`` of ``n_out`` of ``volume``, at fractional source index ``k``: the nearest
    source slice as template, the one or two around it as sources, the instance number in the
    sources' sense, and its position (resampled between slices when ``through``, else source slice
    ``k``'s own, moved only for the in-plane grid)."""
    return DerivedSlice(
        pixels=pixels,
        template=volume.datasets[min(max(int(math.floor(k + 0.5)), 0), volume.shape[0] - 1)],
        sources=volume.sources_at(k),
        index=j if volume.instance_numbers_ascending else n_out - 1 - j,
        position=volume.position(k, pixel_spacing, from_source=not through),
        slice_location=volume.slice_location(k) if through else None,
    )


def write_derived(slices: Iterable[DerivedSlice], series: DerivedSeries, context: RunContext) -> Iterator[Dataset]:
    """Yield one DICOM dataset per slice, as the slices come (streaming); frames of a multi-frame
    source become one multi-frame instance of its SOP class (:mod:`pipelines.dicom.derived_multiframe`),
    yielded when the last frame is made."""
    frames = []
    for item in slices:
        if multiframe.is_frame(item.template):
            frames.append((item.template, build_instance(item, series, context)))
        else:
            yield build_instance(item, series, context)
    if frames:
        yield combine(frames, context.uid(series.key, "dimension organization"))


def build_instance(item: DerivedSlice, series: DerivedSeries, context: RunContext) -> Dataset:
    """The derived instance for one slice (see the module docstring for what changes)."""
    src = item.template
    out = copy.deepcopy(src)
    _drop_stale(out)

    out.SeriesInstanceUID = context.uid(series.key, "series")
    out.SOPInstanceUID = context.uid(series.key, "instance", item.index)
    out.SeriesNumber = derived_series_number(src.get("SeriesNumber"), series.series_number_offset)
    out.InstanceNumber = item.index + 1
    out.SeriesDescription = series_description(series.description, context.version, src.get("SeriesDescription"))
    out.ImageType = derived_image_type(src.get("ImageType"))

    _set_file_meta(out)  # before the pixels: set_pixel_data refuses a big-endian source syntax
    _update_geometry(out, src, item, series)
    input_checks.check_output_pixels(item.pixels, item.index)
    _set_pixels(out, src, item.pixels)
    _set_derivation(out, item.sources, series, context)
    return out


def series_description(description: str, version: int = 1, original: object = None, flag: str | None = None) -> str:
    """``"<original> <description>[ - <flag>] - research use[ vN]"``, shortened to fit LO (64
    characters): the source's own description is cut first, then the end of ``description``; the flag
    (the QA's, :data:`pipelines.qa.FLAG`) never. Pipelines describe their work as ``"super-res ..."``,
    never ``"SR ..."``, which a PACS series list shows beside Structured Reports (modality SR)."""
    suffix = (f" - {flag}" if flag else "") + f" - {RESEARCH_USE}" + (f" v{version}" if version > 1 else "")
    room = LO_MAX - len(suffix)
    description = _cut(description, room)
    head = _cut(" ".join(str(original or "").split()), max(room - len(description) - 1, 0))
    return f"{head} {description}".strip() + suffix


def _cut(text: str, room: int) -> str:
    """``text`` in at most ``room`` characters: cut at a word where there is one, and never inside
    brackets (an unclosed "(" and what follows it go)."""
    if len(text) <= room:
        return text
    text = text[:room + 1].rsplit(" ", 1)[0] if " " in text[:room + 1] else text[:room]
    if text.count("(") > text.count(")"):
        text = text[:text.rfind("(")]
    return text.rstrip()


def flag_description(written: str, flag: str, version: int = 1, original: object = None) -> str:
    """``written`` (a :func:`series_description` of ``version`` and ``original``) with ``flag`` added,
    as :func:`series_description` would have made it: the pipeline's own words are recovered from
    ``written`` (the text after the source's, possibly cut, description)."""
    suffix = f" - {RESEARCH_USE}" + (f" v{version}" if version > 1 else "")
    body = written[:-len(suffix)] if written.endswith(suffix) else written
    if body.endswith(f" - {flag}"):
        return written
    head = " ".join(str(original or "").split())
    k = 0
    while k < min(len(body), len(head)) and body[k] == head[k]:
        k += 1
    if k < len(body) and body[k] != " ":  # the head was cut at a word before this point
        k = body.rfind(" ", 0, k) + 1 if " " in body[:k] else 0
    return series_description(body[k:].strip(), version, original, flag)


def derived_series_number(source: object, offset: int) -> int:
    """Deterministic SeriesNumber: source + offset, or the offset alone when that is not possible."""
    try:
        number = int(source) + offset  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return offset
    return number if -IS_MAX - 1 <= number <= IS_MAX else offset


def derived_image_type(source: object) -> list[str]:
    """``DERIVED\\SECONDARY`` followed by the source's values 3 and up (e.g. AXIAL)."""
    if source is None or source == "":
        values: list[str] = []
    elif isinstance(source, str):
        values = [source]
    else:
        values = [str(v) for v in source]  # type: ignore[attr-defined]
    return ["DERIVED", "SECONDARY", *values[2:]]


def code_item(code: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def ds_value(value: float) -> DSfloat:
    """A DS that fits 16 characters."""
    return DSfloat(float(value), auto_format=True)


def _drop_stale(out: Dataset) -> None:
    for tag in list(out.keys()):
        group, element = tag.group, tag.element
        if (tag.is_private or element == 0 or (0x6000 <= group <= 0x60FF and group % 2 == 0)
                or (0x5000 <= group <= 0x50FF and group % 2 == 0)):
            del out[tag]
    for keyword in STALE_ATTRIBUTES:
        if keyword in out:
            del out[keyword]


def _to_little_endian(out: Dataset) -> None:
    """Re-declare a big-endian source's copy as little endian (pydicom will not switch the byte
    order on save, as it cannot know which raw values are words). Every element is decoded first;
    numeric values are then order-free, and the raw words of OW/OL/OF/OD/OV values are swapped.
    The pixel data is not: it is replaced."""
    for elem in out.iterall():
        size = WORD_BYTES.get(elem.VR)
        if size and elem.keyword != "PixelData" and isinstance(elem.value, bytes):
            elem.value = np.frombuffer(elem.value, f">u{size}").astype(f"<u{size}").tobytes()
    out.set_original_encoding(False, True)


def _update_geometry(out: Dataset, src: Dataset, item: DerivedSlice, series: DerivedSeries) -> None:
    rows, cols = item.pixels.shape
    row_factor = rows / int(src.Rows)  # >1 when upsampling
    col_factor = cols / int(src.Columns)
    for keyword in SPACING_ATTRIBUTES:
        if keyword not in src:
            continue
        try:
            row_mm, col_mm = (float(v) for v in src[keyword].value)
        except (TypeError, ValueError):
            row_mm = col_mm = 0.0
        if row_mm > 0 and col_mm > 0:
            out[keyword].value = [ds_value(row_mm / row_factor), ds_value(col_mm / col_factor)]
        else:  # zero means unknown and is invalid; absence says unknown correctly
            del out[keyword]
    if "PixelAspectRatio" in src and row_factor != col_factor:
        _set_aspect_ratio(out, src, row_factor, col_factor)
    for keyword, kinds in PIXEL_COORDINATES.items():
        if keyword in src and src[keyword].VM:
            scaled = _scale_coordinates(src, keyword, kinds, row_factor, col_factor)
            if scaled is not None:
                out[keyword].value = scaled
    if item.position is not None:
        out.ImagePositionPatient = [ds_value(v) for v in item.position]
    if item.slice_location is not None and "SliceLocation" in src:
        out.SliceLocation = ds_value(item.slice_location)
    if series.slice_thickness is not None:
        out.SliceThickness = ds_value(series.slice_thickness)
    if series.spacing_between_slices is not None:
        out.SpacingBetweenSlices = ds_value(series.spacing_between_slices)
    if series.images_in_acquisition is not None and "ImagesInAcquisition" in src:
        out.ImagesInAcquisition = series.images_in_acquisition


def _set_aspect_ratio(out: Dataset, src: Dataset, row_factor: float, col_factor: float) -> None:
    """PixelAspectRatio (vertical : horizontal pixel size, integers) after resampling rows and columns
    by different factors; dropped when the source's is unreadable (it is needed only without a
    pixel spacing, C.7.6.3.1.7)."""
    try:
        vertical, horizontal = (int(v) for v in src.PixelAspectRatio)
        ratio = Fraction(vertical, horizontal) * Fraction(col_factor).limit_denominator(10**4) \
            / Fraction(row_factor).limit_denominator(10**4)
    except (TypeError, ValueError, ZeroDivisionError):
        del out.PixelAspectRatio
        return
    ratio = ratio.limit_denominator(10**4)
    out.PixelAspectRatio = [ratio.numerator, ratio.denominator]


def _scale_coordinates(src: Dataset, keyword: str, kinds: tuple[str, ...], row_factor: float,
                       col_factor: float) -> list[int] | None:
    """Map 1-based pixel coordinates (pixel centres ``p - 0.5`` scale with the matrix).

    Returns ``None`` (leave the value alone) when a value lies outside the source matrix: some
    vendors write these attributes in other units (e.g. mm from the centre), which cannot be mapped.
    """
    value = src[keyword].value
    values = [int(v) for v in value] if isinstance(value, (MultiValue, list, tuple)) else [int(value)]
    limits = {"row": int(src.Rows), "col": int(src.Columns)}
    out = []
    for i, v in enumerate(values):
        kind = kinds[i % len(kinds)]
        if kind == "radius":
            out.append(max(1, round(v * col_factor)))
            continue
        axis = kind.rsplit("_", 1)[-1]
        if not 1 <= v <= limits[axis]:
            logger.debug("%s value %s is outside the source matrix: left unchanged", keyword, v)
            return None
        factor = row_factor if axis == "row" else col_factor
        if kind.startswith("first"):  # pixel v spans [v - 1, v) in edge coordinates
            new = math.floor((v - 1) * factor + 1e-9) + 1
        elif kind.startswith("last"):
            new = math.ceil(v * factor - 1e-9)
        else:
            new = round((v - 0.5) * factor + 0.5)
        out.append(min(max(new, 1), round(limits[axis] * factor)))
    return out


def stored_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    if signed:
        return -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1
    return 0, 2**bits_stored - 1


def to_stored(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality values -> stored values of ``ds``'s representation (inverse rescale, round, clip)."""
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    values = (pixels.astype(np.float64) - intercept) / slope
    signed = int(ds.PixelRepresentation) == 1
    lo, hi = stored_range(int(ds.BitsStored), signed)
    dtype = {(8, False): np.uint8, (8, True): np.int8, (16, False): np.uint16, (16, True): np.int16}[
        (int(ds.BitsAllocated), signed)
    ]
    return np.clip(np.rint(values), lo, hi).astype(dtype)


def _set_pixels(out: Dataset, src: Dataset, pixels: np.ndarray) -> None:
    if pixels.ndim != 2:
        raise ValueError(f"a derived slice must be 2D, got shape {pixels.shape}")
    ts = UID(src.file_meta.TransferSyntaxUID)
    declared = out.get("LossyImageCompression")
    if (ts in LOSSY_SYNTAXES and declared != "01") or (ts in MAYBE_LOSSY_SYNTAXES and declared is None):
        out.LossyImageCompression = "01"
        out.LossyImageCompressionMethod = {**LOSSY_SYNTAXES, **MAYBE_LOSSY_SYNTAXES}[ts]
    pixels, outside, fill = valid_field.guard(pixels, src)
    stored = to_stored(pixels, src)
    if outside is not None and fill is not None:
        lo, hi = stored_range(int(src.BitsStored), int(src.PixelRepresentation) == 1)
        if lo <= fill <= hi:
            stored[outside] = fill
    out.set_pixel_data(stored, str(src.PhotometricInterpretation), int(src.BitsStored), generate_instance_uid=False)


def _set_derivation(out: Dataset, sources: Sequence[Dataset], series: DerivedSeries, context: RunContext) -> None:
    refs = []
    for source in sources:
        ref = Dataset()
        ref.ReferencedSOPClassUID = source.SOPClassUID
        ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
        frame = multiframe.pixel_source(source)[1]
        if frame is not None:
            ref.ReferencedFrameNumber = frame + 1
        ref.PurposeOfReferenceCodeSequence = DicomSequence([code_item(SOURCE_IMAGE_PURPOSE)])
        refs.append(ref)
    out.SourceImageSequence = DicomSequence(refs)
    out.DerivationDescription = series.derivation_description[:1024]
    out.DerivationCodeSequence = DicomSequence([code_item(SPATIAL_RESAMPLING)])

    equipment = Dataset()
    equipment.Manufacturer = MANUFACTURER
    equipment.ManufacturerModelName = series.model_name[:LO_MAX]
    versions = [v for v in (context.software_version, series.model_version) if v]
    if versions:
        equipment.SoftwareVersions = versions
    equipment.ContributionDescription = series.derivation_description[:1024]
    equipment.PurposeOfReferenceCodeSequence = DicomSequence([code_item(PROCESSING_EQUIPMENT)])
    previous = list(out.get("ContributingEquipmentSequence", []))
    out.ContributingEquipmentSequence = DicomSequence([*previous, equipment])


def _set_file_meta(out: Dataset) -> None:
    if out.original_encoding[1] is False:
        _to_little_endian(out)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = out.SOPClassUID
    meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out.file_meta = meta
