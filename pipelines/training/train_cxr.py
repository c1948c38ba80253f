"""Train the Hydra trunk and its heads on ``shared/data/cxr``: seeded, with progress and a loss log.

    python -m pipelines.training.train_cxr trunk [--width reduced|paper] [--steps N] [--seed S] [--out weights/]
    python -m pipelines.training.train_cxr heads [--steps N] [--seed S] [--out weights/]

``srnode train cxr ...`` runs the same. CUDA is used when present. Each run writes its weights
with a model card (``pipelines.weights``) and a CSV of its losses next to them. The heads train
on a frozen trunk (the one in ``--out``), as in the paper.

Reduced CPU budget (the defaults, documented in the model cards): the trunk at reduced width,
7000 steps of 4 crops of 72 px x 4 scales (Adam 1e-3); the heads 2400 steps (lungs) and 300
epochs (abnormality) on features computed once at x2.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipelines import progress as display, weights
from pipelines.cxr import trunk_tiled
from pipelines.evaluation.image_metrics import psnr, sr_loss
from pipelines.models import hydra, parameter_count
from pipelines.training import cxr_data
from pipelines.training.common import Progress, adam_cosine, device, seed_everything

log = logging.getLogger(__name__)

TRUNK_FILE, LUNGS_FILE, ABNORMALITY_FILE = hydra.TRUNK_FILE, hydra.LUNGS_FILE, hydra.ABNORMALITY_FILE
TRUNK_STEPS, LUNG_STEPS = 7000, 2400
LUNG_SHIFT = 8  # grid cells (32 source px on a 512-px film): the lung head's shift augmentation
HEAD_SCALE = 2  # heads learn from the trunk's features of a source upsampled x2
CROP = 72  # a multiple of every training scale (2, 3, 4, 8), over 3x the trunk's 21-px receptive field


# -- trunk ------------------------------------------------------------------------------------
def trunk_batch(images: list[np.ndarray], rng: np.random.Generator, crops: int,
                size: int = CROP) -> tuple[torch.Tensor, torch.Tensor]:
    """``crops`` random HR crops, each degraded at every scale: (inputs, targets), (crops*4, 1, size, size)."""
    hr = []
    for _ in range(crops):
        img = images[rng.integers(len(images))]
        y, x = rng.integers(0, img.shape[0] - size + 1), rng.integers(0, img.shape[1] - size + 1)
        crop = img[y:y + size, x:x + size]
        hr.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
    hr = np.stack(hr)
    inputs = np.concatenate([cxr_data.degrade(hr, s) for s in cxr_data.SCALES])
    targets = np.concatenate([hr] * len(cxr_data.SCALES))
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[:, None]  # noqa: E731
    return as_tensor(inputs), as_tensor(targets)


def centre(img: np.ndarray, size: int) -> np.ndarray:
    y, x = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
    return img[y:y + size, x:x + size]


@torch.no_grad()
def validate_trunk(model: hydra.HydraTrunk, val: list[np.ndarray], dev: torch.device) -> float:
    """Mean PSNR gain over cubic (dB) on 240-px centre crops of the validation split, all scales."""
    model.eval()
    hr = np.stack([centre(img, 240) for img in val])
    gains = []
    for s in cxr_data.SCALES:
        inp = torch.from_numpy(cxr_data.degrade(hr, s))[:, None].to(dev)
        target = torch.from_numpy(hr)[:, None].to(dev)
        out, _ = model(inp)
        gains.append((psnr(out.clamp(0, 1), target) - psnr(inp, target)).mean().item())
    model.train()
    return float(np.mean(gains))


def train_trunk(data_dir: Path, out_dir: Path, widths: tuple[int, ...], steps: int, seed: int,
                crops: int = 4, lr: float = 1e-3, crop: int = CROP) -> Path:
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    dev = device()
    train = [cxr_data.read_image(s.image) for s in cxr_data.load_split(data_dir, "train")]
    val = [cxr_data.read_image(s.image) for s in cxr_data.load_split(data_dir, "val")]
    config = hydra.TrunkConfig(widths=tuple(widths))
    model = hydra.HydraTrunk(config).to(dev)
    opt, sched = adam_cosine(model.parameters(), lr, steps)
    progress = Progress("trunk", steps, out_dir / "logs" / "cxr_hydra_trunk.csv")
    best, best_state = -math.inf, None
    for step in range(1, steps + 1):
        inputs, targets = trunk_batch(train, rng, crops, crop)
        out, _ = model(inputs.to(dev))
        loss = sr_loss(out, targets.to(dev))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        val_gain = None
        if step % 100 == 0 or step == steps:
            val_gain = validate_trunk(model, val, dev)
            if val_gain > best:
                best, best_state = val_gain, {k: v.detach().clone() for k, v in model.state_dict().items()}
        progress.step(step, loss.item(), val_gain)
    seconds = progress.close()
    recipe = {
        "steps": steps, "seed": seed, "batch": crops * len(cxr_data.SCALES), "crop": crop,
        "scales": list(cxr_data.SCALES), "optimizer": f"Adam {lr}, cosine to 10%",
        "loss": "0.6 MAE + 0.4 (1 - MS-SSIM, 3 levels, 7-px window)",
        "degradation": "antialiased cubic down (Keys a=-0.5), cubic up", "device": str(dev),
        "train_images": len(train), "best_val_gain_db": round(best, 4), "seconds": round(seconds),
    }
    path = out_dir / TRUNK_FILE
    weights.save(path, best_state, {"model": "hydra-trunk", **config.to_dict(), "recipe": recipe},
                 trunk_card(config, recipe, parameter_count(model)))
    log.info("trunk saved to %s (best validation gain over cubic %.3f dB)", path, best)
    return path


def trunk_card(config: hydra.TrunkConfig, recipe: dict, params: int) -> str:
    return f"""# Hydra SR trunk for chest X-rays (widths {list(config.widths)}, {params:,} parameters)

Super-resolution trunk of Zamzmi et al. 2020 (Hydra), our PyTorch implementation (`pipelines/models/hydra.py`),
trained by `python -m pipelines.training.train_cxr trunk` (`pipelines/training/train_cxr.py`).

**Research use only.** Trained on JSRT chest radiographs (and 10 Shenzhen normals) from `shared/data/cxr`:
the JSRT / SCR terms apply (research, no redistribution of the images, no clinical use).

## Recipe
```json
{json.dumps(recipe, indent=1, sort_keys=True)}
```
Crops of {recipe["crop"]} px: the trunk's receptive field is 21 px, so small crops lose little context and
buy many more steps per CPU minute than the full 512-px images would.

## Data and split
{DATA_SPLIT}

## Known limits
{"Reduced" if list(config.widths) != list(hydra.PAPER_WIDTHS) else "Paper"} width, trained for \
{recipe["seconds"] / 60:.0f} min on {recipe["device"]}; the paper-width model on a GPU is the next step. Training images
are JSRT display PNGs; DICOM input is mapped linearly (0.5-99.5 percentiles) before the trunk (`pipelines/cxr.py`).
Where it stands against the project's targets: the evaluation below.

## Evaluation
Written by `srnode eval cxr --update-cards` (held-out test split).
"""


DATA_SPLIT = """159 training images (JSRT `train` rows of `shared/data/cxr/manifest.csv` except every 7th, plus 10
Shenzhen normals), 25 validation images (every 7th JSRT `train` row, for the best checkpoint and the
abnormality threshold), 22 test images (the manifest's `val` rows; never trained on or used for selection).
512x512 8-bit PNGs, 0.70 mm pixels; lung masks from JSRT/SCR."""


# -- heads ------------------------------------------------------------------------------------
@torch.no_grad()
def head_features(trunk: hydra.HydraTrunk, samples: list[cxr_data.Sample], grid: int,
                  scale: int = HEAD_SCALE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pooled features (N, C, g, g), masks on the grid (N, 1, g, g), labels (N,)) for each sample,
    from the trunk's features of the image upsampled by ``scale`` (what the pipeline does)."""
    feats, masks, labels = [], [], []
    shown = display.Progress("features", len(samples), unit="images", every_s=10)
    for i, sample in enumerate(samples):
        img = cxr_data.read_image(sample.image)
        feats.append(trunk_tiled(trunk, cxr_data.upsample(img, scale), grid)[1].cpu())
        mask = cxr_data.read_mask(sample.mask) if sample.mask else np.zeros_like(img)
        masks.append(hydra.pool_features(torch.from_numpy(mask)[None, None], grid))
        labels.append(int(sample.abnormal))
        shown.update(i + 1)
    shown.close()
    return torch.cat(feats), torch.cat(masks), torch.tensor(labels)


def cached_head_features(trunk: hydra.HydraTrunk, trunk_digest: str, data_dir: Path, grid: int,
                         cache: Path | None) -> dict:
    """:func:`head_features` of the train and val splits, from ``cache`` when it holds them for this
    trunk and grid (computing them is most of a head run's time on a CPU), else computed (and
    saved there when ``cache`` is given)."""
    key = {"trunk_sha256": trunk_digest, "grid": grid, "data": str(Path(data_dir).resolve())}
    if cache is not None and cache.exists():
        stored = torch.load(cache)
        if stored["key"] == key:
            log.info("head features from %s", cache)
            return stored["data"]
    splits = {name: cxr_data.load_split(data_dir, name) for name in ("train", "val")}
    data = {name: head_features(trunk, samples, grid) for name, samples in splits.items()}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "data": data}, cache)
    return data


def train_heads(data_dir: Path, out_dir: Path, steps: int, seed: int, grid: int = 128, epochs: int = 300,
                which: tuple[str, ...] = ("lungs", "abnormality"), cache: Path | None = None,
                lung_film: bool = True, lung_loss: str = "bce+dice") -> None:
    seed_everything(seed)
    dev = device()
    trunk = hydra.load_trunk(out_dir / TRUNK_FILE).to(dev)
    for p in trunk.parameters():
        p.requires_grad_(False)
    trunk_digest = weights.sha256(out_dir / TRUNK_FILE)
    data = cached_head_features(trunk, trunk_digest, data_dir, grid, cache)
    if "lungs" in which:
        films = None
        if lung_film:  # the film itself on the grid: cheap, so not cached
            films = {name: torch.cat([hydra.film_on_grid(cxr_data.read_image(s.image), (grid, grid))
                                      for s in cxr_data.load_split(data_dir, name)]) for name in ("train", "val")}
        _train_lungs(data, out_dir, trunk.feature_channels, grid, steps, seed, trunk_digest, dev, films=films,
                     loss_name=lung_loss)
    if "abnormality" in which:
        _train_abnormality(data, out_dir, trunk.feature_channels, epochs, seed, trunk_digest, dev)


LUNG_LOSSES = {
    "bce": "BCE on the lung mask averaged onto the grid",
    "bce+dice": "BCE + soft Dice (1 - Dice per film, batch mean) on the lung mask averaged onto the grid",
}


def lung_loss(logits: torch.Tensor, target: torch.Tensor, name: str) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(logits, target)
    if name == "bce+dice":
        prob = torch.sigmoid(logits).flatten(1)
        target = target.flatten(1)
        dice = (2 * (prob * target).sum(1) + 1) / (prob.sum(1) + target.sum(1) + 1)
        loss = loss + (1 - dice).mean()
    return loss


def _train_lungs(data, out_dir: Path, channels: int, grid: int, steps: int, seed: int, trunk_digest: str,
                 dev: torch.device, batch: int = 8, lr: float = 1e-3, films: dict | None = None,
                 loss_name: str = "bce+dice") -> None:
    feats, masks, _ = data["train"]
    with_mask = [i for i in range(len(feats)) if masks[i].sum() > 0]
    head = hydra.LungHead(channels, grid, film=films is not None)
    head.standardise.fit(feats, dims=(0, 2, 3))
    if films is not None:  # shifted with the features as one more channel
        feats = torch.cat([feats, films["train"]], dim=1)
    val_feats, val_masks = data["val"][:2]
    val_films = films["val"] if films is not None else None
    head = head.to(dev)
    opt, sched = adam_cosine(head.parameters(), lr, steps)
    gen = torch.Generator().manual_seed(seed)
    progress = Progress("lungs", steps, out_dir / "logs" / "cxr_hydra_lungs.csv")
    best, best_state = -math.inf, None
    for step in range(1, steps + 1):
        idx = torch.tensor(with_mask)[torch.randint(len(with_mask), (batch,), generator=gen)]
        x, target = shifted(feats[idx], masks[idx], gen)
        x, film = (x[:, :channels], x[:, channels:]) if films is not None else (x, None)
        loss = lung_loss(head(x.to(dev), None if film is None else film.to(dev)), target.to(dev), loss_name)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        val = None
        if step % 50 == 0 or step == steps:
            val = _grid_iou(head, val_feats, val_masks, dev, val_films)
            if val > best:
                best, best_state = val, {k: v.detach().clone() for k, v in head.state_dict().items()}
        progress.step(step, loss.item(), val)
    seconds = progress.close()
    recipe = {"steps": steps, "seed": seed, "batch": batch, "optimizer": f"Adam {lr}, cosine to 10%",
              "loss": LUNG_LOSSES[loss_name], "film_channel": films is not None,
              "augmentation": f"batch shifted by up to {LUNG_SHIFT} grid cells each way, edges replicated",
              "trunk_scale": HEAD_SCALE,
              "best_val_grid_iou": round(best, 4), "seconds": round(seconds), "trunk_sha256": trunk_digest}
    config = {"model": "hydra-lungs", "channels": channels, "grid": grid, "film": films is not None,
              "decoder_dilations": list(hydra.DECODER_DILATIONS), "recipe": recipe}
    weights.save(out_dir / LUNGS_FILE, best_state, config, head_card("lung segmentation", recipe, parameter_count(head),
                                                                  HEAD_NOTES["lungs"]))


def shifted(feats: torch.Tensor, masks: torch.Tensor, gen: torch.Generator,
            limit: int = LUNG_SHIFT) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and masks moved together by a random whole number of grid cells (up to ``limit``
    each way), edges replicated: patients do not all stand in the same place, and the head's
    position channels should not learn one placement. Convolutions commute with whole-cell shifts, so
    this equals recomputing the trunk on a shifted film, away from the edges."""
    dy, dx = (int(v) for v in torch.randint(-limit, limit + 1, (2,), generator=gen))
    h, w = feats.shape[-2:]

    def move(x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, (limit,) * 4, mode="replicate")
        return padded[..., limit + dy:limit + dy + h, limit + dx:limit + dx + w]

    return move(feats), move(masks)


@torch.no_grad()
def _grid_iou(head: hydra.LungHead, feats: torch.Tensor, masks: torch.Tensor, dev: torch.device,
              films: torch.Tensor | None = None) -> float:
    head.eval()
    pred = torch.cat([head(feats[i:i + 8].to(dev), None if films is None else films[i:i + 8].to(dev)).cpu()
                      for i in range(0, len(feats), 8)]) > 0
    truth = masks > 0.5
    head.train()
    inter = (pred & truth).flatten(1).sum(1).float()
    union = (pred | truth).flatten(1).sum(1).float().clamp_min(1)
    return (inter / union).mean().item()


def _train_abnormality(data, out_dir: Path, channels: int, epochs: int, seed: int, trunk_digest: str,
                       dev: torch.device, batch: int = 8, lr: float = 1e-3) -> None:
    from pipelines.evaluation.eval_metrics import roc_auc, youden_threshold

    gap = {name: feats.mean(dim=(2, 3)) for name, (feats, _, _) in data.items()}
    labels = {name: lab for name, (_, _, lab) in data.items()}
    head = hydra.AbnormalityHead(channels)
    head.standardise.fit(gap["train"], dims=(0,))
    head = head.to(dev)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    progress = Progress("abnormality", epochs, out_dir / "logs" / "cxr_hydra_abnormality.csv", every=25)
    x_train, y_train, x_val = gap["train"].to(dev), labels["train"].to(dev), gap["val"].to(dev)
    best, best_state = -math.inf, None
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(head(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            val_auc = roc_auc(hydra.abnormal_probability(head(x_val)).cpu().numpy(), labels["val"].numpy())
        head.train()
        if best_state is None or val_auc > best:  # AUC is NaN when the validation split has one class
            best, best_state = val_auc, {k: v.detach().clone() for k, v in head.state_dict().items()}
        progress.step(epoch, loss.item(), val_auc if epoch % 25 == 0 else None)
    seconds = progress.close()
    head.load_state_dict(best_state)
    head.eval()
    with torch.no_grad():
        val_prob = hydra.abnormal_probability(head(x_val)).cpu().numpy()
    threshold = youden_threshold(val_prob, labels["val"].numpy())
    recipe = {"epochs": epochs, "seed": seed, "batch": batch, "optimizer": f"Adam {lr}",
              "loss": "cross-entropy (normal, abnormal)", "trunk_scale": HEAD_SCALE,
              "best_val_auc": round(best, 4), "threshold_from": "Youden's J on the validation split",
              "seconds": round(seconds), "trunk_sha256": trunk_digest}
    config = {"model": "hydra-abnormality", "channels": channels, "threshold": round(float(threshold), 4),
              "recipe": recipe}
    weights.save(out_dir / ABNORMALITY_FILE, best_state, config,
                 head_card("abnormality (JSRT nodule vs no nodule)", recipe, parameter_count(head),
                           HEAD_NOTES["abnormality"]))


HEAD_NOTES = {
    "lungs": """Features: the frozen trunk's 6th conv on the image upsampled x2 (cubic), averaged onto a
128-px grid and standardised per channel (training-split mean and std, stored in the weights), plus two
channels of row/column position, and (`film_channel` in the recipe) the film itself averaged onto the grid and
standardised per film; target: the mask averaged onto the same grid. Decoder dilations 1-2-4-8-16-1 (context).
In use, the probabilities upsampled from the grid are edge-aligned with the film by a guided filter (no training;
`hydra.lung_probability`), and the mask is cleaned after (two largest pieces, holes filled, nothing outside the
thorax: `hydra.within_thorax`).
Trained on x2 features of 512-px films only: the `cxr` pipeline always feeds the heads that geometry
(the film resampled to a 512-px long side, then x2; `cxr.heads_input`).""",
    "abnormality": """Label: JSRT nodule (abnormal) vs no nodule (normal); the 10 Shenzhen normals are in training.
Input: the globally averaged 6th-conv features of the x2 forward, standardised with the training split's
mean and std (stored in the weights). Threshold: Youden's J on the validation split. The test split has 22
images (13 abnormal), so its AUC has a wide uncertainty (roughly +-0.18 at 95%).""",
}


def head_card(task: str, recipe: dict, params: int, notes: str) -> str:
    return f"""# Hydra head: {task} ({params:,} parameters)

A head on the frozen Hydra trunk (`cxr_hydra_trunk.safetensors`, sha256 in the recipe), our PyTorch
implementation (`pipelines/models/hydra.py`), trained by `python -m pipelines.training.train_cxr heads`.

**Research use only; not a medical device.** Trained on JSRT chest radiographs (and 10 Shenzhen normals) from
`shared/data/cxr`: the JSRT / SCR terms apply. The abnormality finding is written UNVERIFIED.

## Recipe
```json
{json.dumps(recipe, indent=1, sort_keys=True)}
```

## Data and split
{DATA_SPLIT}
{notes}

## Evaluation
Written by `srnode eval cxr --update-cards` (held-out test split).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="srnode train cxr", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["trunk", "heads", "lung-bounds"])
    parser.add_argument("--data", type=Path, default=cxr_data.default_data_dir())
    parser.add_argument("--out", type=Path, default=weights.weights_dir())
    parser.add_argument("--width", choices=["reduced", "paper"], default="reduced")
    parser.add_argument("--steps", type=int, help=f"trunk: {TRUNK_STEPS}, heads (lungs): {LUNG_STEPS}")
    parser.add_argument("--epochs", type=int, default=300, help="abnormality head epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["lungs", "abnormality"],
                        help="heads: train this head only (the other's weights stay as they are)")
    parser.add_argument("--lung-film", choices=["yes", "no"], default="yes",
                        help="lung head: the film averaged onto the grid as one more input channel")
    parser.add_argument("--lung-loss", choices=sorted(LUNG_LOSSES), default="bce+dice")
    parser.add_argument("--features-cache", type=Path,
                        help="heads: keep the trunk features of the train/val films in this file and reuse them "
                             "while the trunk and grid are the same")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.what == "trunk":
        widths = hydra.REDUCED_WIDTHS if args.width == "reduced" else hydra.PAPER_WIDTHS
        train_trunk(args.data, args.out, widths, args.steps or TRUNK_STEPS, args.seed)
    elif args.what == "heads":
        which = (args.only,) if args.only else ("lungs", "abnormality")
        train_heads(args.data, args.out, args.steps or LUNG_STEPS, args.seed, epochs=args.epochs, which=which,
                    cache=args.features_cache, lung_film=args.lung_film == "yes", lung_loss=args.lung_loss)
        if "lungs" in which:
            store_lung_bounds(args.data, args.out)
    else:
        store_lung_bounds(args.data, args.out)
    return 0


def store_lung_bounds(data_dir: Path, out_dir: Path) -> dict:
    """The plausible-lungs bounds (``hydra.lung_bounds``) of the training split's reference masks,
    written into the lung head's config: the ``cxr`` pipeline writes no SEG and no finding for a
    mask outside them."""
    masks = [cxr_data.read_mask(s.mask) > 0.5 for s in cxr_data.load_split(data_dir, "train") if s.mask]
    bounds = hydra.lung_bounds(masks)
    weights.update_config(out_dir / LUNGS_FILE, lung_bounds=bounds)
    log.info("lung bounds from %d training masks: %s", len(masks), bounds)
    return bounds


if __name__ == "__main__":
    sys.exit(main())
