"""``srnode eval sr3d --through``: through-plane x2 on the held-out volumes, from thin-cut and from thick-slab input.

Only the depth axis is degraded and restored, so the table isolates the through-plane model. Each isotropic
``test`` volume of :mod:`pipelines.training.volume_data` (those of ``srnode eval sr3d``'s 3D rows: the 1.5 mm
chest CT and the 2 mm brain MR) is taken along its acquired slice axis (``all_axes``: each of its three axes in
turn, averaged; three times the cost), cropped to an even count of slices and made LR on the modality values
by each of :data:`DEGRADATIONS`:

* ``cubic``: antialiased cubic downscaling along the depth (the shipped training degradation, the LR of
  ``srnode eval sr3d``'s 3D rows);
* ``slab``: thick slices, each LR slice the mean of the 2 HR slices it covers (a box slice profile of twice
  the HR spacing, as a scanner's contiguous thick slices; :func:`volume_data.degrade` kind ``slab``).

It is brought back along the depth by bicubic and Lanczos interpolation and by each through-plane CNN
exactly as the pipeline runs it (:func:`pipelines.models.volume_stream.through_stream`: both views,
averaged). PSNR / SSIM as in :mod:`pipelines.evaluation.volume_eval` (the fixed window, the whole volume;
SSIM over the slices along the first axis of the view), averaged over the depth axes of a volume; modality
means over the volumes. With each through-plane model the table also gives ``srnode eval sr3d``'s 3D x2 rows
(every axis downscaled by antialiased cubic; the shipped in-plane x2 CNN, or MDRN, then that through-plane
model), so a candidate is checked on what the shipped pipeline measures. ``--through-weights`` adds candidate models (another ``sr3d_through_x2``
safetensors with its card) next to the shipped one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines import progress as display, weights
from pipelines.evaluation.volume_eval import metrics, sr3d_cnn
from pipelines.models import intensity
from pipelines.models.interpolation import resize
from pipelines.models.sr3d_cnn import THROUGH_FILE
from pipelines.models.volume_stream import cnn_upsampler, through_stream
from pipelines.models.mdrn import MDRN_FILE, load_mdrn
from pipelines.sr3d import SR3DModels, load_cnn, load_models
from pipelines.training import volume_data

SCALE = 2
DEGRADATIONS = ("cubic", "slab")
INTERPOLATIONS = ("cubic", "lanczos")
HEADING = "## Through-plane x2 from thin-cut and thick-slab input"
LABEL = {"cubic": "antialiased cubic LR", "slab": "thick slab LR (box, 2 slices)",
         "slab-triangle": "thick slab LR (triangle)", "slab-gaussian": "thick slab LR (Gaussian)"}


def depth_axes(source: volume_data.VolumeSource, all_axes: bool = False) -> tuple[int, ...]:
    return (0, 1, 2) if source.isotropic and all_axes else (0,)


def model_label(path: Path, shipped: bool) -> str:
    return f"{'shipped' if shipped else 'candidate'} {Path(path).stem.removeprefix('sr3d_')}:{weights.sha256(path)[:8]}"


def evaluate(data_dir: Path, weights_dir: Path, candidates: list[Path] = (),
             degradations: tuple[str, ...] = DEGRADATIONS, all_axes: bool = False) -> dict:
    paths = [Path(weights_dir) / THROUGH_FILE, *map(Path, candidates)]
    models = {model_label(p, i == 0): load_cnn(p) for i, p in enumerate(paths)}
    for label, model in models.items():
        if (model.config.axes, model.config.scale) != (1, SCALE):
            raise weights.WeightsError(f"{label} is not a through-plane x{SCALE} model")
    shipped = load_models(Path(weights_dir))
    mdrn = load_mdrn(Path(weights_dir) / MDRN_FILE) if (Path(weights_dir) / MDRN_FILE).exists() else None
    sources = [s for s in volume_data.sources("test") if s.isotropic]
    report: dict = {"scale": SCALE, "degradations": list(degradations), "models": list(models), "all_axes": all_axes,
                    "methods": [*INTERPOLATIONS, *models], "volumes": {}}
    shown = display.Progress("eval sr3d through", len(sources), unit="volumes", every_s=10)
    for done, source in enumerate(sources):
        raw = volume_data.read_volume(source, data_dir)
        window = intensity.normaliser(raw, source.modality)
        axes = depth_axes(source, all_axes)
        entry = {"modality": source.modality, "shape": list(raw.shape), "isotropic": source.isotropic,
                 "depth_axes": list(axes), "results": {}}
        for kind in degradations:
            per_axis = []
            for axis in axes:
                shown.update(done, note=f"{source.name}: {kind}, depth axis {axis}")
                hr = volume_data.crop_to(np.ascontiguousarray(np.moveaxis(raw, axis, 0)), SCALE, (0,))
                lr = volume_data.degrade(hr, SCALE, (0,), kind)
                out = {m: metrics(resize(lr, hr.shape, m), hr, window) for m in INTERPOLATIONS}
                for label, model in models.items():
                    sr = np.stack(list(through_stream(iter(lr), lr.shape[0], cnn_upsampler(model, window), scale=SCALE)))
                    out[label] = metrics(sr, hr, window)
                per_axis.append(out)
            entry["results"][kind] = {m: {k: round(float(np.mean([r[m][k] for r in per_axis])), 4)
                                          for k in ("psnr", "ssim")} for m in per_axis[0]}
        shown.update(done, note=f"{source.name}: 3D x{SCALE}")
        entry["3d"] = eval_3d(raw, window, shipped, models, mdrn)
        report["volumes"][source.name] = entry
    shown.update(len(sources), note="")
    shown.close()
    report["means"], report["means_3d"] = {}, {}
    for modality in dict.fromkeys(v["modality"] for v in report["volumes"].values()):
        rows = [v["results"] for v in report["volumes"].values() if v["modality"] == modality]
        rows3d = [v["3d"] for v in report["volumes"].values() if v["modality"] == modality]
        report["means_3d"][modality] = {m: {k: round(float(np.mean([r[m][k] for r in rows3d])), 4)
                                            for k in ("psnr", "ssim")} for m in rows3d[0]}
        report["means"][modality] = {kind: {m: {k: round(float(np.mean([r[kind][m][k] for r in rows])), 4)
                                                for k in ("psnr", "ssim")} for m in report["methods"]}
                                     for kind in degradations}
    return report


def eval_3d(raw: np.ndarray, window, shipped: SR3DModels, models: dict, mdrn=None) -> dict:
    """``srnode eval sr3d``'s 3D x2 rows (Lanczos; in-plane CNN or MDRN, then each through-plane model)."""
    hr = volume_data.crop_to(raw, SCALE, (0, 1, 2))
    lr = volume_data.downscale(hr, SCALE, (0, 1, 2))
    out = {"lanczos": metrics(resize(lr, hr.shape, "lanczos"), hr, window)}
    for label, through in models.items():
        these = SR3DModels(shipped.inplane, through, shipped.versions)
        out[f"cnn + {label}"] = metrics(sr3d_cnn(lr, window, these, SCALE), hr, window)
        if mdrn is not None:
            out[f"mdrn + {label}"] = metrics(sr3d_cnn(lr, window, these, SCALE, mdrn), hr, window)
    return {m: {k: round(float(v), 4) for k, v in r.items()} for m, r in out.items()}


def _gain(r: dict, model: str, base: str) -> float:
    return r[model]["psnr"] - r[base]["psnr"]


def markdown(report: dict) -> str:
    kinds, models = report["degradations"], report["models"]
    lines = [HEADING, "",
             "Isotropic held-out volumes, only the depth axis degraded x2 and restored (" + (
                 "each of the three axes as depth, averaged" if report.get("all_axes") else "the acquired slice axis")
             + "). LR: " + "; ".join(
                 f"{k} = {LABEL.get(k, k)}" for k in kinds) + ". PSNR (dB) on the fixed window as in "
             "`srnode eval sr3d`. Reproduce: `srnode eval sr3d --through" + (
                 " --through-all-axes" if report.get("all_axes") else "") + (
                 " --through-weights ..." if len(models) > 1 else "") + "`.", "",
             "### CNN gain in dB over Lanczos / over bicubic", "",
             "| volume | " + " | ".join(f"{m}, {k}" for m in models for k in kinds) + " |",
             "|---|" + "---|" * (len(models) * len(kinds))]
    for name, v in report["volumes"].items():
        where = "3 axes" if len(v["depth_axes"]) == 3 else "slice axis"
        cells = [f"{_gain(v['results'][k], m, 'lanczos'):+.2f} / {_gain(v['results'][k], m, 'cubic'):+.2f}"
                 for m in models for k in kinds]
        lines.append(f"| {name} ({v['modality']}, {where}) | " + " | ".join(cells) + " |")
    for modality, means in report["means"].items():
        cells = [f"{_gain(means[k], m, 'lanczos'):+.2f} / {_gain(means[k], m, 'cubic'):+.2f}"
                 for m in models for k in kinds]
        lines.append(f"| **{modality} mean** | " + " | ".join(cells) + " |")
    lines += ["", "### PSNR (dB) / SSIM", "",
              "| volume | LR | bicubic | Lanczos | " + " | ".join(models) + " |",
              "|---|---|---|---|" + "---|" * len(models)]
    rows = [(f"{n} ({v['modality']})", v["results"]) for n, v in report["volumes"].items()]
    rows += [(f"**{m} mean**", means) for m, means in report["means"].items()]
    for name, results in rows:
        for k in kinds:
            cells = [f"{results[k][m]['psnr']:.2f} / {results[k][m]['ssim']:.4f}" for m in report["methods"]]
            lines.append(f"| {name} | {k} | " + " | ".join(cells) + " |")
    if report.get("means_3d"):
        methods = [m for m in next(iter(report["means_3d"].values())) if m != "lanczos"]
        lines += ["", f"### 3D x{report['scale']} (`srnode eval sr3d`'s rows: all axes, antialiased cubic LR), "
                      "PSNR (dB) / SSIM and gain over Lanczos", "",
                  "| volume | Lanczos | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
        rows3d = [(f"{n} ({v['modality']})", v["3d"]) for n, v in report["volumes"].items()]
        rows3d += [(f"**{m} mean**", r) for m, r in report["means_3d"].items()]
        for name, r in rows3d:
            cells = [f"{r[m]['psnr']:.2f} / {r[m]['ssim']:.4f} ({r[m]['psnr'] - r['lanczos']['psnr']:+.2f})"
                     for m in methods]
            lines.append(f"| {name} | {r['lanczos']['psnr']:.2f} / {r['lanczos']['ssim']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
