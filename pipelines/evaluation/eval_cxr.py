"""``srnode eval cxr``: the Hydra paper's tables on the held-out test split, as JSON and markdown.

    python -m pipelines.evaluation.eval_cxr [--data DIR] [--weights DIR] [--out DIR] [--update-cards]

* SR (Table 1): per scale 2/3/4/8, PSNR (on [0, 1]), SSIM and MS-SSIM (5 levels) of the trunk,
  cubic and Lanczos, all from the same degraded input (``pipelines.training.cxr_data.degrade``).
* Lungs (Table 3): IoU, Dice, pixel accuracy on the 512-px masks after the pipeline's clean-up
  (``hydra.lung_mask``), per head scale (the source upsampled by that factor feeds the trunk, as in
  the pipeline), and how many test masks pass the plausible-lungs check (``hydra.implausible_lungs``).
* Lung nodule (Table 2): accuracy, AUC, sensitivity, specificity, precision, F1 at the operating
  threshold stored with the head (chosen on the validation split, never on test). ``--update-cards``
  also writes the sensitivity and specificity at the pipeline's head scale into the head's config
  (``operating_point``): the nodule report states them.
* Cost (Table 6): parameters and CPU/GPU seconds per image.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipelines import cxr, weights
from pipelines import progress as display
from pipelines.cxr import trunk_tiled
from pipelines.evaluation import eval_metrics
from pipelines.evaluation.image_metrics import ms_ssim, psnr, ssim
from pipelines.models import hydra, parameter_count
from pipelines.models.mdrn import MDRN_FILE, load_mdrn
from pipelines.models.hydra import ABNORMALITY_FILE, LUNGS_FILE, TRUNK_FILE
from pipelines.models.interpolation import resize
from pipelines.training import cxr_data
from pipelines.training.common import device


@torch.no_grad()
def eval_sr(trunk: hydra.HydraTrunk, mdrn, images: list[np.ndarray], scales, dev) -> dict:
    table = {}
    shown = display.Progress("eval cxr SR", len(scales) * len(images), unit="images", every_s=10)
    for i, s in enumerate(scales):
        rows = {"pipeline": [], "hydra": [], "cubic": [], "lanczos": []}
        for j, img in enumerate(images):
            shown.update(i * len(images) + j, note=f"x{s}")
            hr = cxr_data.crop_to_multiple(img, s)
            low = resize(hr, (hr.shape[0] // s, hr.shape[1] // s), "cubic")
            cubic = cxr_data.upsample(low, s, "cubic")
            outputs = {
                "cubic": cubic,
                "lanczos": cxr_data.upsample(low, s, "lanczos"),
                "hydra": trunk(torch.from_numpy(cubic)[None, None].to(dev))[0].clamp(0, 1)[0, 0].cpu().numpy(),
            }
            outputs["pipeline"] = (outputs["hydra"] if cxr.BEST_MODEL[s] == "hydra" else
                                   mdrn(torch.from_numpy(low)[None, None].to(dev), s)[0, 0].cpu().numpy())
            target = torch.from_numpy(hr)[None, None]
            for name, out in outputs.items():
                pred = torch.from_numpy(np.clip(out, 0, 1).astype(np.float32))[None, None]
                rows[name].append([psnr(pred, target).item(), ssim(pred, target).item(), ms_ssim(pred, target).item()])
        table[f"x{s}"] = {"model": cxr.BEST_MODEL[s]} | {name: dict(zip(("psnr", "ssim", "ms_ssim"), np.mean(v, axis=0).round(4).tolist()))
                          for name, v in rows.items()}
    shown.update(len(scales) * len(images))
    shown.close()
    return table


@torch.no_grad()
def eval_heads(models: hydra.HydraModels, samples, scales, dev) -> tuple[dict, dict]:
    trunk, lungs, abnormality = models.trunk, models.lungs, models.abnormality
    seg, cls = {}, {}
    for s in scales:
        seg_rows, scores, labels, plausible = [], [], [], 0
        for sample in samples:
            img = cxr_data.read_image(sample.image)
            _, pooled = trunk_tiled(trunk, cxr_data.upsample(img, s), lungs.grid)
            if sample.mask is not None:
                mask = hydra.lung_mask(lungs, pooled, img.shape, img, models.lung_bounds)
                plausible += models.lung_bounds is not None and hydra.implausible_lungs(mask, models.lung_bounds) is None
                seg_rows.append(eval_metrics.segmentation(mask, cxr_data.read_mask(sample.mask)))
            scores.append(hydra.abnormal_probability(abnormality(pooled.mean(dim=(2, 3)))).item())
            labels.append(sample.abnormal)
        seg[f"x{s}"] = {k: round(float(np.mean([r[k] for r in seg_rows])), 4) for k in seg_rows[0]} | {"n": len(seg_rows), "plausible": int(plausible)}
        cls[f"x{s}"] = {k: round(v, 4) if isinstance(v, float) else v
                        for k, v in eval_metrics.classification(np.array(scores), np.array(labels), models.threshold).items()}
    return seg, cls


@torch.no_grad()
def eval_cost(models: hydra.HydraModels, dev, size: int = 512, scale: int = 2, repeats: int = 3) -> dict:
    """Seconds per image: trunk alone at ``size`` px x ``scale``, and trunk + both heads (one forward)."""
    trunk, lungs, abnormality = models.trunk, models.lungs, models.abnormality
    x = torch.rand(1, 1, size * scale, size * scale, device=dev)

    def timed(fn) -> float:
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats

    def all_outputs():
        out, feats = trunk(x)
        pooled = hydra.pool_features(feats, lungs.grid)
        film = hydra.film_on_grid(x[0, 0].cpu().numpy(), pooled.shape[-2:]).to(dev) if lungs.film else None
        return out, lungs(pooled, film), abnormality(pooled.mean(dim=(2, 3)))

    return {
        "device": str(dev), "input": f"{size}x{size} x{scale}", "threads": torch.get_num_threads(),
        "params": {"trunk": parameter_count(trunk), "lungs": parameter_count(lungs),
                   "abnormality": parameter_count(abnormality)},
        "seconds_trunk_sr": round(timed(lambda: trunk(x)), 3),
        "seconds_trunk_and_heads": round(timed(all_outputs), 3),
    }


def markdown(report: dict) -> str:
    lines = ["## Evaluation on the held-out test split", "",
             f"Data: {report['data']}; command: `{report['command']}`.", "",
             "### Super-resolution (PSNR dB on [0,1] / SSIM / MS-SSIM)", "",
             "The `cxr` pipeline's SR series (its default network at each scale) against the Hydra trunk, cubic "
             "and Lanczos from the same low-resolution input.", "",
             "| scale | pipeline (network) | Hydra trunk | cubic | Lanczos | pipeline - bicubic (dB) | "
             "pipeline - Lanczos (dB) |", "|---|---|---|---|---|---|---|"]
    fmt = lambda m: f"{m['psnr']:.2f} / {m['ssim']:.4f} / {m['ms_ssim']:.4f}"  # noqa: E731
    for scale, row in report["sr"].items():
        best = row["pipeline"]["psnr"]
        lines.append(f"| {scale} | {fmt(row['pipeline'])} ({row['model']}) | {fmt(row['hydra'])} | {fmt(row['cubic'])} | "
                     f"{fmt(row['lanczos'])} | {best - row['cubic']['psnr']:+.2f} | {best - row['lanczos']['psnr']:+.2f} |")
    lines += ["", "### Lung segmentation", "",
              "Probabilities resampled from the grid and edge-aligned with the film (`hydra.guided_filter`), "
              "then the pipeline's clean-up (two largest pieces, holes filled, nothing outside the thorax: "
              "`hydra.within_thorax`); plausible: masks inside the "
              "training films' lung bounds (the pipeline writes no SEG and no finding for the others).", "",
              "| trunk input | IoU | Dice | pixel accuracy | plausible / images |", "|---|---|---|---|---|"]
    for scale, row in report["lungs"].items():
        lines.append(f"| source {scale} | {row['iou']:.4f} | {row['dice']:.4f} | {row['pixel_accuracy']:.4f} | "
                     f"{row['plausible']} / {row['n']} |")
    lines += ["", "### Lung nodule (JSRT nodule vs no nodule)", "",
              "| trunk input | accuracy | AUC | sensitivity | specificity | precision | F1 | threshold | images (abnormal) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for scale, r in report["abnormality"].items():
        lines.append(f"| source {scale} | {r['accuracy']:.3f} | {r['auc']:.3f} | {r['sensitivity']:.3f} | "
                     f"{r['specificity']:.3f} | {r['precision']:.3f} | {r['f1']:.3f} | {r['threshold']:.3f} | "
                     f"{r['n']} ({r['positives']}) |")
    c = report["cost"]
    lines += ["", "### Cost", "",
              f"Parameters: trunk {c['params']['trunk']:,}, lung head {c['params']['lungs']:,}, "
              f"abnormality head {c['params']['abnormality']:,}. Seconds per image ({c['input']}, {c['device']}, "
              f"{c['threads']} threads): SR alone {c['seconds_trunk_sr']}, SR + both heads from one trunk forward "
              f"{c['seconds_trunk_and_heads']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="srnode eval cxr", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=cxr_data.default_data_dir())
    parser.add_argument("--weights", type=Path, default=weights.weights_dir())
    parser.add_argument("--out", type=Path, help="folder for cxr_eval.json and cxr_eval.md (default: print markdown)")
    parser.add_argument("--scales", type=int, nargs="+", default=list(cxr_data.SCALES))
    parser.add_argument("--head-scales", type=int, nargs="+", default=[2],
                        help="trunk input scales for the heads (the pipeline uses the scale they were trained at)")
    parser.add_argument("--update-cards", action="store_true", help="write the tables into the model cards")
    parser.add_argument("--cost-size", type=int, default=512, help="side of the image the cost table is timed on")
    args = parser.parse_args(argv)
    dev = device()
    models = hydra.load_models(args.weights).to(dev)
    samples = cxr_data.load_split(args.data, "test")
    mdrn_path = args.weights / MDRN_FILE  # else the shipped one (a folder of freshly trained Hydra weights)
    mdrn_path = mdrn_path if mdrn_path.exists() else weights.weights_dir() / MDRN_FILE
    images = [cxr_data.read_image(s.image) for s in samples]
    print(f"evaluating on {len(samples)} held-out images", file=sys.stderr)
    report = {"data": f"{args.data.name}/ test split ({len(samples)} images: manifest 'val' rows)",
              "command": "srnode eval cxr " + " ".join(argv if argv is not None else sys.argv[1:]),
              "sr": eval_sr(models.trunk, load_mdrn(mdrn_path).to(dev), images, args.scales, dev)}
    report["lungs"], report["abnormality"] = eval_heads(models, samples, args.head_scales, dev)
    report["cost"] = eval_cost(models, dev, size=args.cost_size)
    cards = [args.weights / name for name in (TRUNK_FILE, LUNGS_FILE, ABNORMALITY_FILE)] if args.update_cards else []
    at_pipeline = report["abnormality"].get(f"x{models.head_scale}")
    if args.update_cards and at_pipeline:
        weights.update_config(args.weights / ABNORMALITY_FILE, operating_point={
            "threshold": models.threshold, "sensitivity": round(at_pipeline["sensitivity"], 4),
            "specificity": round(at_pipeline["specificity"], 4),
            "held_out": f"{at_pipeline['n']} held-out JSRT films, {at_pipeline['positives']} with a nodule"})
    eval_metrics.publish(args.out, "cxr_eval", report, markdown(report), cards)
    return 0


if __name__ == "__main__":
    sys.exit(main())
