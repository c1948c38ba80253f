"""No invented intensities: what every derived image is held to, whatever pipeline made it.

The derived writer (:mod:`pipelines.dicom.derived`) applies :func:`guard` to every output slice, in
modality values (after the rescale, before the inverse rescale to stored values), so interpolation
(Lanczos, cubic) and every network (sr3d, arbitrary, MDRN, cxr) obey the same three rules:

1. **Range.** An output stays within the value range of its input series plus ``MARGIN`` (2 %) of
   that range's span on each side: a network cannot make 1143 HU out of a series whose maximum is
   782. The range is noted per series by :func:`pipelines.dicom.series.load_series`.
2. **Outside the field.** Pixels outside the valid field are not super-resolved: where an output
   pixel's nearest input pixel is outside, it gets the input's value there back, exactly. The field
   is found at decode time (:func:`detect`): declared padding (PixelPaddingValue, with its range
   limit), and for CT/MR the air outside the circular reconstruction field, i.e. the pixels holding
   exactly the image's lowest value in one region connected to the image border and covering at
   least ``MIN_OUTSIDE`` of it (robust to the circle's size and to fields that are not circles; air
   clipped to that same value inside the field is treated alike, which changes nothing: it was
   constant). The decoder gives those pixels the darkest real value, so the resampling does not
   ring off the step into real pixels.
3. **No ringing at edges of projection images.** CR/DX collimator edges (and lead markers) are
   steps that a network or Lanczos reproduces with over- and undershoot. Collimator attributes
   cannot be relied on (the real CR in ``shared/data`` gives them in mm from the centre), so rather
   than find the collimator, every output pixel of a projection image is held within the range of
   the ``LOCAL`` x ``LOCAL`` input pixels around it (plus ``MARGIN``): a step comes out as a plain
   interpolation would make it, without a ring, while texture inside the field keeps its detail.

State is kept per decoded dataset (``id``, released with the dataset), as the pipelines pass
datasets, not arrays, to the writer.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset
from scipy import ndimage

MARGIN = 0.02
MIN_OUTSIDE = 0.01
LOCAL = 3
FIELD_MODALITIES = ("CT", "MR")
VOLUME_MODALITIES = ("CT", "MR", "PT", "NM")


@dataclass(frozen=True, eq=False)
class Field:
    """What :func:`detect` found in one decoded instance.

    ``outside``: (rows, cols) True outside the valid field, or None; ``fill``: the stored value to
    write there; ``local_low``/``local_high``: the input's local extremes (projection images only)."""

    outside: np.ndarray | None = None
    fill: int | None = None
    local_low: np.ndarray | None = None
    local_high: np.ndarray | None = None


_FIELDS: dict[int, Field] = {}
_RANGES: dict[int, tuple[float, float]] = {}


def _remember(table: dict, ds: Dataset, value) -> None:
    if id(ds) not in table:
        weakref.finalize(ds, table.pop, id(ds), None)
    table[id(ds)] = value


def detect(ds: Dataset, stored: np.ndarray, pixels: np.ndarray, padding: np.ndarray | None,
           padding_value: int | None) -> np.ndarray | None:
    """Note the valid field of ``ds`` (``stored``: its stored values, ``pixels``: the same in
    modality values, ``padding``: where it declares padding) and return the mask of pixels outside
    it (None: all inside), for the decoder to fill."""
    outside, fill = None, None
    if padding is not None and padding.any():
        outside, fill = padding, padding_value
    elif str(ds.get("Modality", "")) in FIELD_MODALITIES and stored.ndim == 2:
        outside = _outside_reconstruction(stored)
        if outside is not None:
            fill = int(stored[outside][0])
    low = high = None
    if str(ds.get("Modality", "")) not in VOLUME_MODALITIES and pixels.ndim == 2:
        low, high = local_range(pixels)
    if outside is not None or low is not None:
        _remember(_FIELDS, ds, Field(outside, fill, low, high))
    return outside


def _outside_reconstruction(stored: np.ndarray) -> np.ndarray | None:
    """Pixels holding the image's lowest value, connected to the border, if they cover at least
    ``MIN_OUTSIDE`` of the image (the air outside a CT's reconstruction circle); else None."""
    lowest = stored == stored.min()
    if lowest.mean() < MIN_OUTSIDE or lowest.all():
        return None
    labels, _ = ndimage.label(lowest)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    outside = np.isin(labels, border[border > 0])
    return outside if outside.mean() >= MIN_OUTSIDE else None


def note_range(datasets, pixels: np.ndarray) -> None:
    """The value range of one input (a series' voxels, or one projection image), for each of its
    datasets: what :func:`guard` holds their outputs to."""
    value_range = (float(np.min(pixels)), float(np.max(pixels)))
    for ds in datasets:
        _remember(_RANGES, ds, value_range)


def value_range(ds: Dataset) -> tuple[float, float] | None:
    return _RANGES.get(id(ds))


def outside(ds: Dataset) -> np.ndarray | None:
    """The mask of pixels of decoded ``ds`` outside its valid field (rule 2), or None (all inside)."""
    field = _FIELDS.get(id(ds))
    return None if field is None else field.outside


def outside_on(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``mask`` (an input grid's :func:`outside`) sampled on an output grid of ``shape``."""
    return mask[nearest_index(mask.shape, shape)]


def allowed_range(ds: Dataset) -> tuple[float, float] | None:
    """The range an output made from ``ds`` must stay in: its input's, widened by ``MARGIN`` of the span."""
    known = _RANGES.get(id(ds))
    return None if known is None else widened(known)


def widened(value_range: tuple[float, float]) -> tuple[float, float]:
    """An input's (low, high) widened by ``MARGIN`` of its span on each side: rule 1's bounds."""
    low, high = value_range
    margin = MARGIN * (high - low)
    return low - margin, high + margin


def local_range(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The lowest and highest input value around each pixel (``LOCAL`` x ``LOCAL``): rule 3's bounds."""
    return (ndimage.minimum_filter(pixels, LOCAL, mode="nearest"),
            ndimage.maximum_filter(pixels, LOCAL, mode="nearest"))


def hold(out: np.ndarray, allowed: tuple[float, float] | None,
         local: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """``out`` held to rule 3 (``local``: :func:`local_range` of the input, sampled on the output's
    grid, widened by ``MARGIN`` of the input's span; only when the grids differ) and rule 1
    (``allowed``: :func:`widened` input range)."""
    if local is not None and local[0].shape != out.shape:
        span = 0.0 if allowed is None else (allowed[1] - allowed[0]) / (1 + 2 * MARGIN)
        index = nearest_index(local[0].shape, out.shape)
        out = np.clip(out, local[0][index] - MARGIN * span, local[1][index] + MARGIN * span)
    if allowed is not None:
        out = np.clip(out, allowed[0], allowed[1])
    return out


def guard(pixels: np.ndarray, ds: Dataset) -> tuple[np.ndarray, np.ndarray | None, int | None]:
    """(``pixels`` of an output slice made from template ``ds`` held to rules 1 and 3, the mask
    of output pixels outside the field (rule 2), the stored value to write there)."""
    field = _FIELDS.get(id(ds))
    local = None if field is None or field.local_low is None else (field.local_low, field.local_high)
    out = hold(np.asarray(pixels, dtype=np.float32), allowed_range(ds), local)
    if field is None or field.outside is None:
        return out, None, None
    return out, field.outside[nearest_index(field.outside.shape, out.shape)], field.fill


def nearest_index(source: tuple[int, int], shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays that sample a ``source``-shaped array at ``shape`` by nearest neighbour, pixel
    centres aligned (the field of view kept)."""
    rows = np.clip(np.floor((np.arange(shape[0]) + 0.5) * source[0] / shape[0]), 0, source[0] - 1)
    cols = np.clip(np.floor((np.arange(shape[1]) + 0.5) * source[1] / shape[1]), 0, source[1] - 1)
    return np.ix_(rows.astype(np.intp), cols.astype(np.intp))
