"""``srnode eval sr3d``: the paper's Tables 3-6 on held-out CT and MR volumes, as JSON and markdown.

    python -m pipelines.evaluation.eval_sr3d [--data DIR] [--weights DIR] [--out DIR] [--update-cards]
    python -m pipelines.evaluation.eval_sr3d --degradations [--noise 0,0.01] [...]
    python -m pipelines.evaluation.eval_sr3d --through [--through-weights FILE ...] [...]

``--degradations``: instead, in-plane x2 under each way of making the LR image (antialiased cubic, area,
Gaussian PSF, linear, Lanczos; with and without noise): :mod:`pipelines.evaluation.degradation_table`,
written to ``sr3d_degradations.{json,md}`` and (``--update-cards``) its own section of the in-plane x2 card.

``--through``: instead, through-plane x2 alone from antialiased cubic and from thick-slab (slice-averaged) LR,
for the shipped through-plane model and any ``--through-weights`` candidates:
:mod:`pipelines.evaluation.through_table`, written to ``sr3d_through.{json,md}`` and (``--update-cards``) its
own section of the through-plane card.

* 2D (in-plane only): every axial slice of each ``test`` volume of :mod:`pipelines.training.volume_data`
  is downscaled x2 / x4 in-plane (antialiased cubic, on the modality values) and brought back by
  nearest, linear, cubic, Lanczos and the CNN (x4: the dedicated x4 CNN and the x2 CNN applied
  twice; x2 also with the self-ensemble).
* 3D (all axes): the isotropic ``test`` volumes are downscaled on all three axes and brought back
  by the interpolations on all axes, and by the in-plane CNN (or MDRN) followed by the through-plane CNN
  (x2 also with both CNN stages as a self-ensemble).
* PSNR on the fixed intensity window of :mod:`pipelines.models.intensity` (CT [-1024, 2976] HU,
  MR the HR volume's 0.5/99.5 percentiles) mapped to [0, 1], over the whole volume; SSIM (11-px
  Gaussian window) averaged over axial slices. Each figure is the mean over the volumes of a
  modality. The CNN runs exactly as in the pipeline (:mod:`pipelines.models.volume_stream`).
* Cost: parameters, and seconds per volume for the 3D CNN (plain and self-ensemble) on this machine.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipelines import progress as display, weights
from pipelines.evaluation import degradation_table, through_table
from pipelines.evaluation.eval_metrics import publish
from pipelines.evaluation.volume_eval import mdrn_upsampler, metrics, sr3d_cnn
from pipelines.models import intensity
from pipelines.models.interpolation import METHODS, resize
from pipelines.models.mdrn import MDRN_FILE, load_mdrn
from pipelines.models import parameter_count
from pipelines.models.sr3d_cnn import INPLANE_FILES, THROUGH_FILE
from pipelines.models.volume_stream import cnn_upsampler, inplane_stream
from pipelines.sr3d import load_models
from pipelines.training import volume_data

SCALES = (2, 4)
EVAL_HEADING = "## Evaluation on the held-out volumes"


def eval_2d(raw: np.ndarray, window, models, scale: int, mdrn=None) -> dict[str, dict[str, float]]:
    hr = volume_data.crop_to(raw, scale, (1, 2))
    lr = volume_data.downscale(hr, scale, (1, 2))
    out = {m: metrics(resize(lr, hr.shape[1:], m), hr, window) for m in METHODS}
    up = {s: cnn_upsampler(models.inplane[s], window) for s in INPLANE_FILES}
    out["cnn"] = metrics(np.stack(list(inplane_stream(lr, scale, up[scale]))), hr, window)
    if scale == 4:
        out["cnn x2 twice"] = metrics(np.stack(list(inplane_stream(lr, 4, up[2], times=2))), hr, window)
    if scale == 2:
        ensemble = cnn_upsampler(models.inplane[2], window, ensemble=True)
        out["cnn + self-ensemble"] = metrics(np.stack(list(inplane_stream(lr, 2, ensemble))), hr, window)
    if mdrn is not None:
        out["mdrn"] = metrics(np.stack(list(inplane_stream(lr, scale, mdrn_upsampler(mdrn, scale, window)))), hr, window)
    return out


def eval_3d(raw: np.ndarray, window, models, scale: int,
            mdrn=None) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """(metrics per method, seconds per CNN method) for 3D SR of ``raw`` downscaled on every axis."""
    hr = volume_data.crop_to(raw, scale, (0, 1, 2))
    lr = volume_data.downscale(hr, scale, (0, 1, 2))
    out = {m: metrics(resize(lr, hr.shape, m), hr, window) for m in METHODS}
    seconds = {}
    for name, ensemble in [("cnn", False)] + ([("cnn + self-ensemble", True)] if scale == 2 else []):
        start = time.perf_counter()
        sr = sr3d_cnn(lr, window, models, scale, ensemble=ensemble)
        seconds[name] = time.perf_counter() - start
        out[name] = metrics(sr, hr, window)
    if mdrn is not None:
        out["mdrn + through cnn"] = metrics(sr3d_cnn(lr, window, models, scale, mdrn), hr, window)
    return out, seconds


def _mean(rows: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {m: {k: round(float(np.mean([r[m][k] for r in rows])), 4) for k in rows[0][m]} for m in rows[0]}


def evaluate(data_dir: Path, weights_dir: Path) -> dict:
    models = load_models(weights_dir)
    mdrn = load_mdrn(weights_dir / MDRN_FILE) if (weights_dir / MDRN_FILE).exists() else None
    report: dict = {"2d": {}, "3d": {}, "volumes": {}, "cost": {}}
    per: dict = {"2d": {}, "3d": {}}
    sources = volume_data.sources("test")
    shown = display.Progress("eval sr3d", len(sources), unit="volumes", every_s=10)
    for done, source in enumerate(sources):
        shown.update(done, note=source.name)
        raw = volume_data.read_volume(source, data_dir)
        window = intensity.normaliser(raw, source.modality)
        entry = {"modality": source.modality, "shape": list(raw.shape), "window": [round(w, 2) for w in window]}
        for scale in SCALES:
            shown.update(done, note=f"{source.name}: 2D x{scale}")
            result = eval_2d(raw, window, models, scale, mdrn)
            entry[f"2d x{scale}"] = result
            per["2d"].setdefault((source.modality, scale), []).append(result)
            if source.isotropic:
                shown.update(done, note=f"{source.name}: 3D x{scale}")
                result, seconds = eval_3d(raw, window, models, scale, mdrn)
                entry[f"3d x{scale}"] = result
                entry[f"3d x{scale} seconds"] = {k: round(v, 2) for k, v in seconds.items()}
                per["3d"].setdefault((source.modality, scale), []).append(result)
        report["volumes"][source.name] = entry
    shown.update(len(sources), note="")
    shown.close()
    for dim in ("2d", "3d"):
        for (modality, scale), rows in sorted(per[dim].items()):
            report[dim].setdefault(modality, {})[f"x{scale}"] = _mean(rows)
    report["cost"] = {
        "parameters": {name: parameter_count(m) for name, m in
                       [(INPLANE_FILES[2], models.inplane[2]), (INPLANE_FILES[4], models.inplane[4]),
                        (THROUGH_FILE, models.through)]},
        "device": str(next(models.through.parameters()).device),
        "threads": torch.get_num_threads(),
    }
    report["versions"] = models.versions
    return report


def markdown(report: dict) -> str:
    lines = [EVAL_HEADING, "",
             "Held-out volumes (never trained on): " + ", ".join(
                 f"{name} ({v['modality']} {'x'.join(map(str, v['shape']))})" for name, v in report["volumes"].items())
             + ". PSNR (dB) on the fixed [0, 1] window (CT [-1024, 2976] HU; MR 0.5-99.5 percentiles), SSIM mean "
               "over axial slices; LR = antialiased cubic downscaling of the modality values.", ""]
    for dim, title in (("2d", "2D, in-plane only"), ("3d", "3D, all axes")):
        for modality, by_scale in report[dim].items():
            lines += [f"### {title}: {modality}", "", "| method | " + " | ".join(
                f"x{s[1:]} PSNR | x{s[1:]} SSIM" for s in by_scale) + " |",
                "|---|" + "---|---|" * len(by_scale)]
            methods = list(dict.fromkeys(m for table in by_scale.values() for m in table))
            for m in methods:
                cells = [f"{t[m]['psnr']:.2f} | {t[m]['ssim']:.4f}" if m in t else "- | -" for t in by_scale.values()]
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            for m in ("cnn", "mdrn", "mdrn + through cnn"):
                if all(m in t for t in by_scale.values()):
                    gains = [f"{t[m]['psnr'] - t['lanczos']['psnr']:+.2f} | {t[m]['ssim'] - t['lanczos']['ssim']:+.4f}"
                             for t in by_scale.values()]
                    lines.append(f"| **{m} - lanczos** | " + " | ".join(gains) + " |")
            lines.append("")
    lines += per_volume_gains(report["volumes"])
    cost = report["cost"]
    lines += [f"### Cost ({cost['device']}, {cost['threads']} threads)", "",
              "| model | parameters |", "|---|---|"]
    lines += [f"| {name} | {n:,} |" for name, n in cost["parameters"].items()]
    lines += ["", "| volume | 3D x2 CNN s | 3D x2 CNN self-ensemble s | 3D x4 CNN s |", "|---|---|---|---|"]
    for name, v in report["volumes"].items():
        if "3d x2 seconds" in v:
            lines.append(f"| {name} ({'x'.join(map(str, v['shape']))}) | {v['3d x2 seconds']['cnn']} | "
                         f"{v['3d x2 seconds']['cnn + self-ensemble']} | {v['3d x4 seconds']['cnn']} |")
    return "\n".join(lines) + "\n"


def per_volume_gains(volumes: dict) -> list[str]:
    """CNN minus Lanczos PSNR for each held-out volume: the modality means above can hide a volume
    on which the gain is much smaller (the 2 mm brain MR next to the sagittal MR)."""
    columns = [key for key in ("2d x2", "2d x4", "3d x2", "3d x4") if any(key in v for v in volumes.values())]
    lines = ["### CNN - Lanczos per volume (PSNR dB)", "",
             "| volume | " + " | ".join(c.replace("d x", "D x") for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name, v in volumes.items():
        cells = [f"{v[c]['cnn']['psnr'] - v[c]['lanczos']['psnr']:+.2f}" if c in v else "-" for c in columns]
        lines.append(f"| {name} ({v['modality']}) | " + " | ".join(cells) + " |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="srnode eval sr3d", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=volume_data.default_data_dir())
    parser.add_argument("--weights", type=Path, default=weights.weights_dir())
    parser.add_argument("--out", type=Path, default=weights.weights_dir() / "eval")
    parser.add_argument("--update-cards", action="store_true", help="write the tables into the model cards")
    parser.add_argument("--degradations", action="store_true",
                        help="in-plane x2 per degradation (cubic, area, Gaussian PSF, linear, Lanczos) instead")
    parser.add_argument("--noise", default="0,0.01",
                        help="with --degradations: noise levels, fractions of the intensity window (default 0,0.01)")
    parser.add_argument("--through", action="store_true",
                        help="through-plane x2 alone from antialiased cubic and thick-slab LR instead")
    parser.add_argument("--through-weights", type=Path, nargs="*", default=[],
                        help="with --through: candidate through-plane x2 weights to compare with the shipped one")
    parser.add_argument("--through-all-axes", action="store_true",
                        help="with --through: each axis of the volumes as depth in turn, averaged (3x the time)")
    args = parser.parse_args(argv)
    if args.degradations and args.through:
        parser.error("--degradations or --through, not both")
    if args.through_weights and (args.update_cards or not args.through):
        parser.error("--through-weights: with --through, and without --update-cards (the card is the shipped model's)")
    if args.degradations:
        return degradations(args)
    if args.through:
        return through(args)
    report = evaluate(args.data, args.weights)
    cards = [args.weights / name for name in (*INPLANE_FILES.values(), THROUGH_FILE)] if args.update_cards else []
    publish(args.out, "sr3d_eval", report, markdown(report), cards)
    return 0


def degradations(args) -> int:
    noises = tuple(float(n) for n in args.noise.split(",") if n.strip())
    report = degradation_table.evaluate(args.data, args.weights, noises)
    text = degradation_table.markdown(report)
    publish(args.out, "sr3d_degradations", report, text)
    if args.update_cards:
        weights.set_section(args.weights / INPLANE_FILES[2], degradation_table.HEADING, text)
    return 0


def through(args) -> int:
    report = through_table.evaluate(args.data, args.weights, args.through_weights, all_axes=args.through_all_axes)
    text = through_table.markdown(report)
    publish(args.out, "sr3d_through", report, text)
    if args.update_cards:
        weights.set_section(args.weights / THROUGH_FILE, through_table.HEADING, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
