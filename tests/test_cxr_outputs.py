"""Lung SEG and lung-nodule SR of pipelines/dicom/cxr_outputs.py on real CR, DX and Secondary Capture
sources: dciodvfy, round trips and the checks of shared/notes/dicom-outputs.md."""
from __future__ import annotations

import copy
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from pipelines.base import RunContext
from pipelines.dicom.cxr_outputs import (
    NODULE,
    PROBABILITY,
    SENSITIVITY,
    SPECIFICITY,
    THRESHOLD,
    Algorithm,
    OperatingPoint,
    lung_segmentation,
    nodule_report,
)
from tests.dicom_checks import dcentvfy_errors, dciodvfy_errors, new_dciodvfy_errors
from tests.paths import shared
from tests.series_factory import cr

CONTEXT = RunContext(uid_seed="test", software_version="0.1.0")
MODEL = "hydra-2024.1"
DIGEST = "ab" * 32
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
DX = "highdicom_dx_image_dog_thorax.dcm"
SC = "siim-nih_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
FOR_UID = "2.25.1234567890123456789"

CASES = [
    pytest.param("cr", id="cr"),
    pytest.param("cr+for", id="cr-frame-of-reference"),
    pytest.param("dx", id="dx", marks=pytest.mark.shared_data),
    pytest.param("dx+for", id="dx-frame-of-reference", marks=pytest.mark.shared_data),
    pytest.param("sc", id="sc", marks=pytest.mark.shared_data),
]


def _source(case: str, tmp_path: Path) -> tuple[pydicom.Dataset, Path]:
    """The source dataset and a file holding it (for dciodvfy); ``+for`` adds a FrameOfReferenceUID."""
    name, _, variant = case.partition("+")
    if name == "cr":
        (path,) = cr(tmp_path / "source", "cxr-outputs")
    else:
        path = shared("cxr_dicom", DX if name == "dx" else SC)
    ds = pydicom.dcmread(path)
    if variant == "for":
        ds = copy.deepcopy(ds)
        ds.FrameOfReferenceUID = FOR_UID
        ds.PositionReferenceIndicator = ""
        path = tmp_path / "source_for.dcm"
        ds.save_as(path, enforce_file_format=True)
    return ds, path


def _two_ellipses(rows: int, cols: int) -> np.ndarray:
    y, x = np.mgrid[:rows, :cols]
    mask = np.zeros((rows, cols), dtype=bool)
    for cx in (0.3 * cols, 0.7 * cols):
        mask |= ((x - cx) / (0.15 * cols)) ** 2 + ((y - 0.5 * rows) / (0.3 * rows)) ** 2 <= 1
    return mask


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _expected_content(source: pydicom.Dataset) -> tuple[str, str]:
    for prefix in ("Content", "Study", "Series", "Acquisition"):
        if source.get(f"{prefix}Date"):
            return str(source.get(f"{prefix}Date")), str(source.get(f"{prefix}Time") or "000000")
    raise AssertionError("test sources all carry a date")


def _check_conformance(path: Path, source_path: Path) -> None:
    # The SC source has errors of its own in the patient module (2-character PatientAge) that any
    # output copying that module inherits; the other sources are clean, so their outputs must be.
    if "siim" in source_path.name:
        assert new_dciodvfy_errors(path, source_path) == []
    else:
        assert dciodvfy_errors(path) == []


def _code(item: pydicom.Dataset) -> tuple[str, str]:
    return str(item.CodeValue), str(item.CodingSchemeDesignator)


def _strings(ds: pydicom.Dataset) -> list[str]:
    """Every string value in ``ds`` and its sequences (str(ds) cuts long values short)."""
    found = []
    for element in ds:
        if element.VR == "SQ":
            found += [text for item in element.value for text in _strings(item)]
        elif isinstance(element.value, str):
            found.append(element.value)
    return found


def _report(probability: float, threshold: float, source: pydicom.Dataset,
            context: RunContext = CONTEXT) -> pydicom.Dataset:
    point = OperatingPoint(threshold, 0.77, 1.0, "22 held-out JSRT films, 13 with a nodule")
    return nodule_report(source, probability, point, context, Algorithm("srnode Hydra nodule", "0.1.0", DIGEST),
                         902, "Chest abnormality (AI) - research use")


def _segmentation(source: pydicom.Dataset, mask: np.ndarray, context: RunContext = CONTEXT) -> pydicom.Dataset:
    return lung_segmentation(source, mask, context, MODEL, 901, "Lungs (AI) - research use")


# ---- SEG ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_lung_segmentation(tmp_path: Path, case: str) -> None:
    source, source_path = _source(case, tmp_path)
    mask = _two_ellipses(int(source.Rows), int(source.Columns))
    path = _save(_segmentation(source, mask.astype(np.uint8)), tmp_path / "seg.dcm")
    _check_conformance(path, source_path)

    seg = hd.seg.segread(path)
    assert seg.SOPClassUID == SEG_CLASS and seg.SegmentationType == "BINARY"
    assert seg.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[source.SOPInstanceUID])
    assert pixels.shape == (1, source.Rows, source.Columns, 1)
    assert np.array_equal(pixels[0, :, :, 0].astype(bool), mask)

    # identity, references, geometry
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.PatientID == source.PatientID
    assert seg.SeriesInstanceUID == CONTEXT.uid("lungs", "series")
    assert seg.SOPInstanceUID == CONTEXT.uid("lungs", "instance", 0)
    assert (seg.SeriesNumber, seg.InstanceNumber, seg.NumberOfFrames) == (901, 1, 1)
    assert seg.SeriesDescription == "Lungs (AI) - research use"
    (ref_series,) = seg.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == source.SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in ref_series.ReferencedInstanceSequence] == [source.SOPInstanceUID]
    (frame,) = seg.PerFrameFunctionalGroupsSequence
    (derivation,) = frame.DerivationImageSequence
    assert [i.ReferencedSOPInstanceUID for i in derivation.SourceImageSequence] == [source.SOPInstanceUID]
    assert "PlanePositionSequence" not in frame and "PlanePositionSequence" not in seg.SharedFunctionalGroupsSequence[0]
    if "FrameOfReferenceUID" in source:
        assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID == FOR_UID
    else:
        assert "FrameOfReferenceUID" not in seg
    assert seg.get("PatientOrientation") == source.get("PatientOrientation", "")
    measures = seg.SharedFunctionalGroupsSequence[0].get("PixelMeasuresSequence")
    if case.startswith("cr"):  # RG1_UNCR's PixelSpacing is 0.000\0.000: not copied
        assert measures is None
    else:  # source spacing, with the nominal SliceThickness dciodvfy and segread want
        assert [float(v) for v in measures[0].PixelSpacing] == [float(v) for v in source.PixelSpacing]
        assert float(measures[0].SliceThickness) == 1.0

    # segment, equipment, content date
    (segment,) = seg.SegmentSequence
    assert (segment.SegmentNumber, segment.SegmentLabel, segment.SegmentAlgorithmType) == (1, "Lungs", "AUTOMATIC")
    assert _code(segment.SegmentedPropertyCategoryCodeSequence[0]) == ("123037004", "SCT")
    assert _code(segment.SegmentedPropertyTypeCodeSequence[0]) == ("39607008", "SCT")
    (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("srnode Hydra lungs", MODEL)
    family = codes.DCM.ArtificialIntelligence
    assert _code(algorithm.AlgorithmFamilyCodeSequence[0]) == (family.value, family.scheme_designator)
    assert (seg.Manufacturer, seg.ManufacturerModelName, seg.DeviceSerialNumber) == (
        "srnode", "Hydra lung head", "srnode")
    assert list(seg.SoftwareVersions) == ["0.1.0", MODEL]
    assert (seg.ContentDate, seg.ContentTime) == _expected_content(source)


# ---- SR ----------------------------------------------------------------------------------------

def _read_report(path: Path) -> tuple[hd.sr.Comprehensive3DSR, hd.sr.MeasurementsAndQualitativeEvaluations]:
    sr = hd.sr.srread(path)
    (group,) = sr.content.get_image_measurement_groups()
    return sr, group


@pytest.mark.parametrize("case", CASES)
def test_nodule_report(tmp_path: Path, case: str) -> None:
    source, source_path = _source(case, tmp_path)
    path = _save(_report(0.73, 0.5, source), tmp_path / "sr.dcm")
    _check_conformance(path, source_path)
    sr, group = _read_report(path)

    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR and sr.Modality == "SR"
    assert sr.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert _code(sr.ConceptNameCodeSequence[0]) == ("126000", "DCM")
    (template,) = sr.ContentTemplateSequence
    assert (template.MappingResource, template.TemplateIdentifier) == ("DCMR", "1500")
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED", "PRELIMINARY")
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    assert sr.SeriesInstanceUID == CONTEXT.uid("abnormality", "series")
    assert sr.SOPInstanceUID == CONTEXT.uid("abnormality", "instance", 0)
    assert (sr.SeriesNumber, sr.InstanceNumber, sr.Manufacturer) == (902, 1, "srnode")
    assert sr.SeriesDescription == "Chest abnormality (AI) - research use"
    assert (sr.ContentDate, sr.ContentTime) == _expected_content(source)

    # evidence covers the source (same study: Current Requested Procedure Evidence)
    (study,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert study.StudyInstanceUID == source.StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    (instance,) = series.ReferencedSOPSequence
    assert (instance.ReferencedSOPClassUID, instance.ReferencedSOPInstanceUID) == (
        source.SOPClassUID, source.SOPInstanceUID)

    # observation context: a device observer; procedure reported; image library
    content = {_code(item.ConceptNameCodeSequence[0]): item for item in sr.ContentSequence}
    assert _code(content[("121005", "DCM")].ConceptCodeSequence[0]) == ("121007", "DCM")  # Observer Type: Device
    assert content[("121012", "DCM")].UID == CONTEXT.uid("device")  # Device Observer UID
    assert content[("121013", "DCM")].TextValue == "srnode Hydra"  # Device Observer Name
    assert content[("121014", "DCM")].TextValue == "srnode"  # Device Observer Manufacturer
    assert content[("121015", "DCM")].TextValue == "Hydra lung nodule head"  # Device Observer Model Name
    assert _code(content[("121058", "DCM")].ConceptCodeSequence[0]) == ("36554-4", "LN")  # Procedure reported
    (library_group,) = content[("111028", "DCM")].ContentSequence  # Image Library
    assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in library_group.ContentSequence] == [
        source.SOPInstanceUID]
    assert list(content)[-1] == ("126010", "DCM")  # Imaging Measurements come last, after the library

    # the measurement group
    assert group.tracking_identifier == "chest radiograph lung nodule"
    assert group.tracking_uid == CONTEXT.uid("abnormality", "tracking")
    assert [i.referenced_sop_instance_uid for i in group.source_images] == [source.SOPInstanceUID]
    group_items = {_code(item.ConceptNameCodeSequence[0]): item for item in group[0].ContentSequence}
    assert _code(group_items[("121071", "DCM")].ConceptCodeSequence[0]) == ("27925004", "SCT")  # Finding: Nodule
    assert _code(group_items[("363698007", "SCT")].ConceptCodeSequence[0]) == ("39607008", "SCT")  # site: Lung
    assert group_items[("111001", "DCM")].TextValue == "srnode Hydra nodule"  # Algorithm Name
    assert group_items[("111003", "DCM")].TextValue == "0.1.0"  # Algorithm Version
    assert group_items[("111002", "DCM")].TextValue == f"weights sha256 {DIGEST}"  # Algorithm Parameters
    measured = {m.name.value: m for m in group.get_measurements()}
    assert measured[PROBABILITY.value].value == pytest.approx(0.73)
    assert measured[THRESHOLD.value].value == pytest.approx(0.5)
    assert measured[SENSITIVITY.value].value == pytest.approx(0.77)
    assert measured[SPECIFICITY.value].value == pytest.approx(1.0)
    assert {m.unit.value for m in measured.values()} == {"{ratio}"}
    (finding,) = group.get_qualitative_evaluations(name=NODULE)
    assert (finding.value.value, finding.value.scheme_designator, finding.value.meaning) == (
        "260373001", "SCT", "Detected")
    comments = [i.TextValue for i in group[0].ContentSequence if _code(i.ConceptNameCodeSequence[0]) == ("121106", "DCM")]
    assert comments[0].startswith("The model flagged a lung nodule: nodule probability 0.7300")
    assert "sensitivity 0.77, specificity 1.00 at that threshold on 22 held-out JSRT films" in comments[0]
    assert comments[1].startswith("Research use only, not for diagnosis")
    assert "looks for lung nodules only" in comments[1]


@pytest.mark.parametrize(("probability", "threshold", "expected", "words"), [
    (0.73, 0.5, ("260373001", "Detected"), "The model flagged a lung nodule"),
    (0.5, 0.5, ("260373001", "Detected"), "The model flagged a lung nodule"),  # probability >= threshold
    (0.2, 0.5, ("260415000", "Not detected"), "The model did not flag a lung nodule"),
    (0.0002, 0.79, ("260415000", "Not detected"), "The model did not flag a lung nodule"),
])
def test_finding_follows_threshold_and_never_says_normal(tmp_path: Path, probability: float, threshold: float,
                                                        expected: tuple[str, str], words: str) -> None:
    """The head is a JSRT nodule classifier: below its threshold the report says the model did not
    flag a nodule, never that the film is normal (the old report wrote Normality: Normal)."""
    source, source_path = _source("cr", tmp_path)
    path = _save(_report(probability, threshold, source), tmp_path / "sr.dcm")
    _check_conformance(path, source_path)
    _, group = _read_report(path)
    (finding,) = group.get_qualitative_evaluations(name=NODULE)
    assert (finding.value.value, finding.value.meaning) == expected
    assert group.get_measurements(name=THRESHOLD)[0].value == pytest.approx(threshold)
    assert group.get_measurements(name=PROBABILITY)[0].value == pytest.approx(probability)
    text = " ".join(_strings(pydicom.dcmread(path))).lower()
    assert words.lower() in text
    assert "normal" not in text.replace("abnormal", "") and "17621005" not in text and "121402" not in text


# ---- determinism, entity consistency, bad input --------------------------------------------------

def test_same_context_same_files_other_seed_other_uids(tmp_path: Path) -> None:
    source, source_path = _source("cr", tmp_path)
    mask = _two_ellipses(int(source.Rows), int(source.Columns))
    first = [_segmentation(source, mask), _report(0.6, 0.5, source)]
    again = [_segmentation(source, mask), _report(0.6, 0.5, source)]
    other_context = RunContext(uid_seed="other", software_version="0.1.0")
    other = [_segmentation(source, mask, other_context), _report(0.6, 0.5, source, other_context)]
    for a, b, c, name in zip(first, again, other, ("seg", "sr")):
        assert a.SOPInstanceUID == b.SOPInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
        # nothing depends on the clock or a random UID: the files are identical
        assert _save(a, tmp_path / f"{name}1.dcm").read_bytes() == _save(b, tmp_path / f"{name}2.dcm").read_bytes()
        assert c.SOPInstanceUID != a.SOPInstanceUID and c.SeriesInstanceUID != a.SeriesInstanceUID
        assert c.StudyInstanceUID == a.StudyInstanceUID == source.StudyInstanceUID
    assert first[0].SeriesInstanceUID != first[1].SeriesInstanceUID
    # sources and outputs agree on patient and study (dcentvfy)
    assert dcentvfy_errors([source_path, tmp_path / "seg1.dcm", tmp_path / "sr1.dcm"]) == []


def test_bad_input_is_rejected(tmp_path: Path) -> None:
    source, _ = _source("cr", tmp_path)
    with pytest.raises(ValueError, match="mask shape"):
        _segmentation(source, np.zeros((int(source.Rows), int(source.Columns) - 1), dtype=bool))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        _report(1.2, 0.5, source)
