"""The ``sr3d`` pipeline: CT/MR volumes super-resolved in-plane, then through-plane (Georgescu et al. 2020).

Options
-------
inplane_scale : 1, 2 or 4 (default 2 when no geometry option is given)
through_scale : 1, 2 or 4 (default 1)
target_spacing : number | [row, col] | [row, col, slice] (mm; ``null`` keeps an axis)
    Each factor (source spacing / target) must be 1, 2 or 4 within ``FACTOR_RTOL``; the output
    spacing is then exactly the source spacing divided by that factor.
self_ensemble : bool (default false)
    The median of 8 flips/rotations in-plane (4 flips through-plane): 8x (4x) the CNN time.
model : "cnn" (default), "mdrn" or an interpolation method (nearest, linear, cubic, lanczos)
    ``mdrn``: the deeper MDRN does the in-plane stage (x2 or x4), the through-plane CNN the slices.
    The interpolation methods run the same geometry as the CNN, as baselines.

Geometry
--------
Both stages keep the field of view: an axis of N samples at spacing s becomes ``N*r`` samples at
``s/r``, aligned on the outer pixel/slab edges, so output sample i sits at source coordinate
``(i + 0.5)/r - 0.5`` (the convention of the training degradation and of :mod:`pipelines.models.interpolation`).
In-plane the first pixel centre moves by half the spacing change; through-plane the first slice
lies ``s/2 - s/(2r)`` before the first source slice, along the normal. ImagePositionPatient,
PixelSpacing, SpacingBetweenSlices (new spacing), InstanceNumber (the source's sense along the
normal) and ImagesInAcquisition are written per slice; SliceThickness keeps the source's value:
the networks learned to undo a cubic downscaling, not the scanner's slice profile, and a thinner
value would claim resolution that is not shown to be there.

Memory: the source volume is decoded once (float32); in-plane slices are made one at a time, and
the through-plane stage works in slabs (:mod:`pipelines.models.volume_stream`), so output slices are
streamed to disk and memory does not grow with the output size.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom import Dataset

from pipelines import weights
from pipelines.base import Refusal, RunContext
from pipelines.dicom.derived import DerivedSeries, DerivedSlice, volume_slice, write_derived
from pipelines.dicom.series import Volume, in_plane_only, load_series
from pipelines.models import intensity
from pipelines.models.interpolation import METHODS
from pipelines.models.mdrn import load_mdrn_once
from pipelines.models.sr3d_cnn import INPLANE_FILES, SRCNN, THROUGH_FILE, CNNConfig
from pipelines.options import check_keys, geometry, without_slices
from pipelines.models.volume_stream import (
    Upsampler,
    cnn_upsampler,
    mdrn_images,
    inplane_stream,
    through_stream,
)

logger = logging.getLogger(__name__)

FACTORS = (1, 2, 4)
FACTOR_RTOL = 0.02
MODELS = ("cnn", "mdrn", *METHODS)
OPTION_KEYS = ("inplane_scale", "through_scale", "target_spacing", "self_ensemble", "model")
SERIES_NUMBER_OFFSET = 1400
MAX_MATRIX = 4096
CNN_MODALITIES = ("CT", "MR")


@dataclass(frozen=True)
class SR3DModels:
    inplane: dict[int, SRCNN]
    through: SRCNN
    versions: dict[str, str]


def load_cnn(path: Path) -> SRCNN:
    state, config = weights.load(path, "sr3d-cnn")
    model = SRCNN(CNNConfig(scale=config["scale"], axes=config["axes"], width=config["width"]))
    return weights.restore(model, state, path).eval()


@lru_cache(maxsize=2)
def load_models(folder: Path) -> SR3DModels:
    """The in-plane x2/x4 and through-plane x2 models, checked against their cards, loaded once per
    worker process, on the GPU when there is one."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    inplane = {scale: load_cnn(Path(folder) / name).to(dev) for scale, name in INPLANE_FILES.items()}
    through = load_cnn(Path(folder) / THROUGH_FILE).to(dev)
    for scale, model in inplane.items():
        if (model.config.axes, model.config.scale) != (2, scale):
            raise weights.WeightsError(f"{INPLANE_FILES[scale]} is not an in-plane x{scale} model")
    if (through.config.axes, through.config.scale) != (1, 2):
        raise weights.WeightsError(f"{THROUGH_FILE} is not a through-plane x2 model")
    versions = {name: f"{Path(name).stem.removeprefix('sr3d_')}:{weights.sha256(Path(folder) / name)[:8]}"
                for name in (*INPLANE_FILES.values(), THROUGH_FILE)}  # short: SoftwareVersions is LO (64)
    return SR3DModels(inplane, through, versions)


class SR3DPipeline:
    """Two-stage CNN super-resolution of a volume, written as a new series with exact geometry."""

    name = "sr3d"

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        check_keys(options, OPTION_KEYS)
        model = options.get("model", "cnn")
        if model not in MODELS:
            raise ValueError(f"option 'model' must be one of {', '.join(MODELS)}, got {model!r}")
        ensemble = options.get("self_ensemble", False)
        if not isinstance(ensemble, bool):
            raise ValueError(f"option 'self_ensemble' must be true or false, got {ensemble!r}")
        if ensemble and model != "cnn":
            raise ValueError("option 'self_ensemble' applies to model 'cnn' only")
        inplane, through, target = geometry(options, "inplane_scale", _factor, 2)
        return {"inplane_scale": inplane, "through_scale": through, "target_spacing": target,
                "self_ensemble": ensemble, "model": model}

    def not_ready(self, options: Mapping[str, Any] | None = None) -> str | None:
        """Why the networks these options need cannot run here (weights missing or not matching their
        cards), else None; interpolation needs none."""
        model = (options or {}).get("model", "cnn")
        if model in METHODS:
            return None
        opts = self.validate_options(options or {})
        target = opts["target_spacing"] or [None, None, None]
        mdrn_runs = model == "mdrn" and (opts["inplane_scale"] != 1 or target[0] is not None)
        return weights.problem(load_models) or (weights.problem(load_mdrn_once) if mdrn_runs else None)

    def run(self, datasets: Sequence[Dataset], options: Mapping[str, Any], context: RunContext) -> Iterator[Dataset]:
        opts = self.validate_options(options)
        target = opts["target_spacing"] or [None, None, None]
        through_wanted = opts["through_scale"] != 1 or target[2] is not None
        loaded = load_series(datasets, min_slices=2 if through_wanted else 1)
        if not isinstance(loaded, Volume):
            raise Refusal("sr3d takes volumes (CT/MR slices with plane geometry); this series holds projection "
                          "images: route it to cxr or interp")
        return self._run_volume(loaded, opts, context)

    def _run_volume(self, vol: Volume, opts: dict[str, Any], context: RunContext) -> Iterator[Dataset]:
        n, rows, cols = vol.shape
        target = opts["target_spacing"] or [None, None, None]
        through_wanted = opts["through_scale"] != 1 or target[2] is not None
        r_in, _ = _resolve_factors(vol, without_slices(opts))
        note = in_plane_only(vol, through_wanted, r_in != 1)
        if note:
            opts = without_slices(opts)
        r_in, r_t = _resolve_factors(vol, opts)
        if r_in == 1 and r_t == 1:
            raise Refusal("the target spacing equals the source spacing: nothing to do")
        if max(rows, cols) * r_in > MAX_MATRIX:
            raise Refusal(f"output matrix {rows * r_in}x{cols * r_in} is larger than {MAX_MATRIX}")
        method, version = opts["model"], None
        if method == "mdrn" and r_in == 1:
            method = "cnn"  # MDRN is in-plane only: this is the CNN's through-plane stage alone, and says so
        up_in: Upsampler | None = None
        up_t: Upsampler | None = None
        if method in ("cnn", "mdrn"):
            modality = str(vol.datasets[0].get("Modality", ""))
            if modality not in CNN_MODALITIES:
                raise Refusal(f"the sr3d CNNs are trained on CT and MR; this series is {modality or 'of no modality'} "
                              f"(use model: lanczos, or the interp pipeline)")
            models = load_models(weights.weights_dir())
            window = intensity.normaliser(vol.voxels, modality)
            versions = []
            if r_in > 1 and method == "mdrn":
                mdrn = load_mdrn_once(weights.weights_dir())
                up_in = lambda images: mdrn_images(mdrn.model, images, r_in, window)  # noqa: E731
                versions.append(mdrn.version)
            elif r_in > 1:
                up_in = cnn_upsampler(models.inplane[r_in], window, opts["self_ensemble"])
                versions.append(models.versions[INPLANE_FILES[r_in]])
            if r_t > 1:
                up_t = cnn_upsampler(models.through, window, opts["self_ensemble"])
                versions.append(models.versions[THROUGH_FILE])
            version = " ".join(versions)
        new_spacing = (vol.pixel_spacing[0] / r_in, vol.pixel_spacing[1] / r_in)
        out_spacing = vol.slice_spacing / r_t if r_t > 1 else None
        n_out = n * r_t
        series = DerivedSeries(
            description=(f"{note} " if note else "") + _label(r_in, r_t, method, opts["self_ensemble"]),
            derivation_description=_derivation_text(vol, r_in, r_t, method, opts["self_ensemble"])
            + (f"; every slice kept where it is, as the series has {vol.irregular}" if note else ""),
            model_name={"cnn": "sr3d two-stage CNN", "mdrn": "sr3d MDRN + through-plane CNN"}.get(method, f"sr3d ({method})"),
            model_version=version,
            series_number_offset=SERIES_NUMBER_OFFSET,
            spacing_between_slices=out_spacing,
            images_in_acquisition=n_out if r_t > 1 else None,
        )
        stream: Iterator[np.ndarray] = (inplane_stream(vol.voxels, r_in, up_in, method) if r_in > 1
                                        else iter(vol.voxels))
        if r_t > 1 and up_t is None:
            stream = through_stream(stream, n, None, method, scale=r_t)
        elif r_t > 1:
            for step in range(int(math.log2(r_t))):
                stream = through_stream(stream, n * 2 ** step, up_t, scale=2)

        def slices() -> Iterator[DerivedSlice]:
            for j, pixels in enumerate(stream):
                k = (j + 0.5) / r_t - 0.5
                yield volume_slice(vol, pixels, k, j, n_out, new_spacing, through=r_t > 1)
                context.report(j + 1, n_out)

        return write_derived(slices(), series, context)


def _factor(options: Mapping[str, Any], key: str) -> int | None:
    value = options.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real) or value not in FACTORS:
        raise ValueError(f"option {key!r} must be one of {', '.join(map(str, FACTORS))}, got {value!r}")
    return int(value)


def _resolve_factors(vol: Volume, opts: Mapping[str, Any]) -> tuple[int, int]:
    """(in-plane, through-plane) integer factors, from the scales or the target spacing."""
    target = opts["target_spacing"] or [None, None, None]
    r_in, r_t = opts["inplane_scale"], opts["through_scale"]
    if target[0] is not None:
        r_in = _power_of_two("row spacing", vol.pixel_spacing[0], target[0])
        if _power_of_two("column spacing", vol.pixel_spacing[1], target[1]) != r_in:
            raise Refusal(f"target_spacing {target[0]:g} x {target[1]:g} mm gives different row and column factors "
                          f"for pixel spacing {vol.pixel_spacing[0]:g} x {vol.pixel_spacing[1]:g} mm")
    if target[2] is not None:
        r_t = _power_of_two("slice spacing", vol.slice_spacing, target[2])
    return r_in, r_t


def _power_of_two(what: str, source: float, target: float) -> int:
    factor = source / target
    for r in FACTORS:
        if abs(factor - r) <= FACTOR_RTOL * r:
            return r
    raise Refusal(f"target {what} {target:g} mm from {source:g} mm is a factor {factor:.3g}; sr3d does 1, 2 or 4 "
                  f"(within {FACTOR_RTOL:.0%}); use the interp pipeline for other factors")


def _label(r_in: int, r_t: int, method: str, ensemble: bool) -> str:
    parts = ([f"x{r_in}"] if r_in > 1 else []) + ([f"slices x{r_t}"] if r_t > 1 else [])
    what = ("CNN" + (" ensemble" if ensemble else "") if method == "cnn" else "MDRN" if method == "mdrn"
            else f"{method} (interpolation)")
    return f"super-res {', '.join(parts)} {what}"


def _derivation_text(vol: Volume, r_in: int, r_t: int, method: str, ensemble: bool) -> str:
    n, rows, cols = vol.shape
    how = ("two-stage CNN (Georgescu et al. 2020; srnode sr3d), residual on Lanczos; values outside the "
           "CNN's intensity window are Lanczos-interpolated" if method == "cnn"
           else "MDRN in-plane and the two-stage CNN's through-plane network (srnode sr3d), residual on Lanczos"
           if method == "mdrn"
           else f"{method} interpolation (srnode sr3d)")
    text = f"Super-resolution by {how}"
    if r_in > 1:
        text += f"; in-plane x{r_in}: matrix {rows}x{cols} -> {rows * r_in}x{cols * r_in}"
    if r_t > 1:
        text += f"; through-plane x{r_t}: {n} -> {n * r_t} slices" + (", two views averaged" if method in ("cnn", "mdrn") else "")
    if ensemble:
        text += "; self-ensemble (median of flips/rotations)"
    return text + "; field of view kept"


PIPELINE = SR3DPipeline()
