"""What a received instance must be before it is acknowledged: checked on the data set that
:mod:`node.ingest` has already parsed, before anything else reads its values.

The node refuses what cannot be what the sender meant (an encoding that contradicts the transfer
syntax, a Rows of 0, a RescaleSlope that is not a number, pixel data that does not match its
header); it leaves to the pipelines what is valid DICOM but cannot be processed (a gantry tilt, a
zero pixel spacing). Each refusal names one element; a value is shown only when it is a number
the node has parsed (a sender's text may carry anything, patient data included).

Statuses (PS3.4 B.2.3, also the STOW-RS Failure Reasons): ``0xC000`` Cannot understand, when the
bytes cannot be decoded as the transfer syntax says; ``0xA900`` Data Set does not match SOP
Class, when they decode but do not make a valid instance of its SOP class.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag, Tag

DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000

MAX_SEQUENCE_DEPTH = 32  # SR content trees nest ~10 deep; pydicom's reader recurses past ~150
MAX_DECODED_BYTES = 1 << 31  # Rows x Columns x frames x samples x bytes: what decoding would allocate
MAX_RESCALE = 1e10  # |slope| and |intercept|; a stored value times more than this is no measurement
MIN_RESCALE_SLOPE = 1e-10
MAX_COORDINATE_MM = 1e6  # a kilometre from the origin is no patient position
MAX_SPACING_MM = 1e4
UNDEFINED_LENGTH = 0xFFFFFFFF
PIXEL_DATA = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # Pixel Data, Float / Double Float Pixel Data
PHOTOMETRIC_SAMPLES = {
    "MONOCHROME1": 1, "MONOCHROME2": 1, "PALETTE COLOR": 1, "RGB": 3, "YBR_FULL": 3, "YBR_FULL_422": 3,
    "YBR_PARTIAL_422": 3, "YBR_PARTIAL_420": 3, "YBR_ICT": 3, "YBR_RCT": 3, "HSV": 3, "ARGB": 4, "CMYK": 4,
    "XYB": 3,
}


@dataclass(frozen=True)
class Problem:
    status: int
    element: str  # "(0028,0010) Rows"
    why: str  # what is wrong with it, without the sender's text

    @property
    def comment(self) -> str:
        """For the C-STORE Error Comment (LO: 64 characters)."""
        return f"{self.element} {self.why}"[:64]


def element_name(tag: int) -> str:
    tag = Tag(tag)
    keyword = keyword_for_tag(tag) or ("private" if tag.is_private else "unknown")
    return f"({tag.group:04X},{tag.element:04X}) {keyword}"


def _problem(status: int, tag: int, why: str) -> Problem:
    return Problem(status, element_name(tag), why)


# -- the encoding -------------------------------------------------------------------------------
def structure_problem(ds: Dataset) -> Problem | None:
    """The data set's structure: command or meta group
    elements inside the data set, VRs read in the other VR encoding than the transfer syntax's,
    undefined lengths on elements that cannot have one, sequences nested too deep. Walks the
    elements as pydicom read them (nothing is converted); run it before any value is read."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    implicit = bool(syntax is not None and syntax.is_implicit_VR)
    stack: list[tuple[Dataset, int]] = [(ds, 1)]
    while stack:
        dataset, depth = stack.pop()
        for tag, elem in dataset._dict.items():
            if depth == 1 and tag < 0x00080000:
                what = {0: "is a command element", 2: "is a file meta element", 4: "is a DICOMDIR element"}.get(
                    tag >> 16, f"is in group {tag >> 16:04X}, which no data set may use,")
                return _problem(DATASET_DOES_NOT_MATCH_SOP_CLASS, tag, f"{what} inside the data set")
            if isinstance(elem, RawDataElement):
                # (Items of a sequence read as UN are implicit VR by definition: checked at the top only.)
                if depth == 1 and syntax is not None and elem.is_implicit_VR != implicit:
                    how = "implicit" if elem.is_implicit_VR else "explicit"
                    return _problem(CANNOT_UNDERSTAND, tag, f"is encoded in {how} VR, not as the transfer syntax says")
                if elem.length == UNDEFINED_LENGTH and elem.VR not in ("SQ", "UN", None) and tag not in PIXEL_DATA:
                    return _problem(CANNOT_UNDERSTAND, tag, f"has an undefined length, not allowed for VR {elem.VR}")
                continue
            if elem.VR == "SQ":
                if depth >= MAX_SEQUENCE_DEPTH:
                    return _problem(CANNOT_UNDERSTAND, tag, f"nests sequences deeper than {MAX_SEQUENCE_DEPTH} levels")
                stack.extend((item, depth + 1) for item in elem.value if isinstance(item, Dataset))
    return None


def meta_problem(raw: bytes | memoryview) -> Problem | None:
    """A group 0002 element right after the length the File Meta Information Group Length gives:
    pydicom would read it as file meta (a Transfer Syntax UID there would change how the rest is
    decoded), though the sender put it in the data set."""
    if bytes(raw[128:132]) != b"DICM" or bytes(raw[132:136]) != b"\x02\x00\x00\x00" or bytes(raw[136:138]) != b"UL":
        return None
    end = 144 + struct.unpack_from("<I", raw, 140)[0]
    if len(raw) >= end + 4 and bytes(raw[end:end + 2]) == b"\x02\x00":
        return _problem(DATASET_DOES_NOT_MATCH_SOP_CLASS, 0x00020000 | struct.unpack_from("<H", raw, end + 2)[0],
                        "is a file meta element after the file meta group")
    return None


# -- values ---------------------------------------------------------------------------------------
class _Bad(Exception):
    def __init__(self, tag: int, why: str, status: int = DATASET_DOES_NOT_MATCH_SOP_CLASS):
        super().__init__(why)
        self.problem = _problem(status, tag, why)


def _element(ds: Dataset, tag: int):
    """The element as read (raw or converted), or None when absent."""
    elem = ds._dict.get(BaseTag(tag))
    if elem is not None and deferred(elem):
        raise _Bad(tag, "is too long for its VR")
    return elem


def _vr(ds: Dataset, tag: int, elem) -> str:
    """The element's VR; UN (a sender that did not know the VR) counts as the dictionary's."""
    return elem.VR if elem.VR and elem.VR != "UN" else dictionary_VR(tag)


def _expect_vr(ds: Dataset, tag: int, allowed: tuple[str, ...]):
    elem = _element(ds, tag)
    if elem is None:
        return None
    vr = _vr(ds, tag, elem)
    if vr not in allowed:
        raise _Bad(tag, f"has VR {vr}, not {' or '.join(allowed)}")
    return elem


def _numbers(ds: Dataset, tag: int, vm: int | None = None) -> list[float] | None:
    """A DS/IS element's values as finite numbers (``vm`` of them), None when absent or empty."""
    elem = _expect_vr(ds, tag, ("DS", "IS"))
    if elem is None:
        return None
    if isinstance(elem, RawDataElement):
        text = bytes(elem.value or b"").decode("latin-1")
    else:
        value = elem.value
        text = "\\".join(map(str, value)) if isinstance(value, (list, tuple)) else ("" if value is None else str(value))
    text = text.strip(" \0")
    if not text:
        return None
    try:
        values = [float(v.strip(" \0")) for v in text.split("\\")]
    except ValueError:
        raise _Bad(tag, "is not a number") from None
    if not all(math.isfinite(v) for v in values):
        raise _Bad(tag, "is not a finite number")
    if vm is not None and len(values) != vm:
        raise _Bad(tag, f"has {len(values)} values, not {vm}")
    return values


def _integer(ds: Dataset, tag: int, required: bool, lo: int, hi: int) -> int | None:
    """A US element (or IS NumberOfFrames) as one whole number in [lo, hi]."""
    elem = _element(ds, tag)
    if elem is None or (elem.value in (None, b"", "") if not isinstance(elem, RawDataElement) else not elem.value):
        if required:
            raise _Bad(tag, "is missing or empty")
        return None
    if dictionary_VR(tag) == "IS":
        values = _numbers(ds, tag, 1)
        if values is None or not values[0].is_integer():
            raise _Bad(tag, "is not a whole number")
        value = int(values[0])
    else:
        vr = _vr(ds, tag, elem)
        if vr != "US":
            raise _Bad(tag, f"has VR {vr}, not US")
        value = ds[tag].value  # converted once; cheap for US
        if isinstance(value, (list, tuple)) or not isinstance(value, int):
            raise _Bad(tag, "has more than one value" if isinstance(value, (list, tuple)) else "is not a number")
    if not lo <= value <= hi:
        raise _Bad(tag, f"is {value}, outside {lo}..{hi}")
    return value


def _text(ds: Dataset, tag: int) -> str | None:
    elem = _element(ds, tag)
    if elem is None:
        return None
    value = bytes(elem.value or b"").decode("latin-1") if isinstance(elem, RawDataElement) else elem.value
    return str(value or "").strip(" \0") or None


def value_problem(ds: Dataset) -> Problem | None:
    """Image Pixel module, modality rescale and plane geometry: the values the pipelines compute
    from, where present (an instance without Pixel Data, e.g. an SR, has none of them)."""
    try:
        _check_geometry(ds)
        if any(tag in ds._dict for tag in PIXEL_DATA) or 0x00280010 in ds._dict:
            _check_image(ds)
    except _Bad as bad:
        return bad.problem
    return None


def _check_geometry(ds: Dataset) -> None:
    position = _numbers(ds, 0x00200032, 3)  # ImagePositionPatient
    if position and max(map(abs, position)) > MAX_COORDINATE_MM:
        raise _Bad(0x00200032, f"is more than {MAX_COORDINATE_MM:g} mm from the origin")
    orientation = _numbers(ds, 0x00200037, 6)  # ImageOrientationPatient
    if orientation and max(map(abs, orientation)) > 1.001:
        raise _Bad(0x00200037, "has a direction cosine outside -1..1")
    for tag in (0x00280030, 0x00181164):  # PixelSpacing, ImagerPixelSpacing
        spacing = _numbers(ds, tag, 2)
        if spacing and not all(0 <= v <= MAX_SPACING_MM for v in spacing):
            raise _Bad(tag, f"is outside 0..{MAX_SPACING_MM:g} mm")
    for tag in (0x00180050, 0x00180088):  # SliceThickness, SpacingBetweenSlices
        _numbers(ds, tag, 1)


def _check_image(ds: Dataset) -> None:
    rows = _integer(ds, 0x00280010, True, 1, 65535)
    columns = _integer(ds, 0x00280011, True, 1, 65535)
    allocated = _integer(ds, 0x00280100, True, 1, 64)
    if allocated != 1 and allocated % 8:
        raise _Bad(0x00280100, f"is {allocated}, not 1 or a multiple of 8")
    stored = _integer(ds, 0x00280101, True, 1, allocated)
    high = _integer(ds, 0x00280102, False, stored - 1, allocated - 1)
    del high
    _integer(ds, 0x00280103, True, 0, 1)  # PixelRepresentation
    samples = _integer(ds, 0x00280002, True, 1, 4)
    photometric = _text(ds, 0x00280004)
    if photometric is None:
        raise _Bad(0x00280004, "is missing or empty")
    if PHOTOMETRIC_SAMPLES.get(photometric) != samples:
        raise _Bad(0x00280004, "is not a defined term" if photometric not in PHOTOMETRIC_SAMPLES
                   else f"needs {PHOTOMETRIC_SAMPLES[photometric]} samples per pixel, not {samples}")
    if samples > 1:
        _integer(ds, 0x00280006, False, 0, 1)  # PlanarConfiguration
    frames = _integer(ds, 0x00280008, False, 1, 1 << 31) or 1  # NumberOfFrames (IS)
    decoded = rows * columns * samples * frames * max(allocated // 8, 1)
    if decoded > MAX_DECODED_BYTES:
        raise _Bad(0x00280008 if frames > 1 else 0x00280010,
                   f"makes {decoded / 2**30:.1f} GiB of pixels, over the node's {MAX_DECODED_BYTES / 2**30:.0f} GiB")
    _check_rescale(ds)


def _check_rescale(ds: Dataset) -> None:
    slope = _numbers(ds, 0x00281053, 1)
    intercept = _numbers(ds, 0x00281052, 1)
    if slope is not None and not MIN_RESCALE_SLOPE <= abs(slope[0]) <= MAX_RESCALE:
        raise _Bad(0x00281053, "is 0" if slope[0] == 0 else f"is outside {MIN_RESCALE_SLOPE:g}..{MAX_RESCALE:g} in size")
    if intercept is not None and abs(intercept[0]) > MAX_RESCALE:
        raise _Bad(0x00281052, f"is more than {MAX_RESCALE:g} in size")


# -- pixel data ----------------------------------------------------------------------------------
ITEM, SEQUENCE_DELIMITER = b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0"  # (FFFE,E000), (FFFE,E0DD), little endian
CHUNK = 1 << 20


def deferred(elem) -> bool:
    """Whether pydicom left the element's value in the file (``dcmread(path, defer_size=...)``, a
    large instance: node.spill): only its position and length were read."""
    return isinstance(elem, RawDataElement) and elem.value is None and elem.length != 0


def value_span(ds: Dataset, tag: int) -> tuple[int, int] | None:
    """(offset, length) in ``ds.filename`` of a :func:`deferred` value (the bytes the file has of
    it, as pydicom would read them); for an undefined length
    (encapsulated pixel data) up to its sequence delimiter, found by walking the items: None when
    an item runs past the end of the file or something other than an item is met (as pydicom's
    value would end there)."""
    elem = ds._dict[BaseTag(tag)]
    start = elem.value_tell
    with open(ds.filename, "rb") as fp:
        end = fp.seek(0, 2)
        if elem.length != UNDEFINED_LENGTH:
            return start, max(0, min(elem.length, end - start))  # cut short: what is there, as pydicom reads it
        pos = start
        while pos + 8 <= end:
            fp.seek(pos)
            head = fp.read(8)
            if head[:4] == SEQUENCE_DELIMITER:
                return start, pos - start
            if head[:4] != ITEM:
                return None
            pos += 8 + struct.unpack_from("<I", head, 4)[0]
    return None


def value_chunks(ds: Dataset, tag: int):
    """An element's value in pieces of at most :data:`CHUNK` bytes, read from the file when it is
    :func:`deferred` (never whole in memory); ValueError when its extent cannot be found."""
    elem = ds._dict[BaseTag(tag)]
    if not deferred(elem):
        data = memoryview(ds[tag].value or b"")
        for pos in range(0, len(data), CHUNK):
            yield data[pos:pos + CHUNK]
        return
    span = value_span(ds, tag)
    if span is None:
        raise ValueError(f"{element_name(tag)} runs past the end of the file")
    start, length = span
    with open(ds.filename, "rb") as fp:
        fp.seek(start)
        for pos in range(0, length, CHUNK):
            yield fp.read(min(CHUNK, length - pos))


def _items_fit(header_at, size: int) -> bool:
    """Whether the items of encapsulated data of ``size`` bytes (``header_at(pos)``: the 8 bytes
    at ``pos``) each end within it."""
    pos = 0
    while pos + 8 <= size:
        pos += 8 + struct.unpack_from("<I", header_at(pos), 4)[0]
    return pos <= size


def pixel_problem(ds: Dataset) -> Problem | None:
    """How the Pixel Data disagrees with its header (run after :func:`value_problem`, whose checks
    it relies on). pydicom reads a truncated file without complaint; acknowledged, it would fail its
    whole series later, and the sender would not send it again. An image (Rows present) must have
    pixel data (where undefined-length, encapsulated data runs to the end of the file pydicom
    returns no elements at all); native data must hold Rows x Columns x samples x frames (one
    trailing padding shorter than a frame is tolerated); each item of encapsulated data must fit.
    A :func:`deferred` value is checked in the file, never loaded."""
    tag = next((t for t in (0x7FE00010, 0x7FE00008, 0x7FE00009) if t in ds._dict), None)
    if tag is None:
        if 0x00280010 in ds._dict:
            return _problem(CANNOT_UNDERSTAND, 0x7FE00010, "is missing (or the data ends inside an element)")
        return None
    syntax = ds.file_meta.get("TransferSyntaxUID")
    encapsulated = tag == 0x7FE00010 and syntax is not None and syntax.is_encapsulated
    elem = ds._dict[BaseTag(tag)]
    data = None if deferred(elem) else (ds[tag].value or b"")
    if data is None:
        span = value_span(ds, tag)
        if span is None:
            return _problem(CANNOT_UNDERSTAND, tag, "has an encapsulated item cut short")
        start, size = span
    else:
        size = len(data)
    if not size:
        return _problem(DATASET_DOES_NOT_MATCH_SOP_CLASS, tag, "is empty")
    if encapsulated:
        if data is not None:
            fits = _items_fit(lambda pos: data[pos:pos + 8], size)
        else:
            with open(ds.filename, "rb") as fp:
                fits = _items_fit(lambda pos: (fp.seek(start + pos), fp.read(8))[1], size)
        return None if fits else _problem(CANNOT_UNDERSTAND, tag, "has an encapsulated item cut short")
    samples = int(ds.SamplesPerPixel)
    if samples == 3 and str(ds.PhotometricInterpretation).strip() == "YBR_FULL_422":
        samples = 2  # chroma subsampled horizontally: two samples a pixel on average
    bits = {0x7FE00008: 32, 0x7FE00009: 64}.get(tag) or int(ds.BitsAllocated)
    frames = int(float(_numbers(ds, 0x00280008, 1)[0])) if _numbers(ds, 0x00280008, 1) else 1
    expected = -(-int(ds.Rows) * int(ds.Columns) * samples * frames * bits // 8)
    if size < expected:
        return _problem(CANNOT_UNDERSTAND, tag, f"is cut short ({size} of {expected} bytes)")
    if size - expected >= max(expected // frames, 2):  # trailing padding is seen, a whole frame is not
        return _problem(DATASET_DOES_NOT_MATCH_SOP_CLASS, tag,
                        f"has {size} bytes, not the {expected} its header describes")
    return None
