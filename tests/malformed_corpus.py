"""A generated corpus of bad (and oddly valid) instances, each with the answer the node must give.

``cases()`` builds them from pydicom's CT_small.dcm and MR_small.dcm, as a broken modality or an
attacker would send them: Image Pixel attributes missing, zero, of the wrong VR or multiplicity;
rescale and geometry that are no numbers; pixel data that disagrees with its header; data sets
with command or file meta elements, the other VR encoding, undefined lengths, sequences nested
too deep; UIDs that disagree with the request. Every case is a Part 10 file; ``status`` is the
C-STORE status and the STOW-RS Failure Reason (0 = stored), ``element`` what the log line and the
Error Comment must name. Nothing is written to the repository: the files exist only in memory.
"""
from __future__ import annotations

import copy
import io
import struct
from dataclasses import dataclass, field

from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

OK, MISMATCH, CANNOT, DUPLICATE = 0x0000, 0xA900, 0xC000, 0x0111


@dataclass
class Case:
    name: str
    data: bytes  # a Part 10 file
    status: int
    element: str = ""  # e.g. "(0028,0010) Rows"
    sop: str = ""  # the SOP Instance UID the request carries
    sop_class: str = ""
    syntax: str = ""
    stow_only: bool = False
    extra: dict = field(default_factory=dict)


def _base(name: str) -> Dataset:
    return dcmread(get_testdata_file(name))


def _relabel(ds: Dataset, tag: str, study: str | None = None, series: str | None = None) -> Dataset:
    ds = copy.deepcopy(ds)
    ds.StudyInstanceUID = study or generate_uid(entropy_srcs=[tag, "study"])
    ds.SeriesInstanceUID = series or generate_uid(entropy_srcs=[tag, "series"])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[tag, "sop"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def part10(ds: Dataset, syntax: str = ExplicitVRLittleEndian, body: bytes | None = None) -> bytes:
    """``ds`` as a Part 10 file in ``syntax`` (its values written as they are, raw ones byte for
    byte); ``body`` replaces the encoded data set."""
    meta = copy.deepcopy(ds.file_meta)
    meta.TransferSyntaxUID = syntax
    if body is None:
        out = io.BytesIO()
        ds.file_meta = meta
        ds.save_as(out, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True, enforce_file_format=False)
        raw = out.getvalue()
        return raw if raw[128:132] == b"DICM" else _with_meta(meta, raw)
    return _with_meta(meta, body)


def _with_meta(meta, body: bytes) -> bytes:
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue() + body


def body_of(raw: bytes) -> bytes:
    return raw[144 + struct.unpack_from("<I", raw, 140)[0]:]


def raw_element(ds: Dataset, tag: int, vr: str | None, value: bytes, implicit: bool = False) -> None:
    """Put ``value`` bytes under ``tag`` with ``vr`` as they will be written (no validation)."""
    if len(value) % 2:
        value += b" " if vr not in ("UI", "OB", "UN") else b"\0"
    ds._dict[Tag(tag)] = RawDataElement(Tag(tag), vr, len(value), value, 0, implicit, True)


def _explicit(tag: int, vr: bytes, value: bytes) -> bytes:
    group, elem = tag >> 16, tag & 0xFFFF
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL", b"OV"):
        return struct.pack("<HH2s2xI", group, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _insert(body: bytes, element: bytes, before_tag: int) -> bytes:
    """``element`` spliced into an explicit VR LE body before the first top-level element >= ``before_tag``."""
    pos = 0
    while pos + 8 <= len(body):
        group, elem = struct.unpack_from("<HH", body, pos)
        if (group << 16 | elem) >= before_tag:
            break
        vr = body[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL", b"OV"):
            length = struct.unpack_from("<I", body, pos + 8)[0]
            pos += 12 + length
        else:
            pos += 8 + struct.unpack_from("<H", body, pos + 6)[0]
    return body[:pos] + element + body[pos:]


US_ATTRS = {0x00280010: "Rows", 0x00280011: "Columns", 0x00280100: "BitsAllocated", 0x00280101: "BitsStored",
            0x00280102: "HighBit", 0x00280103: "PixelRepresentation", 0x00280002: "SamplesPerPixel"}


def _name(tag: int, keyword: str) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {keyword}"


def cases() -> list[Case]:
    out: list[Case] = []
    bases = {"ct": _base("CT_small.dcm"), "mr": _base("MR_small.dcm")}

    def add(name: str, ds: Dataset, status: int, element: str = "", syntax: str = ExplicitVRLittleEndian,
            body: bytes | None = None, **kw) -> None:
        out.append(Case(name, part10(ds, syntax, body), status, element, str(ds.file_meta.MediaStorageSOPInstanceUID),
                        str(ds.file_meta.MediaStorageSOPClassUID), syntax, **kw))

    for base_name, base in bases.items():
        for syntax, enc in ((ExplicitVRLittleEndian, "ex"), (ImplicitVRLittleEndian, "im"))[: 2 if base_name == "ct" else 1]:
            implicit = enc == "im"

            encoded = part10(copy.deepcopy(base), syntax)

            def fresh(label: str) -> Dataset:  # re-read (elements stay raw): far cheaper than a deep copy
                ds = dcmread(io.BytesIO(encoded))
                ds.StudyInstanceUID = generate_uid(entropy_srcs=[base_name, enc, label, "study"])
                ds.SeriesInstanceUID = generate_uid(entropy_srcs=[base_name, enc, label, "series"])
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
                    entropy_srcs=[base_name, enc, label, "sop"])
                return ds

            def variant(label: str, status: int, element: str, change) -> None:
                ds = fresh(label)
                change(ds)
                add(f"{base_name}-{enc}-{label}", ds, status, element, syntax)

            variant("valid", OK, "", lambda ds: None)
            # Image Pixel module: each attribute missing, empty, zero, too large, two values, wrong VR.
            for tag, keyword in US_ATTRS.items():
                name = _name(tag, keyword)
                if keyword != "HighBit":
                    variant(f"{keyword}-missing", MISMATCH, name, lambda ds, t=tag: ds._dict.pop(Tag(t)))
                    variant(f"{keyword}-empty", MISMATCH, name, lambda ds, t=tag: raw_element(ds, t, "US", b"", implicit))
                low = {0x00280103: None}.get(tag, 0)
                if low is not None:
                    variant(f"{keyword}-zero", MISMATCH, name, lambda ds, t=tag: raw_element(
                        ds, t, "US", struct.pack("<H", 0), implicit))
                if keyword not in ("Rows", "Columns"):
                    variant(f"{keyword}-huge", MISMATCH, name, lambda ds, t=tag: raw_element(
                        ds, t, "US", struct.pack("<H", 65000), implicit))
                variant(f"{keyword}-two-values", MISMATCH, name, lambda ds, t=tag: raw_element(
                    ds, t, "US", struct.pack("<HH", 8, 8), implicit))
                if not implicit:
                    variant(f"{keyword}-negative-SS", MISMATCH, name, lambda ds, t=tag: raw_element(
                        ds, t, "SS", struct.pack("<h", -5)))
                    variant(f"{keyword}-as-FL", MISMATCH, name, lambda ds, t=tag: raw_element(
                        ds, t, "FL", struct.pack("<f", 16.0)))
            variant("BitsAllocated-12", MISMATCH, _name(0x00280100, "BitsAllocated"),
                    lambda ds: raw_element(ds, 0x00280100, "US", struct.pack("<H", 12), implicit))
            pi = _name(0x00280004, "PhotometricInterpretation")
            variant("Photometric-missing", MISMATCH, pi, lambda ds: ds._dict.pop(Tag(0x00280004)))
            variant("Photometric-unknown", MISMATCH, pi, lambda ds: raw_element(ds, 0x00280004, "CS", b"PURPLE", implicit))
            variant("Photometric-RGB-1-sample", MISMATCH, pi, lambda ds: raw_element(ds, 0x00280004, "CS", b"RGB", implicit))
            # NumberOfFrames (IS).
            nf = _name(0x00280008, "NumberOfFrames")
            for label, text, status in (("abc", b"abc", MISMATCH), ("zero", b"0", MISMATCH), ("negative", b"-1", MISMATCH),
                                        ("fraction", b"1.5", MISMATCH), ("billion", b"1000000000", MISMATCH),
                                        ("two-cut", b"2", CANNOT), ("one", b"1", OK)):
                variant(f"NumberOfFrames-{label}", status, "(7FE0,0010) PixelData" if label == "two-cut" else nf if status else "",
                        lambda ds, v=text: raw_element(ds, 0x00280008, "IS", v, implicit))
            # Modality rescale (DS).
            for tag, keyword in ((0x00281053, "RescaleSlope"), (0x00281052, "RescaleIntercept")):
                name = _name(tag, keyword)
                values = [("abc", b"abc", MISMATCH), ("NaN", b"NaN", MISMATCH), ("inf", b"inf", MISMATCH),
                          ("minus-inf", b"-inf", MISMATCH), ("1e300", b"1e300", MISMATCH), ("two", b"1\\2", MISMATCH),
                          ("blank", b"  ", OK), ("ok", b"1.5", OK)]
                if keyword == "RescaleSlope":
                    values += [("zero", b"0", MISMATCH), ("tiny", b"1e-300", MISMATCH)]
                for label, text, status in values:
                    variant(f"{keyword}-{label}", status, name if status else "",
                            lambda ds, t=tag, v=text: raw_element(ds, t, "DS", v, implicit))
                if not implicit:
                    variant(f"{keyword}-as-FD", MISMATCH, name, lambda ds, t=tag: raw_element(ds, t, "FD", struct.pack("<d", 1)))
            # Plane geometry (DS with a fixed multiplicity).
            for tag, keyword, good in ((0x00200032, "ImagePositionPatient", b"1\\2\\3"),
                                       (0x00200037, "ImageOrientationPatient", b"1\\0\\0\\0\\1\\0"),
                                       (0x00280030, "PixelSpacing", b"0.5\\0.5")):
                name = _name(tag, keyword)
                n = good.count(b"\\") + 1
                for label, text, status in (("text", b"left", MISMATCH), ("NaN", b"\\".join([b"NaN"] * n), MISMATCH),
                                            ("inf", b"\\".join([b"inf"] + [b"0"] * (n - 1)), MISMATCH),
                                            ("too-few", b"\\".join([b"1"] * (n - 1)), MISMATCH),
                                            ("too-many", b"\\".join([b"1"] * (n + 1)), MISMATCH),
                                            ("huge", b"\\".join([b"1e300"] * n), MISMATCH),
                                            ("empty", b"", OK), ("ok", good, OK)):
                    variant(f"{keyword}-{label}", status, name if status else "",
                            lambda ds, t=tag, v=text: raw_element(ds, t, "DS", v, implicit))
                if not implicit:
                    variant(f"{keyword}-as-FL", MISMATCH, name, lambda ds, t=tag, k=n: raw_element(
                        ds, t, "FL", struct.pack(f"<{k}f", *([1.0] * k))))
            variant("PixelSpacing-negative", MISMATCH, _name(0x00280030, "PixelSpacing"),
                    lambda ds: raw_element(ds, 0x00280030, "DS", b"-1\\1", implicit))
            variant("PixelSpacing-zero", OK, "", lambda ds: raw_element(ds, 0x00280030, "DS", b"0\\0", implicit))
            variant("Orientation-cosine-2", MISMATCH, _name(0x00200037, "ImageOrientationPatient"),
                    lambda ds: raw_element(ds, 0x00200037, "DS", b"2\\0\\0\\0\\1\\0", implicit))
            variant("SliceThickness-text", MISMATCH, _name(0x00180050, "SliceThickness"),
                    lambda ds: raw_element(ds, 0x00180050, "DS", b"thin", implicit))
            # Pixel data against its header.
            pd = _name(0x7FE00010, "PixelData")
            variant("PixelData-empty", MISMATCH, pd, lambda ds: raw_element(ds, 0x7FE00010, "OW", b"", implicit))
            variant("PixelData-missing", CANNOT, pd, lambda ds: ds._dict.pop(Tag(0x7FE00010)))
            variant("PixelData-half", CANNOT, pd, lambda ds: raw_element(
                ds, 0x7FE00010, "OW", bytes(ds.PixelData[: len(ds.PixelData) // 2]), implicit))
            variant("PixelData-two-frames", MISMATCH, pd, lambda ds: raw_element(
                ds, 0x7FE00010, "OW", bytes(ds.PixelData) * 2, implicit))
            variant("PixelData-padded", OK, "", lambda ds: raw_element(
                ds, 0x7FE00010, "OW", bytes(ds.PixelData) + b"\0\0", implicit))
            variant("Rows-larger-than-data", CANNOT, pd, lambda ds: raw_element(
                ds, 0x00280010, "US", struct.pack("<H", int(ds.Rows) * 2), implicit))
            # Benign oddities: stored as sent.
            variant("private-garbage", OK, "", lambda ds: (raw_element(ds, 0x00990010, "LO", b"ACME 1.0", implicit),
                                                           raw_element(ds, 0x00991001, "UN" if not implicit else None,
                                                                       bytes(range(256)) * 4, implicit)))
            variant("huge-VM-ImageType", OK, "", lambda ds: raw_element(ds, 0x00080008, "CS", b"\\".join([b"X"] * 5000), implicit))
            variant("unknown-charset", OK, "", lambda ds: raw_element(ds, 0x00080005, "CS", b"ISO_IR 999", implicit))
            variant("long-description", OK, "", lambda ds: raw_element(ds, 0x0008103E, "LO", b"x" * 3000, implicit))
            # UIDs.
            variant("Study-missing", MISMATCH, "Study Instance UID", lambda ds: ds._dict.pop(Tag(0x0020000D)))
            variant("Series-text", MISMATCH, "Series Instance UID", lambda ds: raw_element(ds, 0x0020000E, "UI", b"series one", implicit))
            variant("SOPClass-differs", MISMATCH, "(0008,0016) SOPClassUID",
                    lambda ds: raw_element(ds, 0x00080016, "UI", b"1.2.840.10008.5.1.4.1.1.7\0", implicit))
            variant("SOPClass-invalid", MISMATCH, "(0008,0016) SOPClassUID",
                    lambda ds: raw_element(ds, 0x00080016, "UI", b"CT IMAGE\0", implicit))
            variant("SOP-differs", MISMATCH, "(0008,0018) SOPInstanceUID",
                    lambda ds: raw_element(ds, 0x00080018, "UI", b"1.2.3.4.5.6\0", implicit))
            # Structure: nesting, elements that no data set has.
            for depth, status in ((8, OK), (33, CANNOT), (60, CANNOT), (300, CANNOT), (5000, CANNOT)):
                ds = fresh(f"nested-{depth}")
                add(f"{base_name}-{enc}-nested-{depth}", ds, status, "(0040,A730) ContentSequence" if status and depth < 100 else "",
                    syntax, _nest(body_of(part10(ds, syntax)), depth, implicit))
            # (0000,xxxx) and odd groups are written in place (sorted first): explicit bodies only.
            if not implicit:
                for tag, label in ((0x00000900, "Status"), (0x00001000, "AffectedSOPInstanceUID"),
                                   (0x00010001, "private"), (0x00040000, "unknown")):
                    ds = fresh(f"group-{tag:08X}")
                    body = body_of(part10(ds, syntax))
                    body = _insert(body, _explicit(tag, b"UL" if tag & 0xFFFF in (0, 0x900) else b"UI",
                                                   struct.pack("<I", 0) if tag & 0xFFFF in (0, 0x900) else b"1.2\0"), 0)
                    add(f"{base_name}-{enc}-group-{tag:08X}", ds, MISMATCH, f"({tag >> 16:04X},{tag & 0xFFFF:04X})",
                        syntax, body)
                ds = fresh("meta-in-body")
                body = _explicit(0x00020010, b"UI", ImplicitVRLittleEndian.encode() + b"\0") + body_of(part10(ds, syntax))
                add(f"{base_name}-{enc}-meta-in-body", ds, MISMATCH, "(0002,0010)", syntax, body)
                ds = fresh("undefined-length-UT")
                body = body_of(part10(ds, syntax))
                # An OB-style header with an undefined length on a UT element (explicit VR).
                undefined = struct.pack("<HH2s2xI", 0x0040, 0xA160, b"UT", 0xFFFFFFFF) + b"abcd" + \
                    struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
                add(f"{base_name}-{enc}-undefined-length-UT", ds, CANNOT, "(0040,A160)", syntax,
                    _insert(body, undefined, 0x0040A160))
            # The other VR encoding than the transfer syntax says.
            ds = fresh("other-encoding")
            other = ExplicitVRLittleEndian if implicit else ImplicitVRLittleEndian
            add(f"{base_name}-{enc}-other-encoding", ds, CANNOT, "VR", syntax, body_of(part10(ds, other)))
            # Bytes that are no data set, and a data set cut inside an element.
            ds = fresh("noise")
            add(f"{base_name}-{enc}-noise", ds, CANNOT, "", syntax, bytes(range(256)) * 16)
            ds = fresh("cut-in-header")
            add(f"{base_name}-{enc}-cut-in-header", ds, MISMATCH, "", syntax, body_of(part10(ds, syntax))[:300])
    return out


def _nest(body: bytes, depth: int, implicit: bool) -> bytes:
    """``body`` with a ContentSequence nested ``depth`` levels (undefined lengths) before its Pixel Data."""
    if implicit:
        sq, leaf = struct.pack("<HHI", 0x0040, 0xA730, 0xFFFFFFFF), struct.pack("<HHI", 0x0008, 0x0104, 4) + b"leaf"
    else:
        sq, leaf = struct.pack("<HH2s2xI", 0x0040, 0xA730, b"SQ", 0xFFFFFFFF), _explicit(0x00080104, b"LO", b"leaf")
    item, item_end = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF), struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    sq_end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    nested = (sq + item) * depth + leaf + (item_end + sq_end) * depth
    at = body.rfind(b"\xe0\x7f\x10\x00")
    return body[:at] + nested + body[at:]


def same_series_in_two_studies() -> list[Case]:
    """Two valid instances sharing one Series Instance UID in two studies: both stored, and both
    series complete (a series is identified by (Study, Series) UID)."""
    base = _base("CT_small.dcm")
    series = generate_uid(entropy_srcs=["shared series"])
    out = []
    for label in ("first", "second"):
        ds = _relabel(base, f"shared-{label}", series=series)
        out.append(Case(f"same-series-{label}-study", part10(ds), OK, "", str(ds.SOPInstanceUID),
                        str(ds.file_meta.MediaStorageSOPClassUID), ExplicitVRLittleEndian,
                        extra={"study": str(ds.StudyInstanceUID), "series": series}))
    return out


def duplicates() -> list[Case]:
    """The same SOP Instance UID thrice: a repeat is stored once (success), another image is refused."""
    ds = _relabel(_base("CT_small.dcm"), "duplicate")
    first = part10(ds)
    changed = copy.deepcopy(ds)
    changed.PixelData = bytes(reversed(changed.PixelData))  # another image under the same UID
    meta = dict(sop=str(ds.SOPInstanceUID), sop_class=str(ds.file_meta.MediaStorageSOPClassUID),
                syntax=ExplicitVRLittleEndian)
    return [Case("duplicate-first", first, OK, **meta), Case("duplicate-repeat", first, OK, **meta),
            Case("duplicate-other-content", part10(changed), DUPLICATE, "(0008,0018) SOPInstanceUID", **meta)]
