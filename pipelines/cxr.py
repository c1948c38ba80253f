"""The ``cxr`` pipeline: super-resolution of chest radiographs by the project's best network at each
factor (MDRN at x2-x4, the Hydra trunk at x8), lung segmentation and a lung-nodule finding by the
Hydra heads.

For each projection image of the series (CR, DX or SC):
  1. modality values -> model input: linear, the 0.5-99.5 percentiles to [0, 1] without clipping,
     MONOCHROME1 inverted so that dense is bright as in the training images. The mapping is
     undone exactly on the SR output, so its pixels stay in the source's stored representation
     and every window the reader sets still works (a VOI window would clip what it leaves out).
  2. cubic upsampling by ``scale``, then the trunk, in tiles of ``TILE`` px with a ``HALO`` px
     margin: the trunk's receptive field is 21 px, so tiles join without seams and the result
     equals one whole-image forward. Each tile's 6th-conv features are averaged onto the heads'
     analysis grid as it goes, so the full-resolution feature map is never held in memory.
     The heads learnt from features of 512-px films upsampled x2 (a 1024-px trunk input). They
     get the trunk's features of the film resampled to that size (:func:`heads_input`): on a
     512-px film at ``scale: 2`` that is the SR forward itself, otherwise one more, small forward.
     Fed a 1955-px CR at its own resolution the lung head outlined the abdomen and merged the
     lungs; resampled, it finds both lungs (checked by eye on the two real PA chests of
     ``shared/data/cxr_dicom``, which have no reference masks). A film much smaller than 512 px
     is blurred by that resampling beyond what the heads learnt from: below ``HEADS_MIN_FILM``
     px (long side) they are skipped (see :func:`heads_skipped`).
  3. the heads run only where they can be right: a frontal (PA/AP) chest film of an adult human
     (ViewPosition, BodyPartExamined, PatientAge, PatientSpecies when present), and a lung mask
     like the training films' (two pieces whose centres and areas lie within the bounds stored
     with the lung head, ``hydra.implausible_lungs``). Otherwise no SEG and no finding, one log
     line saying why; the SR series is still written.
  4. outputs: the super-resolved derived series (same SOP class, spacing updated), a BINARY DICOM
     SEG of the lungs on the source matrix (the grid probabilities resampled back and edge-aligned
     with the film by a guided filter, ``hydra.lung_probability``; two largest pieces, holes
     filled, nothing outside the thorax: ``hydra.within_thorax``), and a TID 1500 SR with the lung-nodule probability, the operating threshold with the
     sensitivity and specificity measured at it on the held-out films, and whether the model
     flagged a nodule (``dicom.cxr_outputs.nodule_report``): never "normal", the head looks for
     nodules only.

Options
-------
scale : 2, 3, 4 or 8 (default 2)
heads : list of "lungs", "abnormality" (default both; [] for SR only)
write_sr : bool (default true): write the super-resolved series
model : "mdrn", "meta" or "hydra": the network of the super-resolved series; by default the best
    at the scale on the held-out films (``BEST_MODEL``: mdrn at 2-4, hydra at 8). ``mdrn`` (the
    deep model, sharpest) and ``meta`` (Meta-Upscale) do scales 2, 3 and 4, on the source image
    directly (no interpolation first), with the intensity mapping of step 1; the heads still need
    the Hydra trunk, which then runs once at their scale for them.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom import Dataset

from pipelines import arbitrary, weights
from pipelines.base import Refusal, RunContext
from pipelines.dicom.derived import DerivedSeries, DerivedSlice, derived_series_number, series_description, write_derived
from pipelines.dicom.series import Image2D, load_series
from pipelines.models import hydra
from pipelines.models.interpolation import resize
from pipelines.models.mdrn import SCALES as MDRN_SCALES
from pipelines.options import check_keys

logger = logging.getLogger(__name__)

SCALES = (2, 3, 4, 8)
HEADS = ("lungs", "abnormality")
MODELS = ("hydra", "mdrn", "meta")
# The network of the SR series by default: the best the project has at each factor on the held-out
# CXR films (weights/eval/cxr_eval.md: MDRN at x2, x3 and x4; only the Hydra trunk does x8).
BEST_MODEL = {2: "mdrn", 3: "mdrn", 4: "mdrn", 8: "hydra"}
OPTION_KEYS = ("scale", "heads", "write_sr", "model")
TILE = 512
HALO = 16  # > the trunk's receptive-field radius (10 px)
MAX_OUTPUT_PIXELS = 2**27  # as the interp pipeline: ~0.5 GB float32 per output image
FRONTAL_VIEWS = {"PA", "AP"}
CHEST_PARTS = {"CHEST", "THORAX", "LUNG"}
ADULT_YEARS = 18
HUMAN_SPECIES = ("337915000", "homo sapiens", "human")
# Long side below which the heads are skipped. Mean lung IoU of 10 test films downscaled from 512 px
# before the pipeline's head path: 0.916 at 512, 0.877 at 448, 0.823 at 384, 0.698 at 352, 0.384 at 320.
HEADS_MIN_FILM = 448
SERIES_OFFSETS = {"sr": 1100, "lungs": 1200, "abnormality": 1300}


@lru_cache(maxsize=2)
def load_models(folder: Path) -> hydra.HydraModels:
    """Loaded once per worker process (weights are checked against their cards on first use), on
    the GPU when there is one."""
    return hydra.load_models(folder).to("cuda" if torch.cuda.is_available() else "cpu")


def to_model_input(pixels: np.ndarray, ds: Dataset) -> tuple[np.ndarray, tuple[float, float, bool]]:
    """(input in about [0, 1], the mapping to undo it)."""
    lo, hi = (float(v) for v in np.percentile(pixels, [0.5, 99.5]))
    if hi <= lo:
        raise Refusal("the image is blank (no contrast between its 0.5 and 99.5 percentiles)")
    mono1 = ds.PhotometricInterpretation == "MONOCHROME1"
    x = (pixels.astype(np.float32) - lo) / (hi - lo)
    return (1.0 - x if mono1 else x), (lo, hi, mono1)


def from_model_output(x: np.ndarray, mapping: tuple[float, float, bool]) -> np.ndarray:
    lo, hi, mono1 = mapping
    return ((1.0 - x) if mono1 else x) * (hi - lo) + lo


def heads_shape(h: int, w: int, head_scale: int) -> tuple[int, int]:
    """The trunk input the heads learnt from: the film with its long side at ``hydra.HEAD_FILM`` px,
    upsampled by ``head_scale``."""
    f = hydra.HEAD_FILM * head_scale / max(h, w)
    return max(1, round(h * f)), max(1, round(w * f))


def heads_input(x: np.ndarray, head_scale: int) -> np.ndarray:
    """The model input ``x`` resampled (antialiased cubic) to :func:`heads_shape`; on a 512-px film
    that is the x2 cubic upsampling the heads were trained on, exactly."""
    return resize(x, heads_shape(*x.shape, head_scale), "cubic")


@torch.no_grad()
def trunk_tiled(trunk: hydra.HydraTrunk, up: np.ndarray, grid: int,
                progress=None) -> tuple[np.ndarray, torch.Tensor]:
    """(SR image, features pooled onto the analysis grid (1, C, gh, gw)) for an interpolated input."""
    dev = next(trunk.parameters()).device
    h, w = up.shape
    gh, gw = hydra.analysis_grid(h, w, grid)
    rows, cols = hydra.pool_matrix(h, gh, dev), hydra.pool_matrix(w, gw, dev)
    pooled = torch.zeros(trunk.feature_channels, gh, gw, device=dev)
    sr = np.empty((h, w), np.float32)
    tiles = [(y, x) for y in range(0, h, TILE) for x in range(0, w, TILE)]
    for i, (y0, x0) in enumerate(tiles):
        y1, x1 = min(y0 + TILE, h), min(x0 + TILE, w)
        ys, xs = max(0, y0 - HALO), max(0, x0 - HALO)
        ye, xe = min(h, y1 + HALO), min(w, x1 + HALO)
        out, feats = trunk(torch.from_numpy(np.ascontiguousarray(up[ys:ye, xs:xe]))[None, None].to(dev))
        core = (slice(y0 - ys, y1 - ys), slice(x0 - xs, x1 - xs))
        sr[y0:y1, x0:x1] = out[0, 0][core].cpu().numpy()
        pooled += torch.einsum("gh,chw,kw->cgk", rows[:, y0:y1], feats[0][:, core[0], core[1]], cols[:, x0:x1])
        if progress:
            progress(i + 1, len(tiles))
    return sr, pooled[None]


class CxrPipeline:
    name = "cxr"

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        check_keys(options, OPTION_KEYS)
        scale = options.get("scale", 2)
        if isinstance(scale, bool) or scale not in SCALES:
            raise ValueError(f"option 'scale' must be one of {', '.join(map(str, SCALES))}, got {scale!r}")
        heads = options.get("heads", list(HEADS))
        if isinstance(heads, str):
            heads = [heads]
        if not isinstance(heads, (list, tuple)) or any(h not in HEADS for h in heads):
            raise ValueError(f"option 'heads' must be a list of {', '.join(HEADS)}, got {heads!r}")
        write_sr = options.get("write_sr", True)
        if not isinstance(write_sr, bool):
            raise ValueError(f"option 'write_sr' must be true or false, got {write_sr!r}")
        if not write_sr and not heads:
            raise ValueError("options ask for no output: write_sr is false and heads is empty")
        model = options.get("model", BEST_MODEL.get(scale, "hydra"))
        if model not in MODELS:
            raise ValueError(f"option 'model' must be one of {', '.join(MODELS)}, got {model!r}")
        if model != "hydra" and scale not in MDRN_SCALES:
            raise ValueError(f"model {model} does scales {', '.join(map(str, MDRN_SCALES))}; x{scale} needs model hydra")
        return {"scale": int(scale), "heads": [h for h in HEADS if h in heads], "write_sr": write_sr, "model": model}

    def not_ready(self, options: Mapping[str, Any] | None = None) -> str | None:
        """Why the networks these options need cannot run here (weights missing or not matching their
        cards), else None: the Hydra models for the trunk's SR or any head, MDRN or Meta-Upscale for theirs."""
        opts = self.validate_options(options or {})
        hydra_needed = opts["model"] == "hydra" or opts["heads"]
        sr_network = opts["model"] != "hydra" and opts["write_sr"]
        load = (lambda folder: hydra.require_measured(load_models(folder))) if opts["heads"] else load_models
        return ((weights.problem(load) if hydra_needed else None)
                or (arbitrary.PIPELINE.not_ready({"model": opts["model"]}) if sr_network else None))

    def run(self, datasets: Sequence[Dataset], options: Mapping[str, Any], context: RunContext) -> Iterator[Dataset]:
        opts = self.validate_options(options)
        loaded = load_series(datasets)
        if not isinstance(loaded, list):
            raise Refusal("the cxr pipeline takes projection radiographs (CR, DX, SC); this series is a volume")
        images = sorted(loaded, key=lambda im: (int(im.dataset.get("InstanceNumber") or 0), im.dataset.SOPInstanceUID))
        for image in images:
            h, w = image.pixels.shape
            if h * w * opts["scale"] ** 2 > MAX_OUTPUT_PIXELS:
                raise Refusal(f"a {h}x{w} image at x{opts['scale']} would be a {h * opts['scale']}x"
                              f"{w * opts['scale']} output, too large: choose a smaller scale")
        if opts["heads"] and not opts["write_sr"] and all(heads_skipped(image) for image in images):
            raise Refusal(f"nothing to write: write_sr is false and the heads skip {heads_skipped(images[0])}")
        hydra_needed = opts["model"] == "hydra" or opts["heads"]
        models = load_models(weights.weights_dir()) if hydra_needed else None
        if opts["heads"]:
            hydra.require_measured(models)
        network = arbitrary.load_network(opts["model"]) if opts["model"] != "hydra" and opts["write_sr"] else None
        return self._outputs(images, opts, context, models, network)

    def _outputs(self, images: list[Image2D], opts: dict, context: RunContext, models: hydra.HydraModels | None,
                 network: arbitrary.Network | None) -> Iterator[Dataset]:
        from pipelines.dicom import cxr_outputs

        scale = opts["scale"]
        results = []
        for i, image in enumerate(images):
            x, mapping = to_model_input(image.pixels, image.dataset)
            h, w = x.shape
            sr = pooled = None
            if network is not None:
                lo, hi, mono1 = mapping
                sr = network.inplane(image.pixels[None], h * scale, w * scale, (lo, hi), mono1)[0]
            elif opts["model"] == "hydra" and opts["write_sr"]:
                up = resize(x, (h * scale, w * scale), "cubic")
                sr, pooled = trunk_tiled(models.trunk, up, models.lungs.grid,
                                         lambda d, n, i=i: context.report(i * n + d, len(images) * n))
                sr = from_model_output(sr, mapping)
                if up.shape != heads_shape(h, w, models.head_scale):
                    pooled = None  # not the features the heads learnt from (see below)
            if opts["heads"] and pooled is None and heads_skipped(image) is None:
                # The heads only work on features at their training geometry (fed a x4 forward of the
                # test films, the x2-trained lung head falls from 0.93 to 0.18 IoU): one more forward.
                _, pooled = trunk_tiled(models.trunk, heads_input(x, models.head_scale), models.lungs.grid)
            results.append((image, sr, pooled))
            context.report(i + 1, len(images))
        if opts["write_sr"]:
            if network is None:
                name, how, version = "Hydra", "the Hydra trunk (srnode cxr) on the cubic upsampled image", \
                    models.versions[hydra.TRUNK_FILE]
            else:
                name = {"mdrn": "MDRN", "meta": "Meta-Upscale"}[network.name]
                how, version = f"{name} (srnode cxr), residual on Lanczos", network.version
            series = DerivedSeries(
                description=f"super-res x{scale} {name} (AI)",
                derivation_description=f"Super-resolution x{scale} by {how}; field of view kept",
                model_name="Hydra SR trunk" if network is None else f"{name} SR",
                model_version=version, key="sr", series_number_offset=SERIES_OFFSETS["sr"],
            )
            slices = (DerivedSlice(pixels=pixels, template=image.dataset, sources=[image.dataset], index=i)
                      for i, (image, pixels, _) in enumerate(results))
            yield from write_derived(slices, series, context)
        for i, (image, _, pooled) in enumerate(results):
            if not opts["heads"]:
                break
            if reason := heads_skipped(image):
                logger.warning("image %d: no lung SEG and no nodule finding: %s", i + 1, reason)
                continue
            film, _ = to_model_input(image.pixels, image.dataset)
            mask = hydra.lung_mask(models.lungs, pooled, image.pixels.shape, film, models.lung_bounds)
            if reason := hydra.implausible_lungs(mask, models.lung_bounds):
                logger.warning("image %d: no lung SEG and no nodule finding: %s", i + 1, reason)
                continue
            sub = context if len(results) == 1 else RunContext(f"{context.uid_seed}\x1fimage{i}", context.version,
                                                               context.software_version)
            source_number = image.dataset.get("SeriesNumber")
            if "lungs" in opts["heads"]:
                yield cxr_outputs.lung_segmentation(
                    image.dataset, mask, sub, models.versions[hydra.LUNGS_FILE],
                    _document_series_number(source_number, SERIES_OFFSETS["lungs"]),
                    series_description("Lungs Hydra (AI)", context.version))
            if "abnormality" in opts["heads"]:
                with torch.no_grad():
                    probability = float(hydra.abnormal_probability(models.abnormality(pooled.mean(dim=(2, 3))))[0])
                yield cxr_outputs.nodule_report(
                    image.dataset, probability, cxr_outputs.OperatingPoint(**models.operating_point), sub,
                    cxr_outputs.Algorithm("srnode Hydra lung nodule (JSRT)", context.software_version or "unknown",
                                          models.digests[hydra.ABNORMALITY_FILE]),
                    _document_series_number(source_number, SERIES_OFFSETS["abnormality"]),
                    series_description("Lung nodule Hydra (AI)", context.version))


def _document_series_number(source: object, offset: int) -> int:
    """:func:`derived_series_number`, kept positive as highdicom requires for SEG and SR."""
    number = derived_series_number(source, offset)
    return number if number > 0 else offset


def heads_skipped(image: Image2D) -> str | None:
    """Why the heads do not run on this image, from its header and size, else None. They learnt from
    frontal chest films of adults (JSRT) at 512 px: a view other than PA/AP, another body part, a
    child, an animal, or a film too small is refused (an absent attribute is not held against it).
    The lung mask is checked after (``hydra.implausible_lungs``)."""
    ds = image.dataset
    view = str(ds.get("ViewPosition", "") or "").upper()
    if view and view not in FRONTAL_VIEWS:
        return f"a {view} view (the heads learnt from frontal PA/AP films)"
    part = str(ds.get("BodyPartExamined", "") or "").upper()
    if part and part not in CHEST_PARTS:
        return f"body part {part} (the heads learnt from chest films)"
    species = [str(ds.get("PatientSpeciesDescription", "") or "").lower()]
    species += [str(c.get("CodeValue", "")) for c in ds.get("PatientSpeciesCodeSequence", [])]
    if any(value and value not in HUMAN_SPECIES for value in species):
        return "a patient who is not human (the heads learnt from human chest films)"
    age = age_in_years(ds.get("PatientAge"))
    if age is not None and age < ADULT_YEARS:
        return f"a patient aged {age:g} years (the heads learnt from adult chest films)"
    h, w = image.pixels.shape
    if max(h, w) < HEADS_MIN_FILM:
        return f"a {h}x{w} film (smaller than their {HEADS_MIN_FILM} px minimum, where their results fall apart)"
    return None


def age_in_years(value: object) -> float | None:
    """PatientAge (AS: ``nnnD``, ``nnnW``, ``nnnM``, ``nnnY``; a bare number read as years) in years,
    None when absent or unreadable."""
    text = str(value or "").strip().upper()
    per_year = {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}
    unit = text[-1:] if text[-1:] in per_year else "Y"
    digits = text[:-1] if text[-1:] in per_year else text
    return int(digits) / per_year[unit] if digits.isdigit() else None


PIPELINE = CxrPipeline()
