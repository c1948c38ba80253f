"""Enhanced and Legacy Converted Enhanced CT/MR multi-frame instances, one frame at a time.

A multi-frame instance keeps each frame's geometry and values in functional groups (PS3.3 C.7.6.16):
Plane Position (Patient), Plane Orientation (Patient), Pixel Measures, Pixel Value Transformation,
Frame VOI LUT and Frame Content (stack, in-stack position, temporal position, dimension index
values), each in the Shared Functional Groups Sequence (all frames) or in the frame's item of the
Per-frame Functional Groups Sequence (which wins). :func:`expand` turns every frame into a
:class:`Frame`: a dataset with the instance's top-level attributes and that frame's values under
their single-frame keywords (ImagePositionPatient, PixelSpacing, RescaleSlope, WindowCenter...), so
the volume checks of the series loader apply to frames exactly as to single-frame slices, and the
derived writer knows which instance and frame each came from.

Refused here, each with its reason: multi-frame SOP classes other than (Legacy Converted) Enhanced
CT/MR; an instance without functional groups, or whose frames lack a plane position, orientation or
pixel spacing; frames of several stacks, of several temporal positions, or varying along any other
dimension of the Dimension Index (echoes, b-values, cardiac phases...: several volumes, and no clear
choice among them); frames of several orientations (a localizer). The loader then refuses what
single-frame slices are refused for (different pixel spacing, duplicate positions...).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
from pydicom import Dataset
from pydicom.datadict import keyword_for_tag
from pydicom.tag import Tag
from pydicom.uid import UID

from pipelines.base import Refusal

ENHANCED_CT = UID("1.2.840.10008.5.1.4.1.1.2.1")
LEGACY_ENHANCED_CT = UID("1.2.840.10008.5.1.4.1.1.2.2")
ENHANCED_MR = UID("1.2.840.10008.5.1.4.1.1.4.1")
LEGACY_ENHANCED_MR = UID("1.2.840.10008.5.1.4.1.1.4.4")
VOLUME_CLASSES = frozenset({ENHANCED_CT, LEGACY_ENHANCED_CT, ENHANCED_MR, LEGACY_ENHANCED_MR})

#: Functional group -> the frame values it holds, copied to the frame under the same keywords.
GROUPS = {
    "PlanePositionSequence": ("ImagePositionPatient",),
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices"),
    "PixelValueTransformationSequence": ("RescaleIntercept", "RescaleSlope", "RescaleType"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction", "WindowCenterWidthExplanation"),
    "FrameContentSequence": ("StackID", "InStackPositionNumber", "TemporalPositionIndex", "DimensionIndexValues"),
}
#: Top-level attributes a frame does not take from its instance (its own values replace them).
NOT_COPIED = frozenset({Tag("PixelData"), Tag("SharedFunctionalGroupsSequence"),
                        Tag("PerFrameFunctionalGroupsSequence"), Tag("NumberOfFrames")})
#: Dimension Index Pointers that index the frames of one volume (a position along the stack, or a
#: per-frame identity), not one of several volumes.
SPATIAL_POINTERS = frozenset(Tag(k) for k in (
    "ImagePositionPatient", "InStackPositionNumber", "StackID", "SliceLocation", "InstanceNumber",
    "FrameAcquisitionNumber", "ContentTime", "FrameAcquisitionDateTime", "FrameReferenceDateTime",
))
ORIENTATION_TOL = 1e-3


class Frame(Dataset):
    """One frame of a multi-frame instance as a single-frame-like dataset.

    ``instance`` is the multi-frame dataset, ``number`` the 1-based frame number in it
    (ReferencedFrameNumber). Elements are shallow copies: their values are shared with the instance.
    """

    def __init__(self, instance: Dataset, number: int, values: Dataset):
        super().__init__()
        for elem in instance:
            if elem.tag not in NOT_COPIED and elem.VR != "SQ":
                self.add(copy.copy(elem))
        for elem in values:
            self.add(copy.copy(elem))
        self.NumberOfFrames = 1
        # The frames' sense along the stack, as InstanceNumber gives it for single-frame slices.
        self.InstanceNumber = int(values.get("InStackPositionNumber") or number)
        self.file_meta = instance.file_meta
        self.__dict__["instance"] = instance
        self.__dict__["number"] = number

    def __deepcopy__(self, memo) -> Dataset:
        """A plain single-frame dataset with the frame's attributes (the derived writer's template);
        the instance and its pixel data are not copied."""
        out = Dataset()
        for elem in self:
            out.add(copy.deepcopy(elem, memo))
        out.file_meta = copy.deepcopy(self.file_meta, memo)
        out.set_original_encoding(*self.instance.original_encoding)
        return out


def is_multiframe(ds: Dataset) -> bool:
    """Whether ``ds`` holds several frames or per-frame functional groups."""
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        frames = 1
    return frames > 1 or "PerFrameFunctionalGroupsSequence" in ds or ds.get("SOPClassUID") in VOLUME_CLASSES


def check_class(ds: Dataset) -> None:
    """Refuse a multi-frame instance that is not (Legacy Converted) Enhanced CT/MR."""
    if is_multiframe(ds) and ds.SOPClassUID not in VOLUME_CLASSES:
        name = UID(ds.SOPClassUID).name
        raise Refusal(f"multi-frame {name} instances are not supported (Enhanced and Legacy Converted "
                      "Enhanced CT/MR are)")


def is_frame(ds: Dataset) -> bool:
    return isinstance(ds, Frame)


def pixel_source(ds: Dataset) -> tuple[Dataset, int | None]:
    """(dataset holding the pixel data, 0-based frame index or None) for a slice or a :class:`Frame`."""
    if isinstance(ds, Frame):
        return ds.instance, ds.number - 1
    return ds, None


def expand(datasets: Sequence[Dataset]) -> list[Dataset]:
    """The frames of every multi-frame instance in ``datasets`` (single-frame ones as they are)."""
    out: list[Dataset] = []
    frames: list[Frame] = []
    for ds in datasets:
        if is_multiframe(ds):
            frames.extend(instance_frames(ds))
        else:
            out.append(ds)
    if frames:
        _check_one_volume(frames)
    return out + frames


def instance_frames(ds: Dataset) -> list[Frame]:
    """The frames of one multi-frame instance, each with its functional group values."""
    try:
        n = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        raise Refusal("NumberOfFrames is not a whole number") from None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    if not per_frame or not shared:
        missing = " and ".join(k for k, v in (("Shared", shared), ("Per-frame", per_frame)) if not v)
        raise Refusal(f"the multi-frame instance has no {missing} Functional Groups Sequence: "
                      "its frames' positions and spacing are unknown")
    if len(per_frame) != n:
        raise Refusal(f"the Per-frame Functional Groups Sequence has {len(per_frame)} items for {n} frames")
    frames = []
    for number, item in enumerate(per_frame, start=1):
        values = Dataset()
        for group, keywords in GROUPS.items():
            macro = item.get(group) or shared[0].get(group)
            if not macro:
                continue
            for keyword in keywords:
                if keyword in macro[0]:
                    values[keyword] = macro[0][keyword]
        for keyword, what in (("ImagePositionPatient", "Plane Position (Patient)"),
                              ("ImageOrientationPatient", "Plane Orientation (Patient)"),
                              ("PixelSpacing", "Pixel Measures (Pixel Spacing)")):
            if keyword not in values:
                raise Refusal(f"frame {number} of the multi-frame instance has no {what}")
        frames.append(Frame(ds, number, values))
    return frames


def _check_one_volume(frames: Sequence[Frame]) -> None:
    stacks = {str(f.get("StackID", "")) for f in frames}
    if len(stacks) > 1:
        raise Refusal(f"the frames form {len(stacks)} stacks (Stack ID {', '.join(sorted(stacks))}): "
                      "the node makes one volume of a series, and which stack is meant is not clear")
    temporal = {f.get("TemporalPositionIndex") for f in frames}
    if len(temporal) > 1:
        raise Refusal(f"the frames hold {len(temporal)} temporal positions (Temporal Position Index): "
                      "a dynamic or multi-phase series is several volumes, and which one is meant is not clear")
    for instance in {id(f.instance): f.instance for f in frames}.values():
        mine = [f for f in frames if f.instance is instance]
        for d, item in enumerate(instance.get("DimensionIndexSequence") or []):
            pointer = Tag(item.DimensionIndexPointer)
            if pointer in SPATIAL_POINTERS:
                continue
            values = {_index_value(f, d) for f in mine}
            if len(values) > 1:
                label = str(item.get("DimensionDescriptionLabel") or keyword_for_tag(pointer) or pointer)
                raise Refusal(f"the frames vary along the dimension {label!r} ({len(values)} values): several "
                              "volumes in one series, and which one is meant is not clear")
    spacings = {tuple(round(float(v), 6) for v in f.PixelSpacing) for f in frames}
    if len(spacings) > 1:
        low, high = min(min(s) for s in spacings), max(max(s) for s in spacings)
        raise Refusal(f"the frames have different Pixel Measures (pixel spacing from {low:g} to {high:g} mm): "
                      "they are not one volume")
    orientations = np.array([[float(v) for v in f.ImageOrientationPatient] for f in frames])
    distinct = _distinct_rows(orientations, ORIENTATION_TOL)
    if distinct > 1:
        raise Refusal(f"the frames have {distinct} different orientations (Plane Orientation): a multi-planar "
                      "instance such as a localizer is not one volume")


def _index_value(frame: Frame, d: int) -> int | None:
    values = frame.get("DimensionIndexValues")
    if values is None:
        return None
    values = list(values) if not isinstance(values, int) else [values]
    return int(values[d]) if d < len(values) else None


def _distinct_rows(rows: np.ndarray, tol: float) -> int:
    kept: list[np.ndarray] = []
    for row in rows:
        if not any(np.abs(row - k).max() <= tol for k in kept):
            kept.append(row)
    return len(kept)
