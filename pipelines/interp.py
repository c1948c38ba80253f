"""The ``interp`` pipeline: classic interpolation (nearest, linear, cubic, Lanczos) of any series.

It is the baseline every model is compared with, and the reference implementation of the pipeline
contract (:mod:`pipelines.base`): load and check (:mod:`pipelines.dicom.series`), resample
(:mod:`pipelines.models.interpolation`), write a derived series (:mod:`pipelines.dicom.derived`).

Options
-------
method : {"nearest", "linear", "cubic", "lanczos"}, default "lanczos"
scale / inplane_scale : float in [1, 8]
    In-plane factor (``scale`` is an alias; on a volume it is in-plane too). Output matrix
    ``round(n * scale)``; the spacing becomes ``FOV / new size`` so the field of view is exact.
through_scale : float in [1, 8]
    Through-plane factor for volumes (see the geometry rule below).
target_spacing : number | [row, col] | [row, col, slice] (mm; ``null`` entries keep that axis)
    A number is the slice spacing. In-plane the matrix becomes ``round(FOV / target)`` and the
    spacing ``FOV / matrix``, so it is within half a pixel of the target. A target coarser than the
    source is allowed (antialiased downsampling), within a factor 8.
With no geometry option at all, in-plane x2. Options that ask for no change are rejected.

Geometry rule through-plane (N slices at spacing s, factor r or target t)
-------------------------------------------------------------------------
The output covers exactly the same extent: ``N_out = round((N - 1) * r) + 1`` (or
``round((N - 1) * s / t) + 1``) slices at spacing ``(N - 1) * s / (N_out - 1)``, the first at the
first source position. For an integer ``r`` every source slice is reproduced exactly by the
interpolating kernels (linear, cubic, Lanczos weigh 1 at 0 and 0 at other integers), which is what
viewers and readers expect. SliceThickness is kept when upsampling: interpolation does not narrow
the slice sensitivity profile, and a smaller value would claim resolution that is not there (overlap
of thickness over spacing is common and displayed correctly). When downsampling it becomes
``max(source thickness, new spacing)``. SpacingBetweenSlices is set to the new spacing.
InstanceNumbers follow the source's direction along the normal. Without through-plane resampling
every output slice keeps its source slice's own position (only the half-pixel in-plane shift).

Memory: the input volume is decoded once (float32); output slices are computed in slabs of
at most ``SLAB_VOXELS`` (through-plane weights only touch the source slices within the kernel
support) and yielded one by one.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from pydicom import Dataset

from pipelines.base import Refusal, RunContext
from pipelines.dicom.derived import DerivedSeries, DerivedSlice, volume_slice, write_derived
from pipelines.options import check_keys, geometry, number, without_slices
from pipelines.models.interpolation import (
    METHODS,
    apply_axis,
    resize,
    resize_weights,
    sample_weights,
)
from pipelines.dicom.series import Image2D, Volume, in_plane_only, load_series

logger = logging.getLogger(__name__)

MAX_FACTOR = 8.0
MAX_MATRIX = 65535  # Rows/Columns are US
MAX_SLICE_PIXELS = 2**27  # ~0.5 GB float32 per output slice
SLAB_VOXELS = 2**23  # ~32 MB float32 per slab of output slices
SERIES_NUMBER_OFFSET = 1000
OPTION_KEYS = ("method", "scale", "inplane_scale", "through_scale", "target_spacing")


def _fmt(x: float) -> str:
    return f"{x:.4g}"


class InterpPipeline:
    """Resample a series with a classic kernel and write it as a derived series."""

    name = "interp"

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Normalise options to ``{method, inplane_scale, through_scale, target_spacing}``.

        ``target_spacing`` is normalised to ``[row, col, slice]`` with ``None`` for axes it does not
        set; a scale is ``None`` where the target sets that axis. The result validates to itself.

        Raises
        ------
        ValueError
            Naming the offending key.
        """
        check_keys(options, OPTION_KEYS)
        method = options.get("method", "lanczos")
        if method not in METHODS:
            raise ValueError(f"option 'method' must be one of {', '.join(METHODS)}, got {method!r}")
        if options.get("scale") is not None and options.get("inplane_scale") is not None:
            raise ValueError("give option 'scale' or 'inplane_scale', not both (on a volume both mean in-plane)")
        scale_key = "scale" if options.get("scale") is not None else "inplane_scale"
        inplane, through, target = geometry(options, scale_key, _factor, 2.0)
        return {"method": method, "inplane_scale": inplane, "through_scale": through, "target_spacing": target}

    def run(self, datasets: Sequence[Dataset], options: Mapping[str, Any], context: RunContext) -> Iterator[Dataset]:
        """Yield the derived series; raise :class:`Refusal` for input it cannot process."""
        opts = self.validate_options(options)
        target = opts["target_spacing"] or [None, None, None]
        through_wanted = opts["through_scale"] != 1.0 or target[2] is not None
        loaded = load_series(datasets, min_slices=2 if through_wanted else 1)
        if isinstance(loaded, Volume):
            return self._run_volume(loaded, opts, context)
        if through_wanted:
            raise Refusal("through-plane resampling (through_scale or a slice target_spacing) needs a volume, "
                          "and this series holds projection images")
        return self._run_images(loaded, opts, context)

    def _run_images(self, images: list[Image2D], opts: dict[str, Any], context: RunContext) -> Iterator[Dataset]:
        images = sorted(images, key=lambda im: (int(im.dataset.get("InstanceNumber") or 0), im.dataset.SOPInstanceUID))
        plans = [_inplane_plan(im.pixels.shape, im.pixel_spacing, opts) for im in images]
        if any(rows == im.pixels.shape[0] and cols == im.pixels.shape[1]
               for im, (rows, cols) in zip(images, plans, strict=True)):
            raise Refusal("the options leave the image matrix unchanged")
        series = DerivedSeries(
            description=_label(opts, through=False),
            derivation_description=_derivation_text(opts, images[0].pixels.shape, plans[0]),
            model_name=f"interp ({opts['method']})",
            series_number_offset=SERIES_NUMBER_OFFSET,
        )

        def slices() -> Iterator[DerivedSlice]:
            for i, (image, shape) in enumerate(zip(images, plans, strict=True)):
                pixels = resize(image.pixels, shape, opts["method"])
                yield DerivedSlice(pixels=pixels, template=image.dataset, sources=[image.dataset], index=i)
                context.report(i + 1, len(images))

        return write_derived(slices(), series, context)

    def _run_volume(self, vol: Volume, opts: dict[str, Any], context: RunContext) -> Iterator[Dataset]:
        n, rows, cols = vol.shape
        rows_out, cols_out = _inplane_plan((rows, cols), vol.pixel_spacing, opts)
        target = opts["target_spacing"] or [None, None, None]
        note = in_plane_only(vol, opts["through_scale"] != 1.0 or target[2] is not None,
                             (rows_out, cols_out) != (rows, cols))
        if note:
            opts = without_slices(opts)
        new_spacing = (rows * vol.pixel_spacing[0] / rows_out, cols * vol.pixel_spacing[1] / cols_out)
        centres, out_spacing = _through_plan(vol, opts)
        through = out_spacing is not None
        if not through and (rows_out, cols_out) == (rows, cols):
            raise Refusal("the options leave the volume unchanged")
        n_out = len(centres)
        thickness = None  # keep the source's
        if through and out_spacing > (vol.slice_spacing or 0.0):
            thickness = max(vol.slice_thickness or 0.0, out_spacing)
        series = DerivedSeries(
            description=(f"{note} " if note else "") + _label(opts, through=through),  # the note first: never cut
            derivation_description=_derivation_text(opts, (rows, cols), (rows_out, cols_out), n, n_out)
            + (f"; every slice kept where it is, as the series has {vol.irregular}" if note else ""),
            model_name=f"interp ({opts['method']})",
            series_number_offset=SERIES_NUMBER_OFFSET,
            slice_thickness=thickness,
            spacing_between_slices=out_spacing,
            images_in_acquisition=n_out if through else None,
        )
        method = opts["method"]
        weights_z = None
        if through:  # antialias when the new spacing is coarser
            weights_z = sample_weights(n, centres, method, stretch=max(1.0, out_spacing / vol.slice_spacing))
        weights_y = resize_weights(rows, rows_out, method)
        weights_x = resize_weights(cols, cols_out, method)
        slab = max(1, SLAB_VOXELS // (rows_out * cols_out))

        def slices() -> Iterator[DerivedSlice]:
            for start in range(0, n_out, slab):
                stop = min(start + slab, n_out)
                if weights_z is not None:
                    part = weights_z[start:stop]
                    lo, hi = int(part.indices.min()), int(part.indices.max()) + 1
                    block = apply_axis(vol.voxels[lo:hi], 0, part[:, lo:hi])
                else:
                    block = vol.voxels[start:stop]
                if rows_out != rows:
                    block = apply_axis(block, 1, weights_y)
                if cols_out != cols:
                    block = apply_axis(block, 2, weights_x)
                for j in range(start, stop):
                    k = float(centres[j])
                    yield volume_slice(vol, block[j - start], k, j, n_out, new_spacing, through)
                    context.report(j + 1, n_out)

        return write_derived(slices(), series, context)


def _factor(options: Mapping[str, Any], key: str) -> float | None:
    return number(options, key, 1.0, MAX_FACTOR)


def _inplane_plan(shape: tuple[int, ...], spacing: tuple[float, float] | None,
                  opts: Mapping[str, Any]) -> tuple[int, int]:
    rows, cols = int(shape[0]), int(shape[1])
    target = opts["target_spacing"]
    if target is not None and target[0] is not None:
        if spacing is None:
            raise Refusal("an in-plane target_spacing needs the pixel spacing, which this image does not give")
        out = (max(1, round(rows * spacing[0] / target[0])), max(1, round(cols * spacing[1] / target[1])))
    else:
        scale = opts["inplane_scale"]
        out = (max(1, round(rows * scale)), max(1, round(cols * scale)))
    for n, m in zip((rows, cols), out, strict=True):
        if not 1 / MAX_FACTOR <= m / n <= MAX_FACTOR:
            raise Refusal(f"in-plane resampling {n} -> {m} pixels is beyond a factor {MAX_FACTOR:g}")
    if max(out) > MAX_MATRIX or out[0] * out[1] > MAX_SLICE_PIXELS:
        raise Refusal(f"output matrix {out[0]}x{out[1]} is too large")
    return out


def _through_plan(vol: Volume, opts: Mapping[str, Any]) -> tuple[np.ndarray, float | None]:
    """Fractional source indices of the output slices, and the new slice spacing (None: unchanged)."""
    n = vol.shape[0]
    target = opts["target_spacing"]
    if opts["through_scale"] == 1.0 and (target is None or target[2] is None):
        return np.arange(n, dtype=np.float64), None
    spacing = vol.slice_spacing
    if spacing is None:  # load_series enforced 2 slices; kept for the type checker
        raise Refusal("through-plane resampling needs at least 2 slices")
    extent = (n - 1) * spacing
    if target is not None and target[2] is not None:
        n_out = max(2, round(extent / target[2]) + 1)
    else:
        n_out = round((n - 1) * opts["through_scale"]) + 1
    factor = (n_out - 1) / (n - 1)
    if not 1 / MAX_FACTOR <= factor <= MAX_FACTOR:
        raise Refusal(f"through-plane resampling {n} -> {n_out} slices is beyond a factor {MAX_FACTOR:g}")
    return np.linspace(0.0, n - 1.0, n_out), extent / (n_out - 1)


def _label(opts: Mapping[str, Any], *, through: bool) -> str:
    target = opts["target_spacing"] or [None, None, None]
    parts = []
    if target[0] is not None:
        parts.append(f"{_fmt(target[0])}x{_fmt(target[1])}mm")
    elif opts["inplane_scale"] != 1.0:
        parts.append(f"x{_fmt(opts['inplane_scale'])}")
    if through:
        through_text = f"{_fmt(target[2])}mm" if target[2] is not None else f"x{_fmt(opts['through_scale'])}"
        parts.append(f"slices {through_text}")
    return f"super-res {', '.join(parts)} {opts['method']} (interpolation)"


def _derivation_text(opts: Mapping[str, Any], shape: tuple[int, ...], out: tuple[int, int],
                     n: int | None = None, n_out: int | None = None) -> str:
    text = (f"Spatial resampling by {opts['method']} interpolation (srnode interp): "
            f"matrix {shape[0]}x{shape[1]} -> {out[0]}x{out[1]}, field of view kept")
    if n is not None and n_out is not None and n_out != n:
        text += f"; {n} -> {n_out} slices over the same extent"
    return text


PIPELINE = InterpPipeline()
