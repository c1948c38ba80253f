"""Derived frames of a multi-frame source -> one multi-frame instance of the source's SOP class.

Enhanced in, enhanced out: when the series was (Legacy Converted) Enhanced CT/MR, the derived writer
first makes every output frame as it makes a single-frame slice (new pixel spacing, position, stored
pixels, source references with ReferencedFrameNumber, equipment, UIDs), then :func:`combine` puts
them into one instance built on the source instance's header, as a converter to the enhanced family
would:

- Shared Functional Groups: Pixel Measures gets the new pixel spacing (and slice thickness /
  spacing between slices when they changed); the CT/MR Image Frame Type becomes DERIVED;
- Per-frame Functional Groups, one item per output frame, copied from the source frame the output
  frame was made from (its template) with the new Plane Position (Patient), Frame Content (in-stack
  position and dimension index values of the new stack), and a Derivation Image item whose Source
  Image Sequence references the source frames (instance and ReferencedFrameNumber) with purpose
  121322 and derivation code 113085; stale per-frame values of a legacy conversion (the converted
  instance's InstanceNumber and SliceLocation, its Conversion Source reference) are dropped;
- one dimension, Image Position (Patient), under a new Dimension Organization UID (several stacks
  or temporal positions were refused on input: the output is one stack);
- Source Image Evidence Sequence listing every referenced source instance; frames ordered as the
  source's frames run along the slice normal.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag

from pipelines.dicom.multiframe import Frame

FRAME_TYPE_GROUPS = ("CTImageFrameTypeSequence", "MRImageFrameTypeSequence")
#: Top-level attributes the combined instance takes from the first derived frame.
IDENTITY = ("SOPInstanceUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "ContributingEquipmentSequence",
            "LossyImageCompression", "LossyImageCompressionMethod", "LossyImageCompressionRatio",
            "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored",
            "HighBit", "PixelRepresentation")
#: Top-level attributes of a single-frame derived image that the enhanced IODs keep in functional groups.
NOT_TOP_LEVEL = ("SourceImageSequence", "DerivationDescription", "DerivationCodeSequence", "SourceImageEvidenceSequence",
                 "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                 "RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth",
                 "SliceLocation", "SmallestImagePixelValue", "LargestImagePixelValue")
#: Per-frame values of a legacy conversion that describe the converted instance, not the derived frame.
STALE_CONVERTED = ("InstanceNumber", "SliceLocation", "ImagePositionPatient")


def combine(frames: Sequence[tuple[Frame, Dataset]], dimension_uid: str) -> Dataset:
    """One multi-frame instance from ``(template frame, derived single-frame dataset)`` pairs."""
    frames = sorted(frames, key=lambda pair: int(pair[1].InstanceNumber))
    first = frames[0][1]
    out = _header(frames[0][0].instance)
    for keyword in IDENTITY:
        if keyword in first:
            out[keyword] = copy.deepcopy(first[keyword])
    out.InstanceNumber = 1
    out.ImageType = enhanced_image_type(out.get("ImageType"))
    out.file_meta = copy.deepcopy(first.file_meta)

    shared = out.SharedFunctionalGroupsSequence[0]
    _pixel_measures(shared, first)
    _frame_type(shared)
    for group in ("DerivationImageSequence", "PlanePositionSequence"):
        if group in shared:
            del shared[group]
    per_frame = []
    for j, (template, derived) in enumerate(frames):
        item = copy.deepcopy(template.instance.PerFrameFunctionalGroupsSequence[template.number - 1])
        item.remove_private_tags()
        if "PixelMeasuresSequence" in item:
            _pixel_measures(item, derived)
        _frame_type(item)
        item.PlanePositionSequence = DicomSequence([_dataset(ImagePositionPatient=derived.ImagePositionPatient)])
        content = item.FrameContentSequence[0] if "FrameContentSequence" in item else Dataset()
        item.FrameContentSequence = DicomSequence([content])
        content.DimensionIndexValues = [j + 1]
        if "StackID" in content or "InStackPositionNumber" in content:
            content.InStackPositionNumber = j + 1
        item.DerivationImageSequence = DicomSequence([_dataset(
            DerivationDescription=derived.DerivationDescription,
            DerivationCodeSequence=copy.deepcopy(derived.DerivationCodeSequence),
            SourceImageSequence=copy.deepcopy(derived.SourceImageSequence),
        )])
        converted = item.get("UnassignedPerFrameConvertedAttributesSequence")
        for keyword in STALE_CONVERTED if converted else ():
            if keyword in converted[0]:
                del converted[0][keyword]
        if "ConversionSourceAttributesSequence" in item:
            del item.ConversionSourceAttributesSequence
        per_frame.append(item)
    out.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    out.DimensionOrganizationSequence = DicomSequence([_dataset(DimensionOrganizationUID=dimension_uid)])
    out.DimensionIndexSequence = DicomSequence([_dataset(
        DimensionOrganizationUID=dimension_uid,
        DimensionIndexPointer=Tag("ImagePositionPatient"),
        FunctionalGroupPointer=Tag("PlanePositionSequence"),
        DimensionDescriptionLabel="Image Position (Patient)",
    )])
    out.SourceImageEvidenceSequence = _evidence([d for _, d in frames], str(out.StudyInstanceUID),
                                                str(frames[0][0].SeriesInstanceUID))
    out.NumberOfFrames = len(frames)
    data = b"".join(_frame_bytes(d) for _, d in frames)
    out.PixelData = data + b"\0" * (len(data) % 2)
    out["PixelData"].VR = "OB" if int(out.BitsAllocated) == 8 else "OW"
    return out


def enhanced_image_type(source: object) -> list[str]:
    """Image/Frame Type of a derived enhanced image: ``DERIVED\\PRIMARY`` (value 2 of the enhanced
    IODs is PRIMARY only), the source's value 3 (image flavor) and ``RESAMPLED`` as the derived pixel
    contrast (value 4)."""
    values = [] if source in (None, "") else [source] if isinstance(source, str) else [str(v) for v in source]
    flavor = values[2] if len(values) > 2 else "VOLUME"
    return ["DERIVED", "PRIMARY", flavor, "RESAMPLED"]


def _header(instance: Dataset) -> Dataset:
    """The instance's header without pixel data or private elements, deep-copied."""
    out = Dataset()
    for elem in instance:
        if elem.tag != Tag("PixelData") and elem.tag.element != 0:
            out.add(copy.deepcopy(elem))
    out.remove_private_tags()
    for keyword in NOT_TOP_LEVEL:
        if keyword in out:
            del out[keyword]
    return out


def _pixel_measures(item: Dataset, derived: Dataset) -> None:
    measures = item.get("PixelMeasuresSequence")
    if not measures:
        return
    for keyword in ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices"):
        if keyword in derived and (keyword in measures[0] or keyword == "PixelSpacing"):
            measures[0][keyword] = copy.deepcopy(derived[keyword])


def _frame_type(item: Dataset) -> None:
    for group in FRAME_TYPE_GROUPS:
        if item.get(group):
            item[group][0].FrameType = enhanced_image_type(item[group][0].get("FrameType"))


def _evidence(derived: Sequence[Dataset], study_uid: str, series_uid: str) -> DicomSequence:
    """Hierarchical SOP Instance Reference (PS3.3 C.17.2) of every source instance referenced (all
    of the one source series)."""
    instances = {str(ref.ReferencedSOPInstanceUID): str(ref.ReferencedSOPClassUID)
                 for ds in derived for ref in ds.SourceImageSequence}
    refs = [_dataset(ReferencedSOPClassUID=cls, ReferencedSOPInstanceUID=uid) for uid, cls in instances.items()]
    series = _dataset(SeriesInstanceUID=series_uid, ReferencedSOPSequence=DicomSequence(refs))
    return DicomSequence([_dataset(StudyInstanceUID=study_uid, ReferencedSeriesSequence=DicomSequence([series]))])


def _frame_bytes(ds: Dataset) -> bytes:
    size = int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated) // 8 * int(ds.get("SamplesPerPixel") or 1)
    return bytes(ds.PixelData[:size])


def _dataset(**values) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item
