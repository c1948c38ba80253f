"""``srnode eval sr2d``: Meta-Upscale at factors 1.5-4 against interpolation and the fixed-scale models.

    python -m pipelines.evaluation.eval_sr2d [--weights DIR] [--out DIR] [--update-cards]

Held-out images only: the CXR test split (:mod:`pipelines.training.cxr_data`) and the axial slices of the
sr3d test volumes (:mod:`pipelines.training.volume_data`), CT and MR. Each image is put on its [0, 1]
window (CXR as stored, CT [-1024, 2976] HU, MR 0.5/99.5 percentiles of its volume), cropped to a
multiple of the factor's numerator p (factor p/q), downscaled to exactly q/p of its size with
antialiased cubic, and brought back by cubic, Lanczos, Meta-Upscale, and at integer factors by the
fixed-scale models trained for that factor: the Hydra trunk (CXR, x2/x3/x4), the sr3d in-plane CNN
(CT/MR, x2/x4), MDRN (x2/x3/x4), and ``fixed`` (Meta-Upscale's own trunk with fixed x2/x3/x4 tails,
trained on the same terms: the comparison that isolates the upsampling module) when their weights
are present. PSNR on [0, 1] over each image, SSIM
(11-px window); means over images. Seconds per image are for a 512 px CXR at x2 on this machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from pipelines import progress as display, weights
from pipelines.evaluation.eval_metrics import publish
from pipelines.evaluation.image_metrics import psnr, ssim
from pipelines.models import hydra, parameter_count
from pipelines.models.interpolation import resize
from pipelines.models.mdrn import FIXED_FILE, MDRN_FILE, load_mdrn
from pipelines.models.meta_sr import META_FILE, load_meta
from pipelines.models.sr3d_cnn import INPLANE_FILES
from pipelines.sr3d import load_cnn
from pipelines.training import cxr_data, volume_data

FACTORS = ("1.5", "2", "2.5", "3", "3.5", "4")
VOLUME_SLICE_STEP = 2  # every other axial slice of the test volumes (neighbours are near-duplicates)


def test_images(cxr_dir: Path, data_dir: Path) -> dict[str, list[np.ndarray]]:
    images = {"CXR": [cxr_data.read_image(s.image) for s in cxr_data.load_split(cxr_dir, "test")], "CT": [], "MR": []}
    for source in volume_data.sources("test"):
        images[source.modality] += list(volume_data.load(source, data_dir)[::VOLUME_SLICE_STEP])
    return images


def load_models(folder: Path) -> dict:
    models = {"meta": load_meta(folder / META_FILE), "hydra": hydra.load_trunk(folder / hydra.TRUNK_FILE),
              "cnn": {s: load_cnn(folder / name) for s, name in INPLANE_FILES.items()}}
    for name, file_name in (("mdrn", MDRN_FILE), ("fixed", FIXED_FILE)):
        if (folder / file_name).exists():
            models[name] = load_mdrn(folder / file_name)
    return models


@torch.no_grad()
def outputs(models: dict, modality: str, lr: np.ndarray, shape: tuple[int, int], factor: Fraction) -> dict:
    x = torch.from_numpy(lr)[None, None]
    out = {"cubic": resize(lr, shape, "cubic"), "lanczos": resize(lr, shape, "lanczos"),
           "meta": models["meta"](x, *shape)[0, 0].numpy()}
    if factor.denominator == 1:
        r = int(factor)
        if modality == "CXR" and r in (2, 3, 4):
            out[f"hydra x{r}"] = models["hydra"](torch.from_numpy(out["cubic"])[None, None])[0][0, 0].numpy()
        if modality != "CXR" and r in models["cnn"]:
            out[f"sr3d cnn x{r}"] = models["cnn"][r](x)[0][0, 0].numpy()
        for name in ("mdrn", "fixed"):
            if name in models and r in (2, 3, 4):
                out[f"{name} x{r}"] = models[name](x, r)[0, 0].numpy()
    return out


def evaluate(cxr_dir: Path, data_dir: Path, weights_dir: Path) -> dict:
    models = load_models(weights_dir)
    report: dict = {"factors": {}, "cost": {}}
    by_modality = test_images(cxr_dir, data_dir)
    shown = display.Progress("eval sr2d", len(by_modality) * len(FACTORS), unit="factors", every_s=10)
    for modality, images in by_modality.items():
        for text in FACTORS:
            shown.update(shown.done, note=f"{modality} x{text}")
            factor = Fraction(text)
            rows: dict[str, list] = {}
            for img in images:
                p, q = factor.numerator, factor.denominator
                hr = img[: img.shape[0] // p * p, : img.shape[1] // p * p]
                lr = resize(hr, (hr.shape[0] * q // p, hr.shape[1] * q // p), "cubic")
                target = torch.from_numpy(np.ascontiguousarray(hr))[None, None]
                for name, out in outputs(models, modality, lr, hr.shape, factor).items():
                    pred = torch.from_numpy(np.clip(out, 0, 1).astype(np.float32))[None, None]
                    rows.setdefault(name, []).append((psnr(pred, target).item(), ssim(pred, target).item()))
            report["factors"].setdefault(modality, {})[text] = {
                name: {"psnr": round(float(np.mean([v[0] for v in vals])), 3),
                       "ssim": round(float(np.mean([v[1] for v in vals])), 4)} for name, vals in rows.items()}
            shown.write(f"{modality} x{text}: meta {report['factors'][modality][text]['meta']['psnr']:.2f} dB, "
                        f"lanczos {report['factors'][modality][text]['lanczos']['psnr']:.2f} dB")
            shown.update(shown.done + 1)
        report["count"] = {**report.get("count", {}), modality: len(images)}
    shown.close()
    report["cost"] = cost(models)
    present = [name for name in (META_FILE, MDRN_FILE, FIXED_FILE) if (weights_dir / name).exists()]
    report["versions"] = {name: f"sha256:{weights.sha256(weights_dir / name)[:12]}" for name in present}
    report["steps"] = {name: json.loads(weights.read_card_header(weights_dir / name)["config"]).get("steps")
                       for name in present}
    return report


@torch.no_grad()
def cost(models: dict, size: int = 512, repeats: int = 3) -> dict:
    x = torch.rand(1, 1, size // 2, size // 2)
    runs = {"meta x2": lambda: models["meta"](x, size, size),
            "hydra x2": lambda: models["hydra"](torch.rand(1, 1, size, size)),
            "sr3d cnn x2": lambda: models["cnn"][2](x)}
    for name in ("mdrn", "fixed"):
        if name in models:
            runs[f"{name} x2"] = lambda name=name: models[name](x, 2)
    params = {"meta x2": models["meta"], "hydra x2": models["hydra"], "sr3d cnn x2": models["cnn"][2],
              "mdrn x2": models.get("mdrn"), "fixed x2": models.get("fixed")}
    out = {}
    for name, fn in runs.items():
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        out[name] = {"parameters": parameter_count(params[name]), "seconds": round((time.perf_counter() - start) / repeats, 3)}
    out["threads"] = torch.get_num_threads()
    return out


def markdown(report: dict) -> str:
    lines = ["## Evaluation on held-out images", "",
             f"Images: {', '.join(f'{m} {n}' for m, n in report['count'].items())} (CXR test split; every "
             f"{VOLUME_SLICE_STEP}nd axial slice of the sr3d test volumes). PSNR (dB) on the [0, 1] window, SSIM; "
             "LR = antialiased cubic downscaling to exactly 1/factor.", ""]
    for modality, by_factor in report["factors"].items():
        methods = list(dict.fromkeys(m for t in by_factor.values() for m in t))
        lines += [f"### {modality}", "", "| method | " + " | ".join(f"x{f}" for f in by_factor) + " |",
                  "|---|" + "---|" * len(by_factor)]
        for m in methods:
            cells = [f"{t[m]['psnr']:.2f} / {t[m]['ssim']:.4f}" if m in t else "-" for t in by_factor.values()]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        gains = [f"{t['meta']['psnr'] - t['lanczos']['psnr']:+.2f}" for t in by_factor.values()]
        lines.append("| **meta - lanczos (dB)** | " + " | ".join(gains) + " |")
        fixed = [f"{t['meta']['psnr'] - t[k]['psnr']:+.2f}" if (k := f"fixed x{f}") in t else "-"
                 for f, t in by_factor.items()]
        if any(v != "-" for v in fixed):
            steps = report.get("steps", {})
            budget = f"meta {steps.get(META_FILE) or '?'} steps, fixed {steps.get(FIXED_FILE) or '?'} steps"
            lines.append(f"| **meta - fixed, same trunk ({budget}; dB)** | " + " | ".join(fixed) + " |")
        lines.append("")
    lines += [f"### Cost ({report['cost']['threads']} CPU threads, 512 px output at x2)", "",
              "| model | parameters | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {v['parameters']:,} | {v['seconds']} |" for name, v in report["cost"].items()
              if isinstance(v, dict)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="srnode eval sr2d", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=volume_data.default_data_dir())
    parser.add_argument("--cxr-data", type=Path, default=cxr_data.default_data_dir())
    parser.add_argument("--weights", type=Path, default=weights.weights_dir())
    parser.add_argument("--out", type=Path, default=weights.weights_dir() / "eval")
    parser.add_argument("--update-cards", action="store_true")
    args = parser.parse_args(argv)
    report = evaluate(args.cxr_data, args.data, args.weights)
    cards = [args.weights / name for name in (META_FILE, MDRN_FILE, FIXED_FILE)] if args.update_cards else []
    publish(args.out, "sr2d_eval", report, markdown(report), cards)
    return 0


if __name__ == "__main__":
    sys.exit(main())
