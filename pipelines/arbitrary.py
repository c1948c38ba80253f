"""The ``arbitrary`` pipeline: any factor from 1 to 4 per axis with one network (Meta-Upscale).

Options
-------
scale : number in [1, 4]
    In-plane factor (images and volumes). With no geometry option at all: 2.
through_scale : number in [1, 4]
    Slice-axis factor (volumes).
target_spacing : number | [row, col] | [row, col, slice] (mm; ``null`` keeps an axis)
    As in ``interp``: a number is the slice spacing. For example 5 mm CT slices to 1.25 mm
    (``target_spacing: 1.25``), or 0.7 mm CXR pixels to 0.3 mm (``target_spacing: [0.3, 0.3]``).
model : "meta" (default), "mdrn" or an interpolation method (nearest, linear, cubic, lanczos)
    ``mdrn`` (the deep fixed-scale model) does in-plane factors 2, 3 and 4 only. The interpolations
    run the same geometry, as baselines.

Geometry and rounding
---------------------
An axis of N samples at spacing s asked for factor f (or target t, i.e. f = s / t) becomes
``N_out = floor(N * f + 0.5)`` samples (the nearest integer, halves up) at spacing ``N * s / N_out``:
the field of view (slab edge to slab edge) is kept exactly, and the spacing is within half a
sample of the request. 2.5x on 204 px gives 510 px at exactly s / 2.5; 512 px at 0.7 mm to 0.3 mm
gives 1195 px at 0.29992 mm. Output sample i sits at source coordinate ``(i + 0.5) N / N_out - 0.5``.
In-plane the first pixel centre moves by half the spacing change; through-plane the slices are
written with ImagePositionPatient along the normal, SpacingBetweenSlices and ImagesInAcquisition;
SliceThickness keeps the source's value (as in ``sr3d``). Downsampling is not offered here (``interp``
does it with antialiasing): a factor below 1 is refused.

Intensities: CT HU in [-1024, 2976], MR at its 0.5/99.5 percentiles, projection images at their own
0.5/99.5 percentiles with MONOCHROME1 inverted; values outside the window keep their Lanczos value.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom import Dataset

from pipelines import weights
from pipelines.base import Refusal, RunContext
from pipelines.dicom.derived import LO_MAX, RESEARCH_USE, DerivedSeries, DerivedSlice, volume_slice, write_derived
from pipelines.dicom.series import Image2D, Volume, in_plane_only, load_series
from pipelines.models import intensity
from pipelines.models.interpolation import METHODS, resize
from pipelines.models.lanczos import centres
from pipelines.models.mdrn import MDRN, load_mdrn_once
from pipelines.models.mdrn import SCALES as MDRN_SCALES
from pipelines.models.meta_sr import MAX_SCALE, META_FILE, MetaSR, halo, load_meta
from pipelines.options import check_keys, geometry, number, without_slices
from pipelines.models.volume_stream import (
    BATCH_VOXELS,
    INTERP_PAD,
    interpolation_sampler,
    mdrn_images,
    meta_images,
    resample_stream,
    through_views,
)

logger = logging.getLogger(__name__)

MODELS = ("meta", "mdrn", *METHODS)
OPTION_KEYS = ("scale", "through_scale", "target_spacing", "model")
SERIES_NUMBER_OFFSET = 1500
MAX_MATRIX = 8192
FACTOR_EPS = 1e-9
DESCRIPTION_ROOM = LO_MAX - len(f" - {RESEARCH_USE} v99")  # SeriesDescription before the writer's suffix


@dataclass(frozen=True)
class Network:
    """The model behind ``model: meta`` or ``model: mdrn``, with its version for the equipment record."""

    name: str
    module: MetaSR | MDRN
    version: str

    def inplane(self, images: np.ndarray, rows: int, cols: int, window, invert: bool = False) -> np.ndarray:
        h, w = images.shape[1:]
        if self.name == "meta":
            return meta_images(self.module, images, centres(h, rows), centres(w, cols), (h / rows, w / cols),
                               window, invert)
        scale = rows // h
        if scale not in MDRN_SCALES or (rows, cols) != (h * scale, w * scale):
            raise Refusal(f"model mdrn does in-plane factors 2, 3 and 4; {h}x{w} -> {rows}x{cols} is not one of "
                          f"them (use model: meta)")
        return mdrn_images(self.module, images, scale, window, invert)


@lru_cache(maxsize=2)
def load_models(folder: Path) -> Network:
    """The Meta-Upscale model, checked against its card, once per worker process, on the GPU if any."""
    model = load_meta(Path(folder) / META_FILE).to("cuda" if torch.cuda.is_available() else "cpu")
    return Network("meta", model, f"meta_upscale:{weights.sha256(Path(folder) / META_FILE)[:8]}")


def load_network(model: str) -> Network | None:
    if model == "meta":
        return load_models(weights.weights_dir())
    if model == "mdrn":
        loaded = load_mdrn_once(weights.weights_dir())
        return Network("mdrn", loaded.model, loaded.version)
    return None


def output_length(n: int, factor: float) -> int:
    """The module docstring's rounding: nearest integer, halves up."""
    return int(math.floor(n * factor + 0.5))


class ArbitraryPipeline:
    """One network for every factor in [1, 4]: images and volumes, in-plane and between slices."""

    name = "arbitrary"

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        check_keys(options, OPTION_KEYS)
        model = options.get("model", "meta")
        if model not in MODELS:
            raise ValueError(f"option 'model' must be one of {', '.join(MODELS)}, got {model!r}")
        scale, through, target = geometry(options, "scale", _factor, 2.0)
        return {"scale": scale, "through_scale": through, "target_spacing": target, "model": model}

    def not_ready(self, options: Mapping[str, Any] | None = None) -> str | None:
        """Why the network these options need cannot run here, else None; interpolation needs none."""
        model = (options or {}).get("model", "meta")
        return {"meta": lambda: weights.problem(load_models),
                "mdrn": lambda: weights.problem(load_mdrn_once)}.get(model, lambda: None)()

    def run(self, datasets: Sequence[Dataset], options: Mapping[str, Any], context: RunContext) -> Iterator[Dataset]:
        opts = self.validate_options(options)
        target = opts["target_spacing"] or [None, None, None]
        through_wanted = opts["through_scale"] != 1.0 or target[2] is not None
        loaded = load_series(datasets, min_slices=2 if through_wanted else 1)
        if through_wanted and opts["model"] == "mdrn":
            raise Refusal("model mdrn is two-dimensional: it does not resample between slices (use model: meta)")
        network = load_network(opts["model"])
        if isinstance(loaded, Volume):
            return self._run_volume(loaded, opts, network, context)
        if through_wanted:
            raise Refusal("a slice factor (through_scale or a slice target_spacing) needs a volume; this series "
                          "holds projection images")
        return self._run_images(loaded, opts, network, context)

    def _series(self, opts, network: Network | None, label: str, text: str, note: str | None = None,
                **geometry) -> DerivedSeries:
        name = {"meta": "Meta-Upscale", "mdrn": "MDRN"}[network.name] if network else f"{opts['model']} (interpolation)"
        how = (f"{name} (srnode arbitrary), residual on Lanczos; values outside the network's intensity window "
               "are Lanczos-interpolated" if network else f"{opts['model']} interpolation (srnode arbitrary)")
        head = f"{note} super-res {label}" if note else f"super-res {label}"  # the note is never cut
        room = DESCRIPTION_ROOM - len(name) - 1
        if len(head) > room:  # cut the factors (DerivationDescription has them all), not the method's name
            head = head[:room - 2].rsplit(" ", 1)[0].rstrip(" ,") + "..."  # at a word
        return DerivedSeries(
            description=f"{head} {name}",
            derivation_description=f"Super-resolution by {how}: {text}; field of view kept",
            model_name=f"arbitrary {name}" if network else f"arbitrary ({opts['model']})",
            model_version=network.version if network else None,
            series_number_offset=SERIES_NUMBER_OFFSET,
            **geometry,
        )

    def _run_images(self, images: list[Image2D], opts, network: Network | None,
                    context: RunContext) -> Iterator[Dataset]:
        images = sorted(images, key=lambda im: (int(im.dataset.get("InstanceNumber") or 0), im.dataset.SOPInstanceUID))
        plans = [_inplane_plan(im.pixels.shape, im.pixel_spacing, opts) for im in images]
        if all(plan == im.pixels.shape for im, plan in zip(images, plans, strict=True)):
            raise Refusal("the options leave the image unchanged")
        windows = [None] * len(images)
        if network is not None:  # refused here, before any output is taken
            windows = [tuple(float(v) for v in np.percentile(im.pixels, intensity.MR_PERCENTILES)) for im in images]
            if any(high <= low for low, high in windows):
                raise Refusal("the image is blank (no contrast between its 0.5 and 99.5 percentiles)")
        h, w = images[0].pixels.shape
        series = self._series(opts, network, _inplane_label(h, w, plans[0]), _text(h, w, plans[0]))

        def slices() -> Iterator[DerivedSlice]:
            for i, (image, (rows, cols)) in enumerate(zip(images, plans, strict=True)):
                pixels = image.pixels
                if network is None:
                    out = resize(pixels, (rows, cols), opts["model"])
                else:
                    out = network.inplane(pixels[None], rows, cols, windows[i], image.monochrome1)[0]
                yield DerivedSlice(pixels=out, template=image.dataset, sources=[image.dataset], index=i)
                context.report(i + 1, len(images))

        return write_derived(slices(), series, context)

    def _run_volume(self, vol: Volume, opts, network: Network | None, context: RunContext) -> Iterator[Dataset]:
        n, h, w = vol.shape
        rows, cols = _inplane_plan((h, w), vol.pixel_spacing, opts)
        target = opts["target_spacing"] or [None, None, None]
        note = in_plane_only(vol, opts["through_scale"] != 1.0 or target[2] is not None, (rows, cols) != (h, w))
        if note:
            opts = without_slices(opts)
        n_out = _through_plan(vol, opts)
        if (rows, cols, n_out) == (h, w, n):
            raise Refusal("the options leave the volume unchanged")
        window = None
        if network is not None:
            modality = str(vol.datasets[0].get("Modality", ""))
            window = intensity.normaliser(vol.voxels, "CT" if modality == "CT" else "MR")
        new_spacing = (h * vol.pixel_spacing[0] / rows, w * vol.pixel_spacing[1] / cols)
        through = n_out != n
        text = _text(h, w, (rows, cols)) + (f", {n} -> {n_out} slices" if through else "")
        label = ", ".join(([_inplane_label(h, w, (rows, cols))] if (rows, cols) != (h, w) else [])
                          + ([f"slices x{n_out / n:.4g}"] if through else []))
        if note:
            text += f"; every slice kept where it is, as the series has {vol.irregular}"
        series = self._series(opts, network, label, text, note,
                              spacing_between_slices=n * vol.slice_spacing / n_out if through else None,
                              images_in_acquisition=n_out if through else None)
        stream = _inplane_stream(vol.voxels, rows, cols, opts["model"], network, window)
        coords = centres(n, n_out)
        if through and network is None:
            stream = resample_stream(stream, n, coords, interpolation_sampler(opts["model"]), INTERP_PAD, False)
        elif through:
            stream = resample_stream(stream, n, coords, _meta_through_sampler(network.module, n / n_out, window),
                                     halo(network.module.config), True)

        def slices() -> Iterator[DerivedSlice]:
            for j, pixels in enumerate(stream):
                k = float(coords[j]) if through else float(j)
                yield volume_slice(vol, pixels, k, j, n_out, new_spacing, through)
                context.report(j + 1, n_out)

        return write_derived(slices(), series, context)


def _inplane_stream(voxels: np.ndarray, rows: int, cols: int, model: str, network: Network | None,
                    window) -> Iterator[np.ndarray]:
    n, h, w = voxels.shape
    if (rows, cols) == (h, w):
        yield from voxels
        return
    chunk = max(1, BATCH_VOXELS // (rows * cols))
    for start in range(0, n, chunk):
        block = voxels[start:start + chunk]
        if network is None:
            yield from resize(block, (rows, cols), model)
        else:
            yield from network.inplane(block, rows, cols, window)


def _meta_through_sampler(model: MetaSR, inverse: float, window):
    def sample(block: np.ndarray, local: np.ndarray) -> np.ndarray:
        def one_axis(views: np.ndarray) -> np.ndarray:
            return meta_images(model, views, local, np.arange(views.shape[2], dtype=np.float64), (inverse, 1.0), window)

        return through_views(block, one_axis)

    return sample


def _factor(options: Mapping[str, Any], key: str) -> float | None:
    return number(options, key, 1.0, MAX_SCALE)


def _check(what: str, n: int, n_out: int) -> None:
    factor = f"{what}: {n} -> {n_out} is a factor {n_out / n:.4g}"
    if n_out < n:
        raise Refusal(f"{factor}; arbitrary does not downsample (use interp)")
    if n_out > n * MAX_SCALE + FACTOR_EPS:
        raise Refusal(f"{factor}, above arbitrary's largest, {MAX_SCALE:g} (ask for a coarser target, or use interp)")


def _inplane_plan(shape, spacing, opts) -> tuple[int, int]:
    h, w = int(shape[0]), int(shape[1])
    target = opts["target_spacing"]
    if target is not None and target[0] is not None:
        if spacing is None:
            raise Refusal("an in-plane target_spacing needs the pixel spacing, which this image does not give")
        rows, cols = output_length(h, spacing[0] / target[0]), output_length(w, spacing[1] / target[1])
    else:
        rows, cols = output_length(h, opts["scale"]), output_length(w, opts["scale"])
    _check("rows", h, rows)
    _check("columns", w, cols)
    if max(rows, cols) > MAX_MATRIX:
        raise Refusal(f"output matrix {rows}x{cols} is larger than {MAX_MATRIX}")
    return rows, cols


def _through_plan(vol: Volume, opts) -> int:
    n = vol.shape[0]
    target = opts["target_spacing"]
    if target is not None and target[2] is not None:
        n_out = output_length(n, vol.slice_spacing / target[2])
    else:
        n_out = output_length(n, opts["through_scale"])
    _check("slices", n, n_out)
    return n_out


def _inplane_label(h: int, w: int, out: tuple[int, int]) -> str:
    """``x1.5``, or ``rows x1.5 cols x3`` when the two factors differ by more than the rounding of
    the output lengths does."""
    rows, cols = out[0] / h, out[1] / w
    return f"x{rows:.4g}" if abs(rows - cols) <= 0.5 / h + 0.5 / w else f"rows x{rows:.4g} cols x{cols:.4g}"


def _text(h: int, w: int, out: tuple[int, int]) -> str:
    return f"{_inplane_label(h, w, out)} ({h}x{w} -> {out[0]}x{out[1]})" if out != (h, w) else "in-plane unchanged"


PIPELINE = ArbitraryPipeline()
