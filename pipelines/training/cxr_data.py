"""The chest X-ray training data (``shared/data/cxr``): splits, loading, and the SR degradation.

Splits (deterministic, by file name):
  * ``test``: the manifest's ``val`` rows (22 JSRT images). Held out: never trained on and never
    used to choose a checkpoint or a threshold. Every reported figure is on this split.
  * ``val``: every 7th of the manifest's ``train`` rows, sorted by name, for choosing checkpoints
    and the abnormality operating threshold.
  * ``train``: the other ``train`` rows, plus the 10 Shenzhen normals (no split in the manifest).

Degradation, the same in training and evaluation: downscale by the factor with antialiased cubic
(Keys a=-0.5, Pillow's BICUBIC convention; ``pipelines.models.interpolation``), then cubic back up to
the original size. That interpolated image is the trunk's input, and the original is the target.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.models.interpolation import resize

SCALES = (2, 3, 4, 8)
VAL_EVERY = 7


def default_data_dir() -> Path:
    """``$SRNODE_CXR_DATA``, else ``shared/data/cxr`` next to the repository."""
    env = os.environ.get("SRNODE_CXR_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data" / "cxr"


@dataclass(frozen=True)
class Sample:
    name: str
    image: Path
    mask: Path | None
    abnormal: bool
    source: str


def load_split(data_dir: Path, split: str) -> list[Sample]:
    """The samples of ``train``, ``val`` or ``test`` (see the module docstring)."""
    manifest = Path(data_dir) / "manifest.csv"
    if not manifest.exists():
        raise FileNotFoundError(f"no CXR manifest at {manifest} (set SRNODE_CXR_DATA or --data)")
    rows = sorted(csv.DictReader(manifest.open()), key=lambda r: r["file"])
    chosen = []
    train_rows = [r for r in rows if r["split"] == "train"]
    for row in rows:
        if split == "test":
            keep = row["split"] == "val"
        elif split == "val":
            keep = row["split"] == "train" and train_rows.index(row) % VAL_EVERY == 0
        elif split == "train":
            keep = row["split"] == "" or (row["split"] == "train" and train_rows.index(row) % VAL_EVERY != 0)
        else:
            raise ValueError(f"unknown split {split!r}: train, val or test")
        if keep:
            mask = Path(data_dir) / row["mask"] if row.get("mask") else None
            chosen.append(Sample(row["file"], Path(data_dir) / row["file"], mask if mask and mask.exists() else None,
                                 row["label"] == "abnormal", row["source"]))
    return chosen


def read_image(path: Path) -> np.ndarray:
    """A PNG as float32 in [0, 1]."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("L") if im.mode not in ("L", "I;16", "I") else im)
    top = 65535.0 if arr.dtype == np.uint16 or arr.max() > 255 else 255.0
    return arr.astype(np.float32) / top


def read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return (np.asarray(im.convert("L")) > 127).astype(np.float32)


def crop_to_multiple(x: np.ndarray, factor: int) -> np.ndarray:
    """Crop the last two axes (bottom/right) to multiples of ``factor``."""
    h, w = x.shape[-2] // factor * factor, x.shape[-1] // factor * factor
    return x[..., :h, :w]


def degrade(hr: np.ndarray, scale: int, method: str = "cubic") -> np.ndarray:
    """The trunk's input for target ``hr`` (..., H, W), H and W multiples of ``scale``: antialiased
    cubic downscale by ``scale``, then ``method`` back up to (H, W)."""
    h, w = hr.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"image {h}x{w} is not a multiple of the scale {scale}: crop it first")
    low = resize(hr, (h // scale, w // scale), "cubic")
    return upsample(low, scale, method)


def upsample(low: np.ndarray, scale: float, method: str = "cubic") -> np.ndarray:
    h, w = low.shape[-2:]
    return resize(low, (round(h * scale), round(w * scale)), method)
