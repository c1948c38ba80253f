"""A QA picture and a consistency check for every derived series.

For each output series a pipeline writes (``node.jobs.run_pipeline`` calls :func:`assess` on the
files it has just written), two things are made, neither carrying patient data:

* **Consistency.** The output, degraded back to its input's grid with the project's evaluation
  degradation (antialiased cubic, :func:`pipelines.models.interpolation.resize`: what every model was
  trained to undo and is evaluated against), compared with the input: PSNR over the input's valid
  field (:mod:`pipelines.dicom.valid_field`; padding and the air outside a CT's reconstruction field
  are left out), peak = the input's value span in that field. An SR output that only adds detail
  the input allows degrades back to the input; hallucinated structure or noise does not. Compared:
  every output image (projection images, matched by their SourceImageSequence) or every output slice
  that sits where an input slice is (volumes: slices made between input slices have no input to be
  compared with and are left out; ``compared`` says how many were used).
* **Picture** (``qa.png``): a crop at full output resolution of the input upscaled by Lanczos-3 to
  the output grid, the output, and their difference (output - Lanczos, scaled, with its legend), side
  by side. The crop is where the difference's energy is highest (the slice too, for volumes), or the
  centre when the output does not differ from Lanczos.

The threshold under which a series is flagged comes from ``qa_thresholds.json`` in the weights folder,
written by ``srnode eval qa --update-cards`` (:mod:`pipelines.evaluation.eval_qa`) from held-out
data: per weights file (with its sha256: a retrained file has no threshold until measured again) and
per interpolation method. A series made by several weights files is held to the lowest of their
thresholds; with none known, ``passed`` is ``None`` (not flagged).
"""
from __future__ import annotations

import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset
from scipy import ndimage

from pipelines.dicom import valid_field
from pipelines.dicom.series import Image2D, Volume, load_series
from pipelines.models.interpolation import METHODS, resize

THRESHOLDS_FILE = "qa_thresholds.json"
FLAG = "QA low"  # added to the SeriesDescription of a series below its threshold
DEGRADATION = "antialiased cubic, the degradation srnode eval uses"
CROP = 256  # output pixels per side of each panel
LEGEND_H = 34
SPATIAL_RESAMPLING = "113085"


@dataclass(frozen=True, eq=False)
class Pair:
    """One output image and the input image it was made from (modality values)."""

    input: np.ndarray
    output: np.ndarray
    outside: np.ndarray | None  # input grid: True outside the valid field
    monochrome1: bool


@dataclass(frozen=True, eq=False)
class SeriesQA:
    """What :func:`assess` found for one output series: ``record`` (for qa.json) and ``png`` bytes."""

    series_uid: str
    record: dict[str, Any]
    png: bytes

    @property
    def passed(self) -> bool | None:
        return self.record["passed"]


def is_derived_image(ds: Dataset) -> bool:
    """An image the derived writer made (SEG and SR documents are not compared)."""
    return any(str(item.get("CodeValue", "")) == SPATIAL_RESAMPLING for item in ds.get("DerivationCodeSequence", []))


def pairs(inputs: Volume | list[Image2D], outputs: Volume | list[Image2D]) -> list[Pair]:
    """Output images matched with the input images they come from (see the module docstring)."""
    if isinstance(inputs, Volume) and isinstance(outputs, Volume):
        along_in = np.array([np.asarray(ds.ImagePositionPatient, float) @ inputs.normal for ds in inputs.datasets])
        tol = 0.05 * (inputs.slice_spacing or 1.0)
        found = []
        for j, ds in enumerate(outputs.datasets):
            along = np.asarray(ds.ImagePositionPatient, float) @ inputs.normal
            k = int(np.argmin(np.abs(along_in - along)))
            if abs(along_in[k] - along) <= tol:
                found.append(Pair(inputs.voxels[k], outputs.voxels[j], valid_field.outside(inputs.datasets[k]), False))
        return found
    if isinstance(inputs, list) and isinstance(outputs, list):
        by_uid = {str(im.dataset.SOPInstanceUID): im for im in inputs}
        found = []
        for out in outputs:
            refs = [str(r.get("ReferencedSOPInstanceUID", "")) for r in out.dataset.get("SourceImageSequence", [])]
            source = next((by_uid[r] for r in refs if r in by_uid), None)
            if source is not None:
                found.append(Pair(source.pixels, out.pixels, valid_field.outside(source.dataset), source.monochrome1))
        return found
    return []


def consistency(found: Sequence[Pair]) -> dict[str, Any]:
    """PSNR (dB) of the outputs degraded back to the input grid against the inputs, in the valid field;
    also the worst single image's PSNR, and its index in ``found`` (the picture's image)."""
    errors, counts, lows, highs, per = 0.0, 0, [], [], []
    for pair in found:
        back = resize(pair.output.astype(np.float32), pair.input.shape, "cubic")
        inside = np.ones(pair.input.shape, bool) if pair.outside is None else ~pair.outside
        if not inside.any():
            per.append(None)
            continue
        diff = (back - pair.input)[inside].astype(np.float64)
        errors += float(np.sum(diff ** 2))
        counts += diff.size
        per.append(float(np.mean(diff ** 2)))
        lows.append(float(pair.input[inside].min()))
        highs.append(float(pair.input[inside].max()))
    if not counts:
        return {"psnr_db": None, "compared": 0, "worst": None}
    peak = max(highs) - min(lows)
    mse = errors / counts

    def db(value: float) -> float:
        return round(10 * np.log10(peak ** 2 / max(value, 1e-12)), 2) if peak > 0 else float("inf")

    worst = int(np.argmax([-1 if v is None else v for v in per]))
    return {"psnr_db": db(mse), "worst_image_psnr_db": db(per[worst]), "peak": peak, "compared": len(per),
            "degradation": DEGRADATION, "worst": worst}


def load_thresholds(folder: Path) -> dict[str, Any]:
    path = Path(folder) / THRESHOLDS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def threshold_for(table: dict[str, Any], weights: Sequence[dict[str, str]], model_name: str) -> tuple[float | None, str]:
    """(threshold dB, where it comes from) for a series made by ``weights`` (file, sha256: the
    shipped weights it names) or, with none, by the interpolation named in ``model_name``."""
    if weights:
        values = []
        for w in weights:
            entry = table.get("models", {}).get(w["file"])
            if entry is None or entry.get("sha256") != w["sha256"]:
                return None, f"no threshold measured for {w['file']} sha256 {w['sha256'][:12]} (run srnode eval qa)"
            values.append((entry["threshold_db"], w["file"]))
        value, name = min(values)
        return value, f"{name} on held-out data ({table.get('command', 'srnode eval qa')})"
    method = re.search(r"\((\w+)\)\s*$", model_name or "")
    entry = table.get("interpolation", {}).get(method.group(1) if method else "")
    if method and method.group(1) in METHODS and entry:
        return entry["threshold_db"], f"{method.group(1)} interpolation on held-out data"
    return None, f"no threshold for {model_name or 'this model'!r}"


def assess(input_datasets: Sequence[Dataset], output_datasets: Sequence[Dataset], thresholds: dict[str, Any],
           weights: Sequence[dict[str, str]], extra: dict[str, Any]) -> SeriesQA | None:
    """QA of one output series (``output_datasets``, all of one series) made from ``input_datasets``;
    None when the outputs are not derived images or none can be compared with an input."""
    images = [ds for ds in output_datasets if is_derived_image(ds)]
    if not images:
        return None
    inputs, outputs = load_series(input_datasets), load_series(images)
    found = pairs(inputs, outputs)
    if not found:
        return None
    check = consistency(found)
    worst = check.pop("worst")
    equipment = (images[0].get("ContributingEquipmentSequence") or [Dataset()])[-1]
    model_name = str(equipment.get("ManufacturerModelName", ""))
    threshold, source = threshold_for(thresholds, weights, model_name)
    psnr = check["psnr_db"]
    ranges = _ranges(found)
    png, where = picture(found[worst if worst is not None else 0])
    record = {
        **extra,
        "model": model_name,
        "weights": [{"file": w["file"], "model": w.get("model", ""), "sha256": w["sha256"]} for w in weights],
        "consistency": check,
        **ranges,
        "threshold_db": threshold,
        "threshold_source": source,
        "passed": None if threshold is None or psnr is None else bool(psnr >= threshold),
        "picture": {**where, "image": worst, "panels": ["input, Lanczos-3 upscaled", "output", "output - Lanczos"]},
    }
    return SeriesQA(str(images[0].SeriesInstanceUID), record, png)


def _ranges(found: Sequence[Pair]) -> dict[str, list[float]]:
    def span(arrays):
        return [round(float(min(a.min() for a in arrays)), 3), round(float(max(a.max() for a in arrays)), 3)]

    return {"input_range": span([p.input for p in found]), "output_range": span([p.output for p in found])}


# -- the picture ----------------------------------------------------------------------------
def picture(pair: Pair, size: int = CROP) -> tuple[bytes, dict[str, Any]]:
    """PNG bytes of the three panels and where the crop is (output pixels: row, column, height, width)."""
    from PIL import Image, ImageDraw

    out = pair.output.astype(np.float32)
    up = resize(pair.input.astype(np.float32), out.shape, "lanczos")
    diff = out - up
    if pair.outside is not None:  # the guard writes the input's own value there: not the output's doing
        diff[valid_field.outside_on(pair.outside, out.shape)] = 0
    h, w = min(size, out.shape[0]), min(size, out.shape[1])
    energy = ndimage.uniform_filter(diff.astype(np.float64) ** 2, size=(h, w), mode="constant")
    rows, cols = out.shape
    r_lo, r_hi, c_lo, c_hi = h // 2, rows - (h - h // 2), w // 2, cols - (w - w // 2)
    inner = energy[r_lo:r_hi + 1, c_lo:c_hi + 1]
    if inner.size and inner.max() > 2 * inner.mean():  # else flat (rounding only): the centre says as much
        r, c = np.unravel_index(int(np.argmax(inner)), inner.shape)
        top, left, chosen = int(r), int(c), "highest difference energy"
    else:
        top, left, chosen = (rows - h) // 2, (cols - w) // 2, "centre"
    crop = (slice(top, top + h), slice(left, left + w))
    inside = pair.input if pair.outside is None else pair.input[~pair.outside]
    lo, hi = np.percentile(inside if inside.size else pair.input, (0.5, 99.5))
    hi = hi if hi > lo else lo + 1

    def grey(a: np.ndarray) -> np.ndarray:
        g = np.clip((a - lo) / (hi - lo), 0, 1)
        return ((1 - g) if pair.monochrome1 else g) * 255

    d = diff[crop]
    scale = float(np.percentile(np.abs(d), 99.5)) or float(np.abs(d).max()) or 1.0
    panels = [grey(up[crop]), grey(out[crop]), np.clip(128 + 127 * d / scale, 0, 255)]
    strip = np.concatenate([np.pad(p, ((0, 0), (0, 4)), constant_values=255) for p in panels], axis=1)[:, :-4]
    canvas = Image.new("L", (strip.shape[1], h + LEGEND_H), 255)
    canvas.paste(Image.fromarray(strip.astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(("input (Lanczos-3)", "output")):
        draw.text((i * (w + 4) + 4, h + 4), name, fill=0)
    x0 = 2 * (w + 4)
    bar = np.tile(np.linspace(1, 255, max(w - 8, 2)), (8, 1)).astype(np.uint8)
    canvas.paste(Image.fromarray(bar), (x0 + 4, h + 4))
    draw.text((x0 + 4, h + 14), f"difference {-scale:.4g} .. {scale:.4g}", fill=0)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return buf.getvalue(), {"crop": [top, left, h, w], "crop_chosen_at": chosen,
                            "difference_scale": round(scale, 4), "display_window": [round(float(lo), 3), round(float(hi), 3)]}
