"""DICOM outputs of the chest-radiograph heads: a lung SEG and a lung-nodule SR (TID 1500).

Both follow ``shared/notes/dicom-outputs.md`` and pass ``dciodvfy`` without errors for CR, DX and
Secondary Capture sources (tests/test_cxr_outputs.py).

Choices that are not obvious:

* Determinism. UIDs come from :meth:`RunContext.uid`; ContentDate/Time are copied from the source
  (Content, else Study, else Series, else Acquisition date/time), never "now". highdicom also
  writes values of its own that would differ between runs: InstanceCreationDate/Time and the
  ContributionDateTime of its Contributing Equipment item (Type 3, dropped) and the SEG
  DimensionOrganizationUID (replaced by a context UID). So running twice on the same input with
  the same context gives byte-identical files. Only a source with none of those dates gets
  highdicom's default (the current date and time) as ContentDate/Time.
* Projection radiographs have no ImagePositionPatient: the SEG has one frame, no plane positions,
  and PatientOrientation copied from the source (empty when the source has none: Type 2C).
  A source FrameOfReferenceUID is kept (highdicom copies it; the SEG must share it).
* Pixel Measures are written when the source PixelSpacing is positive, and then always with a
  SliceThickness: dciodvfy requires one when there is a frame of reference, and highdicom's own
  reader (``hd.seg.segread``) refuses Pixel Measures without one, although its writer leaves it
  out for projection images. A projection has no slice, so it is the source's SliceThickness
  when it has one, else a nominal 1 mm. A zero or missing PixelSpacing (RG1_UNCR says
  0.000\\0.000, which dciodvfy rejects) gives no Pixel Measures (they are optional here).
* SEG codes: segmented property category (123037004, SCT, "Anatomical Structure"), type
  (39607008, SCT, "Lung"), no laterality: one segment for both lungs.
* SR codes:
  - procedure reported (36554-4, LN, "XR Chest Single view"): the report is about one
    projection; 36643-5 ("XR Chest 2 Views") would claim two. CID 100, the value set TID 1500
    suggests, lists no radiography procedure.
  - the finding is what the head was trained on: a lung nodule (JSRT nodule vs no nodule), so the
    measurement group's Finding is (27925004, SCT, "Nodule") at Finding Site (39607008, SCT,
    "Lung") (CID 6102 "Types of Finding for Chest CAD"), never a global "Normality": a film the
    model does not flag may hold anything else.
  - likelihood: (122157, DCM, "Probability") in ({ratio}, UCUM, "ratio") (CID 7181), beside the
    operating point it is judged at: (122411, DCM, "Threshold Value") and the sensitivity and
    specificity measured at that threshold on the held-out split, (111088, DCM, "Case Sensitivity")
    and (111090, DCM, "Case Specificity") (CID 6048, the CAD operating-point concepts).
  - decision: QualitativeEvaluation "Nodule" whose value is (260373001, SCT, "Detected") at or
    above the threshold, else (260415000, SCT, "Not detected"): what a detector can say.
  - the same in words for a reader, as TEXT (121106, DCM, "Comment") items in the group: "The model
    flagged a lung nodule" / "The model did not flag a lung nodule" with the numbers, that it looks
    for nothing else, and the research-use statement. The algorithm (TID 4019): name, version
    (the srnode version) and the weights' full sha256 as an Algorithm Parameter.
* SR Image Library (TID 1600): one entry for the source, built here without the optional
  descriptors, because highdicom's (TID 1603) need ImagerPixelSpacing and a two-valued
  PatientOrientation that CR and SC sources often lack.
* VerificationFlag UNVERIFIED, PreliminaryFlag PRELIMINARY, CompletionFlag COMPLETE: an AI
  result, not a signed report.
"""
from __future__ import annotations

import highdicom as hd
import numpy as np
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from pipelines.base import RunContext

MANUFACTURER = "srnode"

LUNGS = hd.sr.CodedConcept("39607008", "SCT", "Lung")
ANATOMICAL_STRUCTURE = hd.sr.CodedConcept("123037004", "SCT", "Anatomical Structure")
XR_CHEST_SINGLE_VIEW = hd.sr.CodedConcept("36554-4", "LN", "XR Chest Single view")
PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
THRESHOLD = hd.sr.CodedConcept("122411", "DCM", "Threshold Value")
SENSITIVITY = hd.sr.CodedConcept("111088", "DCM", "Case Sensitivity")
SPECIFICITY = hd.sr.CodedConcept("111090", "DCM", "Case Specificity")
NODULE = hd.sr.CodedConcept("27925004", "SCT", "Nodule")
DETECTED = hd.sr.CodedConcept("260373001", "SCT", "Detected")
NOT_DETECTED = hd.sr.CodedConcept("260415000", "SCT", "Not detected")
COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")
RATIO = hd.sr.CodedConcept("{ratio}", "UCUM", "ratio")
SOURCE = hd.sr.CodedConcept("260753009", "SCT", "Source")
IMAGING_MEASUREMENTS = "126010"  # (126010, DCM, "Imaging Measurements"): the TID 1500 container
RESEARCH_USE_TEXT = ("Research use only, not for diagnosis: an automated result, not reviewed by a physician. "
                     "The model was trained on 159 JSRT chest films (nodule vs no nodule) and looks for lung "
                     "nodules only; it says nothing about any other finding.")
#: SliceThickness stated in the Pixel Measures of a projection image that has none.
NOMINAL_SLICE_THICKNESS_MM = 1.0


def lung_segmentation(source: Dataset, mask: np.ndarray, context: RunContext, model_version: str,
                      series_number: int, description: str) -> Dataset:
    """A BINARY Segmentation (SOP class 66.4) of both lungs on one projection radiograph."""
    mask = np.asarray(mask)
    shape = (int(source.Rows), int(source.Columns))
    if mask.shape != shape:
        raise ValueError(f"mask shape {mask.shape} is not the source matrix {shape}")
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Lungs",
        segmented_property_category=ANATOMICAL_STRUCTURE,
        segmented_property_type=LUNGS,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="srnode Hydra lungs", family=codes.DCM.ArtificialIntelligence, version=model_version),
    )
    pixel_measures = _pixel_measures(source)
    seg = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=mask.astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        manufacturer_model_name="Hydra lung head",
        software_versions=_software_versions(context, model_version),
        device_serial_number=MANUFACTURER,
        pixel_measures=pixel_measures,
        **_series_and_instance(source, context, "lungs", series_number, description),
    )
    if pixel_measures is None:  # else highdicom copies a zero source PixelSpacing
        seg.SharedFunctionalGroupsSequence[0].pop("PixelMeasuresSequence", None)
    seg.PatientOrientation = source.get("PatientOrientation", "")  # Type 2C here: empty if unknown
    dimension_uid = context.uid("lungs", "dimension-organization")
    for item in [*seg.get("DimensionOrganizationSequence", []), *seg.get("DimensionIndexSequence", [])]:
        item.DimensionOrganizationUID = dimension_uid
    return _without_clock_values(seg)


@dataclass(frozen=True)
class OperatingPoint:
    """The threshold on the nodule probability and what it achieved on the held-out split."""

    threshold: float
    sensitivity: float
    specificity: float
    held_out: str  # what it was measured on, e.g. "22 held-out JSRT films, 13 with a nodule"


@dataclass(frozen=True)
class Algorithm:
    name: str
    version: str
    weights_sha256: str  # full hex digest of the weights file


def nodule_sentence(probability: float, point: OperatingPoint) -> str:
    """What the report says in words: whether the model flagged a nodule, with the numbers."""
    verdict = ("The model flagged a lung nodule" if probability >= point.threshold
               else "The model did not flag a lung nodule")
    relation = "at or above" if probability >= point.threshold else "below"
    return (f"{verdict}: nodule probability {probability:.4f}, {relation} its operating threshold "
            f"{point.threshold:.4f} (sensitivity {point.sensitivity:.2f}, specificity {point.specificity:.2f} "
            f"at that threshold on {point.held_out}).")


def nodule_report(source: Dataset, probability: float, point: OperatingPoint, context: RunContext,
                  algorithm: Algorithm, series_number: int, description: str) -> Dataset:
    """A TID 1500 Comprehensive 3D SR: lung-nodule probability, the operating point and the decision."""
    values = (probability, point.threshold, point.sensitivity, point.specificity)
    if not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"probability {probability}, threshold {point.threshold}, sensitivity and specificity "
                         f"must lie in [0, 1]")
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=context.uid("device"), name="srnode Hydra", manufacturer_name=MANUFACTURER,
            model_name="Hydra lung nodule head"),
    )
    flagged = probability >= point.threshold
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=context.uid("abnormality", "tracking"), identifier="chest radiograph lung nodule"),
        finding_type=NODULE,
        finding_sites=[hd.sr.FindingSite(LUNGS)],
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=algorithm.name, version=algorithm.version,
            parameters=[f"weights sha256 {algorithm.weights_sha256}"]),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        measurements=[hd.sr.Measurement(name=PROBABILITY, value=float(probability), unit=RATIO),
                      hd.sr.Measurement(name=THRESHOLD, value=float(point.threshold), unit=RATIO),
                      hd.sr.Measurement(name=SENSITIVITY, value=float(point.sensitivity), unit=RATIO),
                      hd.sr.Measurement(name=SPECIFICITY, value=float(point.specificity), unit=RATIO)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            name=NODULE, value=DETECTED if flagged else NOT_DETECTED)],
    )
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    for text in (nodule_sentence(probability, point), RESEARCH_USE_TEXT):
        group[0].ContentSequence.append(hd.sr.TextContentItem(name=COMMENT, value=text, relationship_type=contains))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=XR_CHEST_SINGLE_VIEW,
        imaging_measurements=[group],
    )
    root = report[0]
    measurements_at = next(i for i, item in enumerate(root.ContentSequence)
                           if item.ConceptNameCodeSequence[0].CodeValue == IMAGING_MEASUREMENTS)
    root.ContentSequence.insert(measurements_at, _image_library(source))
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source],
        content=root,
        is_complete=True,
        is_final=False,
        is_verified=False,
        **_series_and_instance(source, context, "abnormality", series_number, description),
    )
    return _without_clock_values(sr)


def _series_and_instance(source: Dataset, context: RunContext, key: str, series_number: int,
                         description: str) -> dict:
    """The constructor arguments both outputs share: UIDs from the run context (reruns give the same
    ones), one instance, the manufacturer, and the source's content date and time."""
    date, time = _content_date_time(source)
    return {"series_instance_uid": context.uid(key, "series"), "series_number": series_number,
            "sop_instance_uid": context.uid(key, "instance", 0), "instance_number": 1,
            "manufacturer": MANUFACTURER, "series_description": description, "content_date": date,
            "content_time": time, "transfer_syntax_uid": ExplicitVRLittleEndian}


def _content_date_time(source: Dataset) -> tuple[str | None, str | None]:
    """The first (date, time) pair the source has, so a rerun gives the same content."""
    for prefix in ("Content", "Study", "Series", "Acquisition"):
        date = source.get(f"{prefix}Date")
        if date:
            return str(date), str(source.get(f"{prefix}Time") or "000000")
    return None, None


def _software_versions(context: RunContext, model_version: str) -> list[str]:
    return [v for v in (context.software_version, model_version) if v] or ["unknown"]


def _pixel_measures(source: Dataset) -> hd.PixelMeasuresSequence | None:
    """Shared Pixel Measures for a single-frame projection source (see the module docstring)."""
    spacing = [float(v) for v in source.get("PixelSpacing") or []]
    if len(spacing) != 2 or min(spacing) <= 0:
        return None
    thickness = float(source.get("SliceThickness") or NOMINAL_SLICE_THICKNESS_MM)
    return hd.PixelMeasuresSequence(pixel_spacing=spacing, slice_thickness=thickness)


def _image_library(source: Dataset) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library with one entry for the source, without the optional descriptors.

    (highdicom's ``MeasurementReport(referenced_images=...)`` writes TID 1603 descriptors that need
    ImagerPixelSpacing and a two-valued PatientOrientation, which CR and SC sources often lack.)
    """
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    image = hd.sr.ImageContentItem(
        name=SOURCE, referenced_sop_class_uid=source.SOPClassUID,
        referenced_sop_instance_uid=source.SOPInstanceUID, relationship_type=contains)
    group = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type=contains)
    group.ContentSequence = hd.sr.ContentSequence([image])
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=contains)
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


def _without_clock_values(ds: Dataset) -> Dataset:
    """Drop the Type 3 date-times highdicom takes from the clock, so that reruns are identical."""
    for keyword in ("InstanceCreationDate", "InstanceCreationTime"):
        ds.pop(keyword, None)
    for item in ds.get("ContributingEquipmentSequence", []):
        item.pop("ContributionDateTime", None)
    return ds
