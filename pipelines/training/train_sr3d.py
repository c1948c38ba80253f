"""Train the two-stage 3D SR CNNs on the CT and MR volumes of ``shared/data``: seeded, with progress and a loss log.

    python -m pipelines.training.train_sr3d inplane [--scale 2|4] [--recipe cpu|paper] [--steps N | --epochs E] [--seed S] [--out weights/]
    python -m pipelines.training.train_sr3d through [--recipe cpu|paper] [--steps N | --epochs E] [--seed S] [--out weights/]

``srnode train sr3d ...`` runs the same. CUDA is used when present. One model serves CT and MR:
each batch draws CT and MR patches half and half, from the ``train`` split of
:mod:`pipelines.training.volume_data`, intensities normalised as there.

Samples, as in the paper, are small patches: an HR patch of ``patch * scale`` pixels is blurred
(3x3 Gaussian, sigma ~ U(0, 0.5)) with probability 0.5, then downscaled with antialiased cubic.
In-plane models see slices in every direction of the isotropic volumes and the axial slices of
the others, downscaled on both axes. The through-plane model sees the same images downscaled on
the rows only: in the isotropic volumes every direction is a "depth" direction, and in-plane
slices teach the same one-axis task (the SMORE observation in ``shared/notes/sr-models.md``).
Random 90-degree rotations and flips; patches with almost no structure (air) are kept at a
quarter of their rate so the model still learns that flat stays flat.

``--degradations mix`` (the shipped weights use ``cubic``): each patch draws its own way of making the LR
image from :data:`MIX` (antialiased cubic, area averaging, a Gaussian PSF of sigma ~ U(0.5, 1.0) x factor/2
HR px then decimation, antialiased linear; :func:`volume_data.degrade`), after the same optional 3x3 blur,
and a fraction :data:`NOISE_P` of the LR patches gets Gaussian noise of sigma ~ U(0, 1 %) of the window.
Antialiased Lanczos downscaling is left out, so ``srnode eval sr3d --degradations`` has a degradation
no model was trained on.

``--degradations slab`` (through-plane only): a fraction :data:`SLAB_P` of the patches (drawn per patch) is
made as a scanner's thick slices, each LR row the mean of the ``scale`` HR rows it covers (box slice
profile, :func:`volume_data.degrade` kind ``slab``), the others by the antialiased cubic of the shipped
recipe; the same optional 3x3 blur before both. ``srnode eval sr3d --through`` measures both inputs.

Two recipes, named in the model card. ``cpu`` (the default, the shipped weights): batch 64 of
24-px LR patches (16 px at x4), Adam 1e-3 decayed along a cosine to 1e-4, ``STEPS`` steps.
``paper`` (for a GPU): the paper's batch 128 of 7-px LR patches, Adam 1e-4 and 1e-5 for the
second half, 40 epochs, an epoch being as many patches as the training slices hold side by side
(263,414 steps at x2 on the train split; measured 2026-12-01 on this 2-core CPU at 0.074 s a
step in-plane and 0.084 s through-plane: about 5.5 h and 6 h).
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines import weights
from pipelines.evaluation.image_metrics import psnr
from pipelines.training import volume_data
from pipelines.models import parameter_count
from pipelines.models.sr3d_cnn import (
    INPLANE_FILES,
    SRCNN,
    THROUGH_FILE,
    CNNConfig,
    intermediate_l1,
    lanczos_up,
)
from pipelines.training.common import Progress, adam_cosine, adam_step_decay, device, seed_everything

log = logging.getLogger(__name__)

STEPS = {("inplane", 2): 6000, ("inplane", 4): 3000, ("through", 2): 10000}
PAPER_EPOCHS = 40


@dataclass(frozen=True)
class Recipe:
    name: str
    batch: int
    lr_patch: dict[int, int]  # LR patch side per scale
    lr: float
    decay: str  # "cosine" to lr/10, or "step": lr/10 for the second half

    def optimiser(self, params, lr: float, steps: int):
        return (adam_cosine if self.decay == "cosine" else adam_step_decay)(params, lr, steps)

    def describe(self, lr: float) -> str:
        decay = (f"cosine decay to {lr / 10:g}" if self.decay == "cosine"
                 else f"{lr / 10:g} for the second half of the steps")
        return f"Adam {lr:g}, {decay}"


RECIPES = {
    "cpu": Recipe("cpu", 64, {2: 24, 4: 16}, 1e-3, "cosine"),
    "paper": Recipe("paper", 128, {2: 7, 4: 7}, 1e-4, "step"),
}
FLAT_STD = 0.01
FLAT_KEEP = 0.25
BLUR_P, BLUR_MAX_SIGMA = 0.5, 0.5
MIX = ("cubic", "area", "gaussian", "linear")
PSF_SIGMA = (0.5, 1.0)  # Gaussian PSF sigma range, HR px at x2 (scaled with the factor)
NOISE_P, NOISE_MAX = 0.3, 0.01
SLAB_P, SLAB_KIND = 0.5, "slab"  # --degradations slab: fraction of thick-slab patches, their profile
DEGRADATION_CHOICES = ("cubic", "mix", "slab")


class PatchSampler:
    """Random HR patches from the training volumes (see the module docstring)."""

    def __init__(self, volumes: list[tuple[volume_data.VolumeSource, np.ndarray]], rng: np.random.Generator):
        self.rng = rng
        self.by_modality: dict[str, list] = {}
        for source, volume in volumes:
            self.by_modality.setdefault(source.modality, []).append((source, volume))
        self.weights = {m: self._weights(items) for m, items in self.by_modality.items()}

    @staticmethod
    def _weights(items) -> np.ndarray:
        w = np.array([np.sqrt(v.size) for _, v in items])
        return w / w.sum()

    def patch(self, size: int) -> np.ndarray:
        modalities = sorted(self.by_modality)
        while True:
            m = modalities[self.rng.integers(len(modalities))]
            items = self.by_modality[m]
            source, vol = items[self.rng.choice(len(items), p=self.weights[m])]
            axis = int(self.rng.integers(3)) if source.isotropic else 0
            image = np.moveaxis(vol, axis, 0)
            if image.shape[1] < size or image.shape[2] < size:
                continue
            k = self.rng.integers(image.shape[0])
            y = self.rng.integers(image.shape[1] - size + 1)
            x = self.rng.integers(image.shape[2] - size + 1)
            patch = np.array(image[k, y:y + size, x:x + size])
            if patch.std() < FLAT_STD and self.rng.random() > FLAT_KEEP:
                continue
            patch = np.rot90(patch, self.rng.integers(4))
            return np.ascontiguousarray(patch[:, ::-1] if self.rng.random() < 0.5 else patch)

    def patches_per_epoch(self, size: int) -> int:
        """How many ``size``-px patches the training slices hold side by side, in the directions sampled."""
        total = 0
        for source, vol in sampler_volumes(self):
            for axis in (range(3) if source.isotropic else (0,)):
                depth, h, w = np.moveaxis(vol, axis, 0).shape
                total += depth * (h // size) * (w // size)
        return total

    def batch(self, n: int, scale: int, lr_patch: int, axes: int, blur: bool = True,
              degradations: str = "cubic") -> tuple[torch.Tensor, torch.Tensor]:
        """(LR inputs, HR targets) as (n, 1, h, w) tensors; ``degradations``: ``cubic``, ``mix`` or ``slab``."""
        hr = np.stack([self.patch(lr_patch * scale) for _ in range(n)])
        degraded = hr
        if blur:
            sigmas = np.where(self.rng.random(n) < BLUR_P, self.rng.uniform(0, BLUR_MAX_SIGMA, n), 0.0)
            degraded = volume_data.gaussian_blur3(hr, sigmas)
        lr_axes = (1, 2) if axes == 2 else (1,)
        if degradations == "mix":
            lr = np.stack([self.mixed(image, scale, lr_axes) for image in degraded])
        elif degradations == "slab":
            slab = self.rng.random(n) < SLAB_P
            lr = volume_data.downscale(degraded, scale, lr_axes)
            lr[slab] = volume_data.degrade(degraded[slab], scale, lr_axes, SLAB_KIND)
        else:
            lr = volume_data.downscale(degraded, scale, lr_axes)
        as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[:, None]  # noqa: E731
        return as_tensor(lr), as_tensor(hr)


    def mixed(self, image: np.ndarray, scale: int, lr_axes: tuple[int, ...]) -> np.ndarray:
        """One HR image degraded by a kind drawn from ``MIX``, with noise on a fraction ``NOISE_P``."""
        kind = MIX[self.rng.integers(len(MIX))]
        sigma = self.rng.uniform(*PSF_SIGMA) * scale / 2 if kind == "gaussian" else None
        lr = volume_data.degrade(image[None], scale, lr_axes, kind, sigma)[0]
        if self.rng.random() < NOISE_P:
            lr = volume_data.add_noise(lr, self.rng.uniform(0, NOISE_MAX), 1.0, self.rng)
        return lr


def load_training_volumes(data_dir: Path) -> list[tuple[volume_data.VolumeSource, np.ndarray]]:
    out = []
    for source in volume_data.sources("train"):
        vol = volume_data.load(source, data_dir)
        print(f"  {source.name}: {source.modality} {'x'.join(map(str, vol.shape))}", file=sys.stderr)
        out.append((source, vol))
    return out


@torch.no_grad()
def check_batch_gain(model: SRCNN, batch: tuple[torch.Tensor, torch.Tensor], dev: torch.device) -> float:
    """Mean PSNR gain over Lanczos (dB) on a fixed batch of training patches: progress only, never selection."""
    model.eval()
    lr, hr = (t.to(dev) for t in batch)
    out, _ = model(lr)
    base = lanczos_up(lr, model.config.scale, model.config.axes)
    model.train()
    return float((psnr(out.clamp(0, 1), hr) - psnr(base.clamp(0, 1), hr)).mean())


def check_arguments(kind: str, scale: int, recipe: str, steps: int | None, epochs: float | None,
                    degradations: str = "cubic") -> None:
    """ValueError naming what is wrong with a training request, before any data is read."""
    if kind == "through" and scale != 2:
        raise ValueError("the through-plane model is trained at x2 (x4 applies it twice, as in the paper)")
    if kind == "inplane" and scale not in INPLANE_FILES:
        raise ValueError(f"in-plane scales: {sorted(INPLANE_FILES)}")
    if recipe not in RECIPES:
        raise ValueError(f"recipes: {', '.join(sorted(RECIPES))}")
    if degradations == "slab" and kind != "through":
        raise ValueError("--degradations slab is a through-plane recipe (thick slices along the depth axis)")
    if epochs is not None and (recipe != "paper" or steps is not None):
        raise ValueError("epochs set the paper recipe's budget (instead of steps); the cpu recipe counts steps")


def train(kind: str, scale: int, data_dir: Path, out_dir: Path, steps: int | None, seed: int,
          lr: float | None = None, volumes: list[tuple[volume_data.VolumeSource, np.ndarray]] | None = None,
          recipe: str = "cpu", epochs: float | None = None, degradations: str = "cubic",
          init: Path | None = None) -> Path:
    """Train one model and write it with its card. ``steps`` None: ``STEPS`` for the cpu recipe, ``epochs``
    (default ``PAPER_EPOCHS``) for the paper's; ``lr`` None: the recipe's; ``volumes`` replaces the
    training split (tests); ``init``: start from these weights (fine-tuning) instead of Lanczos."""
    check_arguments(kind, scale, recipe, steps, epochs, degradations)
    seed_everything(seed)
    dev = device()
    axes = 2 if kind == "inplane" else 1
    config = CNNConfig(scale=scale, axes=axes)
    model = SRCNN(config)
    if init is not None:
        from pipelines.sr3d import load_cnn

        start = load_cnn(init)
        if start.config != config:
            raise ValueError(f"{init} is a {start.config} model, not {config}")
        model.load_state_dict(start.state_dict())
        init = f"{Path(init).name} (sha256 {weights.sha256(init)[:8]})"
    model = model.to(dev)
    print(f"{kind} x{scale}: {parameter_count(model):,} parameters on {dev}; loading volumes", file=sys.stderr)
    rng = np.random.default_rng(seed)
    sampler = PatchSampler(volumes if volumes is not None else load_training_volumes(data_dir), rng)
    plan = RECIPES[recipe]
    lr = plan.lr if lr is None else lr
    lr_patch = plan.lr_patch[scale]
    if steps is None and recipe == "cpu":
        steps = STEPS[(kind, scale)]
    elif steps is None:
        epochs = PAPER_EPOCHS if epochs is None else epochs
        per_epoch = sampler.patches_per_epoch(lr_patch * scale)
        steps = max(1, round(epochs * per_epoch / plan.batch))
        print(f"{recipe} recipe: {per_epoch:,} patches per epoch, {epochs:g} epochs = {steps:,} steps", file=sys.stderr)
    check = PatchSampler(sampler_volumes(sampler), np.random.default_rng(seed + 1)).batch(
        256, scale, lr_patch, axes, blur=False)
    opt, sched = plan.optimiser(model.parameters(), lr, steps)
    file_name = INPLANE_FILES[scale] if kind == "inplane" else THROUGH_FILE
    progress = Progress(f"{kind} x{scale}", steps, out_dir / "logs" / f"{Path(file_name).stem}.csv", every=50)
    for step in range(1, steps + 1):
        lr_batch, hr_batch = (t.to(dev) for t in sampler.batch(plan.batch, scale, lr_patch, axes,
                                                                degradations=degradations))
        out, mid = model(lr_batch)
        loss = intermediate_l1(out, mid, hr_batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        gain = check_batch_gain(model, check, dev) if step % 500 == 0 or step == steps else None
        progress.step(step, loss.item(), gain)
    seconds = progress.close()
    model.cpu()
    card = card_text(kind, config, plan, steps, seed, lr, seconds, parameter_count(model), str(dev), degradations,
                     init)
    meta = {"model": "sr3d-cnn", **config.to_dict()}
    weights.save(out_dir / file_name, model.state_dict(), meta, card)
    print(f"wrote {out_dir / file_name} ({seconds:.0f} s)", file=sys.stderr)
    return out_dir / file_name


def sampler_volumes(sampler: PatchSampler) -> list:
    return [item for items in sampler.by_modality.values() for item in items]


def card_text(kind: str, config: CNNConfig, plan: Recipe, steps: int, seed: int, lr: float, seconds: float,
              params: int, dev: str, degradations: str = "cubic", init: str | None = None) -> str:
    what = (f"In-plane x{config.scale}" if kind == "inplane" else "Through-plane x2 (one axis)")
    train_names = ", ".join(s.name for s in volume_data.sources("train"))
    test_names = ", ".join(s.name for s in volume_data.sources("test"))
    return f"""# sr3d: {what} CNN (Georgescu et al. 2020, with intermediate loss)

Two-stage 3D SR, `pipelines/models/sr3d_cnn.py`: 10 convs of {config.width} filters, skips 1->3 and 1->5, sub-pixel layer
after conv 6, convs 7-10 after it with a short skip; residual on a Lanczos upsampling of the input (convs 6 and 10
start at zero, so the untrained network is Lanczos). {params:,} trainable parameters.

## Data
Train split of `pipelines/training/volume_data.py` ({train_names}), one model for CT and MR (half the patches each).
Held out, never trained on: {test_names}. Sources and terms: `shared/data/LICENSES.md` (CT: Apache-2.0 / CC BY 4.0
TotalSegmentator, dcm_qa_ct; MR: studyforrest PDDL, MNI template, IXI CC BY-SA 3.0, dcm_qa). Not for clinical use.

## Recipe
Intensities: CT HU clipped to [-1024, 2976] -> [0, 1]; MR clipped per volume at the 0.5/99.5 percentiles.
Degradation: 3x3 Gaussian blur with sigma ~ U(0, 0.5) on half the samples, then {degradation_text(degradations)}
by {config.scale} on {"both image axes" if config.axes == 2 else "the rows (the depth axis of a view)"}{mix_noise(degradations)}.
Recipe `{plan.name}`: batch {plan.batch} patches of {plan.lr_patch[config.scale]} px (LR), rotations and flips, flat
(air) patches at a quarter of their rate. Loss L1(output) + L1(sub-pixel output). {plan.describe(lr)},
{steps} steps, seed {seed}, on {dev}: {seconds / 60:.1f} min{f", fine-tuned from {init}" if init else ""}. Reproduce: `srnode train sr3d {kind}{" --scale " + str(config.scale) if kind == "inplane" else ""}{" --recipe " + plan.name if plan.name != "cpu" else ""} --steps {steps} --seed {seed}{f" --lr {lr:g}" if lr != plan.lr else ""}{" --degradations " + degradations if degradations != "cubic" else ""}{" --init <those weights>" if init else ""}`.

## Known limits
- Trained to undo antialiased cubic downscaling (plus mild blur), not a scanner's slice profile or noise:
  on real thick-slice data the gain over Lanczos is not measured here (no thin/thick pairs in `shared/data`).
- Few training volumes (9), one model for CT and MR; held-out results are on 2 CT and 2 MR volumes.
- Brain MR not seen in training gains less than the MR means suggest (they are lifted by the decubitus volume):
  in-plane x2, retrained without one MR volume (2026-12-01, one seed), +1.04 dB over Lanczos on ixi012 (2 mm)
  and +1.26 dB on studyforrest (0.67 mm), against +1.37 / +1.51 with them in training.
- Research use only; not a medical device.

## Evaluation
Written by `srnode eval sr3d --update-cards` (held-out volumes; see weights/eval/sr3d_eval.md).
"""


def degradation_text(degradations: str) -> str:
    if degradations == "cubic":
        return "antialiased cubic downscaling"
    if degradations == "slab":
        return (f"per patch, {SLAB_P:.0%} thick slabs (each LR row the mean of the HR rows it covers: a box slice "
                f"profile of the factor's width) and {1 - SLAB_P:.0%} antialiased cubic downscaling")
    lo, hi = PSF_SIGMA
    return (f"per patch one of antialiased cubic, area averaging, a Gaussian PSF (sigma ~ U({lo:g}, {hi:g}) x factor/2 "
            "HR px) then decimation, antialiased linear downscaling")


def mix_noise(degradations: str) -> str:
    return "" if degradations in ("cubic", "slab") else (
        f"; Gaussian noise of sigma ~ U(0, {NOISE_MAX:.0%}) of the window on {NOISE_P:.0%} of the LR patches")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="srnode train sr3d", description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=["inplane", "through"])
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="cpu",
                        help="cpu: the shipped reduced budget; paper: Georgescu et al.'s configuration (for a GPU)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int)
    budget.add_argument("--epochs", type=float, help=f"paper recipe only (default {PAPER_EPOCHS})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, help="default: the recipe's (cpu 1e-3, paper 1e-4)")
    parser.add_argument("--degradations", choices=DEGRADATION_CHOICES, default="cubic",
                        help="cubic: antialiased cubic LR (the shipped weights); mix: a degradation drawn per patch, plus noise; "
                             "slab (through): half the patches thick slabs (the mean of the HR slices covered)")
    parser.add_argument("--init", type=Path, help="start from these weights (fine-tune) instead of from Lanczos")
    parser.add_argument("--data", type=Path, default=volume_data.default_data_dir())
    parser.add_argument("--out", type=Path, default=weights.weights_dir())
    args = parser.parse_args(argv)
    try:
        check_arguments(args.kind, args.scale, args.recipe, args.steps, args.epochs, args.degradations)
    except ValueError as err:
        parser.error(str(err))
    train(args.kind, args.scale, args.data, args.out, args.steps, args.seed, args.lr, recipe=args.recipe,
          epochs=args.epochs, degradations=args.degradations, init=args.init)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())

