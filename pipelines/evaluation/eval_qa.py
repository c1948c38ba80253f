"""``srnode eval qa``: the consistency PSNR of each model on held-out images, and the QA thresholds.

    python -m pipelines.evaluation.eval_qa [--per-source N] [--out DIR] [--update-cards]

What a job's QA measures (:mod:`pipelines.qa`), measured where the answer is known to be good: the
held-out images at their own resolution are the inputs (the CXR test split of
:mod:`pipelines.training.cxr_data`; axial slices of the sr3d ``test`` volumes of
:mod:`pipelines.training.volume_data`), each model super-resolves them as its pipeline does (same
intensity windows, the derived writer's value guard: range + 2 %, local range on projection images,
the air outside a CT's reconstruction field left out), and :func:`pipelines.qa.consistency` compares
the output degraded back (antialiased cubic) with the input. Per model: the lowest, median and
highest per-image PSNR, and the PSNR of the same outputs with Gaussian noise of 1 % and 3 % of the
input's span added (what a corrupted output looks like).

Threshold = the lowest held-out PSNR minus ``MARGIN_DB``, rounded down to 0.5 dB. ``--update-cards``
writes them into ``qa_thresholds.json`` in the weights folder (per weights file with its sha256, and
per interpolation method: what the node reads at run time) and a "QA consistency" section into each
model card (before its evaluation section, which other evals rewrite).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipelines import progress as display, qa, weights
from pipelines.dicom import valid_field
from pipelines.models import hydra, intensity
from pipelines.models.interpolation import METHODS, resize
from pipelines.models.mdrn import MDRN_FILE, load_mdrn
from pipelines.models.meta_sr import META_FILE, load_meta
from pipelines.models.sr3d_cnn import INPLANE_FILES
from pipelines.models.volume_stream import cnn_upsampler, inplane_stream, mdrn_images, meta_images
from pipelines.models.lanczos import centres
from pipelines.sr3d import load_cnn
from pipelines.training import cxr_data, volume_data

MARGIN_DB = 3.0
NOISE = (0.01, 0.03)  # Gaussian noise, fraction of the input's span
SECTION = "## QA consistency threshold"


def held_out(cxr_dir: Path, data_dir: Path, per_source: int) -> list[tuple[str, np.ndarray, tuple[float, float]]]:
    """(modality, image in modality values, intensity window) for up to ``per_source`` evenly spaced
    images of each held-out source (CXR: the films of the test split count as one source)."""
    films = cxr_data.load_split(cxr_dir, "test")
    pick = np.linspace(0, len(films) - 1, min(per_source, len(films))).round().astype(int)
    images = [("CXR", cxr_data.read_image(films[i].image) * 255.0, (0.0, 255.0)) for i in sorted(set(pick))]
    for source in volume_data.sources("test"):
        volume = volume_data.read_volume(source, data_dir)
        window = intensity.normaliser(volume, source.modality)
        # middle half of the stack: the ends of a volume are mostly air
        ks = np.linspace(volume.shape[0] // 4, 3 * volume.shape[0] // 4, per_source).round().astype(int)
        images += [(source.modality, volume[k].astype(np.float32), window) for k in sorted(set(ks))]
    return images


def guard(out: np.ndarray, image: np.ndarray, modality: str) -> np.ndarray:
    """The derived writer's value rules 1 and 3 (:func:`pipelines.dicom.valid_field.hold`) for one
    image: its own range, and on a projection image (CXR) its local range."""
    local = valid_field.local_range(image) if modality == "CXR" else None
    return valid_field.hold(out, valid_field.widened((float(image.min()), float(image.max()))), local)


def runners(weights_dir: Path) -> dict[str, tuple[list[str], list[int], object]]:
    """name -> (weights files it uses, scales, fn(image (H, W), scale, window, modality) -> output)."""
    mdrn = load_mdrn(weights_dir / MDRN_FILE)
    meta = load_meta(weights_dir / META_FILE)
    cnn = {s: load_cnn(weights_dir / name) for s, name in INPLANE_FILES.items()}
    trunk = hydra.load_trunk(weights_dir / hydra.TRUNK_FILE)

    def run_mdrn(img, s, window, modality):
        return mdrn_images(mdrn, img[None], s, window)[0]

    def run_meta(img, s, window, modality):
        h, w = img.shape
        return meta_images(meta, img[None], centres(h, h * s), centres(w, w * s), (1 / s, 1 / s), window)[0]

    def run_cnn(img, s, window, modality):
        if modality == "CXR":
            return None  # the sr3d pipeline takes CT and MR only
        return next(inplane_stream(img[None], s, cnn_upsampler(cnn[s], window)))

    @torch.no_grad()
    def run_hydra(img, s, window, modality):
        if modality != "CXR":
            return None  # the Hydra trunk is the cxr pipeline's
        lo, hi = (float(v) for v in np.percentile(img, [0.5, 99.5]))  # pipelines.cxr.to_model_input
        x = (img - lo) / (hi - lo)
        up = resize(x, (x.shape[0] * s, x.shape[1] * s), "cubic")
        sr = trunk(torch.from_numpy(up.astype(np.float32))[None, None])[0][0, 0].numpy()
        return sr * (hi - lo) + lo

    table = {MDRN_FILE: ([MDRN_FILE], [2], run_mdrn), META_FILE: ([META_FILE], [2], run_meta),
             INPLANE_FILES[2]: ([INPLANE_FILES[2]], [2], lambda i, s, w, m: run_cnn(i, 2, w, m)),
             INPLANE_FILES[4]: ([INPLANE_FILES[4]], [4], lambda i, s, w, m: run_cnn(i, 4, w, m)),
             hydra.TRUNK_FILE: ([hydra.TRUNK_FILE], [2], run_hydra)}
    for method in METHODS:
        table[method] = ([], [2, 4], lambda img, s, window, modality, method=method:
                         resize(img, (img.shape[0] * s, img.shape[1] * s), method))
    return table


def measure(images, table, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    report: dict = {}
    shown = display.Progress("eval qa", len(table), unit="models", every_s=10)
    for done, (name, (_, scales, fn)) in enumerate(table.items()):
        shown.update(done, note=name)
        rows: dict[str, list[float]] = {"clean": [], **{f"noise {n:.0%}": [] for n in NOISE}}
        per_modality: dict[str, list[float]] = {}
        started = time.perf_counter()
        for modality, image, window in images:
            outside = valid_field._outside_reconstruction(image) if modality == "CT" else None
            source = image.copy()
            if outside is not None:  # the decoder gives the outside the darkest real value
                source[outside] = image[~outside].min()
            for s in scales:
                out = fn(source, s, window, modality)
                if out is None:
                    continue
                out = guard(np.asarray(out, np.float32), source, modality)
                span = float(source.max() - source.min())
                for key in rows:
                    noisy = out if key == "clean" else \
                        out + rng.normal(0, float(key.split()[1][:-1]) / 100 * span, out.shape).astype(np.float32)
                    psnr = qa.consistency([qa.Pair(source, noisy, outside, False)])["psnr_db"]
                    rows[key].append(psnr)
                    if key == "clean":
                        per_modality.setdefault(modality, []).append(psnr)
        clean = np.array(rows["clean"])
        report[name] = {
            "scales": scales, "images": int(clean.size), "seconds": round(time.perf_counter() - started, 1),
            "min_db": round(float(clean.min()), 2), "median_db": round(float(np.median(clean)), 2),
            "max_db": round(float(clean.max()), 2),
            "min_db_by_modality": {m: round(float(min(v)), 2) for m, v in per_modality.items()},
            **{f"{k} median_db": round(float(np.median(v)), 2) for k, v in rows.items() if k != "clean"},
            **{f"{k} max_db": round(float(np.max(v)), 2) for k, v in rows.items() if k != "clean"},
            "threshold_db": math.floor((float(clean.min()) - MARGIN_DB) * 2) / 2,
        }
        shown.write(f"{name}: min {report[name]['min_db']} dB, median {report[name]['median_db']} dB, "
                    f"threshold {report[name]['threshold_db']} dB")
    shown.update(len(table))
    shown.close()
    return report


def markdown(report: dict, command: str, counts: dict) -> str:
    lines = [f"{SECTION}s (`{command}`)", "",
             "Consistency PSNR (dB) of each model's outputs on held-out images at their own resolution ("
             + ", ".join(f"{m} {n}" for m, n in counts.items()) + "): the output degraded back to the input grid "
             f"by {qa.DEGRADATION}, against the input, inside the valid field, peak = the input's span; the "
             f"value guard applied as in the pipelines. Threshold = lowest - {MARGIN_DB:g} dB, rounded down to "
             "0.5 dB. The noise columns: the same outputs with Gaussian noise of that fraction of the span "
             "added (the highest PSNR such a corrupted output reached).", "",
             "| model | scales | images | min | median | max | noise 1 % max | noise 3 % max | threshold |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in report.items():
        lines.append(f"| {name} | {', '.join(f'x{s}' for s in r['scales'])} | {r['images']} | {r['min_db']:.2f} | "
                     f"{r['median_db']:.2f} | {r['max_db']:.2f} | {r['noise 1% max_db']:.2f} | "
                     f"{r['noise 3% max_db']:.2f} | **{r['threshold_db']:.1f}** |")
    return "\n".join(lines) + "\n"


def set_card_section(path: Path, text: str) -> None:
    """Replace (or add) the QA section of a model card, before its evaluation section."""
    weights.set_section(path, SECTION, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="srnode eval qa", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=volume_data.default_data_dir())
    parser.add_argument("--cxr-data", type=Path, default=cxr_data.default_data_dir())
    parser.add_argument("--weights", type=Path, default=weights.weights_dir())
    parser.add_argument("--per-source", type=int, default=3, help="images per held-out source (CXR films, "
                                                                  "slices per test volume)")
    parser.add_argument("--out", type=Path, default=weights.weights_dir() / "eval")
    parser.add_argument("--update-cards", action="store_true",
                        help="write qa_thresholds.json into the weights folder and the section into the cards")
    args = parser.parse_args(argv)
    command = "srnode eval qa " + " ".join(argv if argv is not None else sys.argv[1:])
    images = held_out(args.cxr_data, args.data, args.per_source)
    counts: dict[str, int] = {}
    for modality, _, _ in images:
        counts[modality] = counts.get(modality, 0) + 1
    table = runners(args.weights)
    report = measure(images, table)
    text = markdown(report, command.replace(" --update-cards", ""), counts)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "qa_eval.json").write_text(json.dumps({"command": command, "images": counts,
                                                           "models": report}, indent=1) + "\n")
        (args.out / "qa_eval.md").write_text(text)
    if args.update_cards:
        thresholds = {"command": command.replace(" --update-cards", ""), "degradation": qa.DEGRADATION,
                      "margin_db": MARGIN_DB, "models": {}, "interpolation": {}}
        for name, (files, _, _) in table.items():
            entry = {"threshold_db": report[name]["threshold_db"], "min_db": report[name]["min_db"],
                     "images": report[name]["images"]}
            if files:
                thresholds["models"][name] = {"sha256": weights.sha256(args.weights / name), **entry}
                set_card_section(args.weights / name, text)
            else:
                thresholds["interpolation"][name] = entry
        (args.weights / qa.THRESHOLDS_FILE).write_text(json.dumps(thresholds, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
