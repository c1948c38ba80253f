"""``srnode eval sr3d --degradations``: in-plane x2 on the held-out volumes under each way of making the LR image.

Every axial slice of each ``test`` volume of :mod:`pipelines.training.volume_data` is degraded x2 in-plane
on the modality values by each of :data:`volume_data.DEGRADATIONS` (antialiased cubic, the shipped
training degradation; area averaging; a Gaussian PSF of :func:`volume_data.psf_sigma` HR pixels then
decimation; antialiased linear; antialiased Lanczos), optionally with Gaussian noise of a fraction of
the intensity window (fixed seed), and brought back by cubic, Lanczos and the in-plane x2 CNN exactly as
the pipeline runs it. PSNR / SSIM as in :mod:`pipelines.evaluation.volume_eval`. The CT volumes are
labelled by body region: the chest CT is a region no training CT shows (head, head phantom, abdomen).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pipelines import progress as display, weights
from pipelines.evaluation.volume_eval import metrics
from pipelines.models import intensity
from pipelines.models.interpolation import resize
from pipelines.models.sr3d_cnn import INPLANE_FILES
from pipelines.models.volume_stream import cnn_upsampler, inplane_stream
from pipelines.sr3d import load_models
from pipelines.training import volume_data

SCALE = 2
NOISES = (0.0, 0.01)
HEADING = "## Per-degradation evaluation (in-plane x2)"
#: body region of each held-out volume, and whether a training volume shows that region
REGIONS = {
    "totalseg_basel_abdomen_ct": ("abdomen", True),
    "totalseg_aorta_chest_ct_1p5mm": ("chest", False),
    "ixi015_hh_1258_t1_2mm": ("brain", True),
    "decubitus_hfs_t1_sag": ("brain, sagittal", True),
}
METHODS = ("cubic", "lanczos", "cnn")


def evaluate(data_dir: Path, weights_dir: Path, noises=NOISES) -> dict:
    models = load_models(weights_dir)
    sources = volume_data.sources("test")
    report: dict = {"scale": SCALE, "psf_sigma_hr_px": volume_data.psf_sigma(SCALE), "noises": list(noises),
                    "degradations": list(volume_data.DEGRADATIONS), "volumes": {},
                    "weights": models.versions[INPLANE_FILES[SCALE]], "trained": trained_on(weights_dir)}
    shown = display.Progress("eval sr3d degradations", len(sources), unit="volumes", every_s=10)
    for done, source in enumerate(sources):
        raw = volume_data.read_volume(source, data_dir)
        window = intensity.normaliser(raw, source.modality)
        hr = volume_data.crop_to(raw, SCALE, (1, 2))
        up = cnn_upsampler(models.inplane[SCALE], window)
        region, trained = REGIONS.get(source.name, ("?", True))
        entry = {"modality": source.modality, "shape": list(raw.shape), "region": region,
                 "region_in_training": trained, "results": {}}
        for kind in volume_data.DEGRADATIONS:
            clean = volume_data.degrade(hr, SCALE, (1, 2), kind)
            for noise in noises:
                shown.update(done, note=f"{source.name}: {kind}, noise {noise:g}")
                lr = volume_data.add_noise(clean, noise, window[1] - window[0], np.random.default_rng(0))
                out = {m: metrics(resize(lr, hr.shape[1:], m), hr, window) for m in ("cubic", "lanczos")}
                out["cnn"] = metrics(np.stack(list(inplane_stream(lr, SCALE, up))), hr, window)
                entry["results"][f"{kind} noise {noise:g}"] = {
                    m: {k: round(float(v), 4) for k, v in r.items()} for m, r in out.items()}
        report["volumes"][source.name] = entry
    shown.update(len(sources), note="")
    shown.close()
    return report


def trained_on(weights_dir: Path) -> str:
    """The degradation line of the in-plane model's card (its Recipe section)."""
    card = weights.card_path(weights_dir / INPLANE_FILES[SCALE]).read_text()
    found = [line for line in card.splitlines() if line.startswith("Degradation:")]
    if not found:
        return "(not stated in the card)"
    start = card.index(found[0])
    paragraph = " ".join(card[start:].split("\n\n")[0].split()).removeprefix("Degradation: ")
    return re.split(r"(?<=\.) (?=Batch|Recipe)", paragraph)[0]


def _gain(r: dict, base: str) -> float:
    return r["cnn"]["psnr"] - r[base]["psnr"]


def markdown(report: dict) -> str:
    kinds, noises = report["degradations"], report["noises"]
    sigma = report["psf_sigma_hr_px"]
    label = {k: (f"gaussian PSF {sigma:g} px" if k == "gaussian" else k) for k in kinds}
    lines = [HEADING, "",
             f"In-plane x{report['scale']} on the held-out volumes ({report['weights']}), LR made by each degradation "
             f"on the modality values: antialiased cubic / linear / Lanczos downscaling, area = the mean of each 2x2 "
             f"block, gaussian = a Gaussian PSF of sigma {sigma:g} HR px sampled at the LR pixel centres; noise = "
             f"Gaussian, that fraction of the intensity window (CT 4000 HU: 1 % = 40 HU), fixed seed. Trained on: "
             f"{report['trained']} Reproduce: `srnode eval sr3d --degradations`.", ""]
    for noise in noises:
        key = lambda k: f"{k} noise {noise:g}"  # noqa: E731
        lines += [f"### CNN gain in dB over Lanczos / over bicubic, noise {noise:g}", "",
                  "| volume | " + " | ".join(label[k] for k in kinds) + " |", "|---|" + "---|" * len(kinds)]
        for name, v in report["volumes"].items():
            region = v["region"] + ("" if v["region_in_training"] else ", region not trained on")
            cells = [f"{_gain(v['results'][key(k)], 'lanczos'):+.2f} / {_gain(v['results'][key(k)], 'cubic'):+.2f}"
                     for k in kinds]
            lines.append(f"| {name} ({v['modality']}, {region}) | " + " | ".join(cells) + " |")
        for modality in dict.fromkeys(v["modality"] for v in report["volumes"].values()):
            rows = [v["results"] for v in report["volumes"].values() if v["modality"] == modality]
            cells = [f"{np.mean([_gain(r[key(k)], 'lanczos') for r in rows]):+.2f} / "
                     f"{np.mean([_gain(r[key(k)], 'cubic') for r in rows]):+.2f}" for k in kinds]
            lines.append(f"| **{modality} mean** | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### PSNR (dB) / SSIM per volume and degradation", "",
              "| volume | degradation | noise | bicubic | Lanczos | CNN |", "|---|---|---|---|---|---|"]
    for name, v in report["volumes"].items():
        for k in kinds:
            for noise in noises:
                r = v["results"][f"{k} noise {noise:g}"]
                cells = [f"{r[m]['psnr']:.2f} / {r[m]['ssim']:.4f}" for m in METHODS]
                lines.append(f"| {name} | {label[k]} | {noise:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
