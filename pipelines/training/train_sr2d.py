"""Train the 2D SR models that serve every modality: Meta-Upscale (any factor) and MDRN (x2/x3/x4).

    python -m pipelines.training.train_sr2d meta [--steps N] [--seed S] [--out weights/]
    python -m pipelines.training.train_sr2d mdrn [--steps N] [--seed S] [--out weights/]
    python -m pipelines.training.train_sr2d fixed [--steps N] [--seed S] [--out weights/]

``srnode train sr2d ...`` runs the same; CUDA is used when present. Patches come a third each from
chest X-rays (``shared/data/cxr``, its train split, :mod:`pipelines.training.cxr_data`) and from CT and MR
slices (the train split of :mod:`pipelines.training.volume_data`, intensities as there). The degradation is
the one every evaluation here uses: antialiased cubic downscaling.

Meta-Upscale: one factor per batch, from 1.1 to 4.0 in steps of 0.1 as in the paper, but in half
the batches (``INTEGER_P``) one of 2, 3, 4; in 30 % of
batches the factor applies to the rows only (the columns keep theirs), which teaches the same
network the one-axis upsampling of a volume's slice axis. LR patches are 30 px, so the HR patch is
exactly ``30 * factor`` px. L1 loss (the adversarial and
perceptual losses of Meta-SRGAN are not used: the L1 model is the clinical default). The filter
predictor's last layer trains at ``FILTER_LR_SCALE`` times the rate (see below).

MDRN: one scale of 2, 3, 4 per batch, LR patches of 24 px, L1 loss.

fixed: the evaluation baseline of ``mdrn.fixed_config`` (Meta-Upscale's trunk with fixed x2/x3/x4
tails), trained as MDRN but on Meta-Upscale's patch size, batch and rate, so that
``srnode eval sr2d`` compares the two upsampling modules on the same trunk. Every file records its
steps (config ``steps``), and the evaluation prints both models' steps next to the difference.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipelines import weights
from pipelines.models.interpolation import resize
from pipelines.models.mdrn import FIXED_FILE, MDRN_FILE, MDRN, MDRNConfig, fixed_config
from pipelines.models.mdrn import SCALES as MDRN_SCALES
from pipelines.models import parameter_count
from pipelines.models.meta_sr import META_FILE, MetaConfig, MetaSR
from pipelines.training import cxr_data, volume_data
from pipelines.training.common import Progress, adam_cosine, device, seed_everything
from pipelines.training.train_sr3d import PatchSampler, load_training_volumes

log = logging.getLogger(__name__)

STEPS = {"meta": 4000, "mdrn": 6000, "fixed": 4000}
BATCH = 16
META_LR_PATCH, MDRN_LR_PATCH = 30, 24
META_SCALES = (1.1, 4.0)
ROWS_ONLY_P = 0.3
# Half the batches are at x2, x3 or x4, the factors most asked for: at 4000 steps this took the
# CXR validation gap to the fixed x2/x3/x4 tails from -0.45/-0.25/-0.07 dB to +0.05/-0.07/+0.04.
INTEGER_P = 0.5
# Adam moves each weight of the filter predictor's last layer by about the learning rate, and the
# ~250 hidden units' moves add up in every predicted filter: at the trunk's rate the filters jump
# about. At this fraction of it they move like a free filter at ~0.1x the rate, the rate at which a
# per-phase filter table learned as fast as a fixed-scale tail (1500-step probes on the CXR
# validation split, x2: 42.79 dB at the trunk's rate, 43.82 dB at 0.002x, no phase encoding).
FILTER_LR_SCALE = 0.002


def cxr_volume(cxr_dir: Path) -> tuple[volume_data.VolumeSource, np.ndarray]:
    """The CXR train split as a stack of 512 px images, for the patch sampler."""
    images = [cxr_data.read_image(s.image) for s in cxr_data.load_split(cxr_dir, "train")]
    size = min(min(im.shape) for im in images)
    stack = np.stack([im[:size, :size] for im in images]).astype(np.float32)
    return volume_data.VolumeSource("cxr_train", "CXR", "cxr", "train", False), stack


def meta_batch(sampler: PatchSampler, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch at one factor ``k / 10`` (the paper's 0.1 steps): with 30-px LR patches the HR patch is
    exactly ``3k`` px, and a factor has at most 10 sub-pixel phases, which keeps training cheap."""
    factor = rng.integers(round(META_SCALES[0] * 10), round(META_SCALES[1] * 10) + 1) / 10
    if rng.random() < INTEGER_P:
        factor = float(rng.integers(2, 5))
    rows = int(round(META_LR_PATCH * factor))
    cols = META_LR_PATCH if rng.random() < ROWS_ONLY_P else rows
    hr = np.stack([sampler.patch(max(rows, cols))[:rows, :cols] for _ in range(BATCH)])
    lr = resize(hr, (META_LR_PATCH, META_LR_PATCH), "cubic")
    return torch.from_numpy(lr)[:, None], torch.from_numpy(np.ascontiguousarray(hr))[:, None]


def train(kind: str, data_dir: Path, cxr_dir: Path, out_dir: Path, steps: int, seed: int, lr: float = 5e-4,
          volumes: list | None = None) -> Path:
    """Train one model and write it with its card; ``volumes`` replaces the training data (tests)."""
    seed_everything(seed)
    dev = device()
    rng = np.random.default_rng(seed)
    if volumes is None:
        volumes = load_training_volumes(data_dir) + [cxr_volume(cxr_dir)]
    sampler = PatchSampler(volumes, rng)
    if kind == "meta":
        config, model, file_name = MetaConfig(), None, META_FILE
        model = MetaSR(config).to(dev)
    else:
        config, file_name = (MDRNConfig(), MDRN_FILE) if kind == "mdrn" else (fixed_config(), FIXED_FILE)
        model = MDRN(config).to(dev)
    lr_patch = MDRN_LR_PATCH if kind == "mdrn" else META_LR_PATCH
    print(f"{kind}: {parameter_count(model):,} parameters on {dev}", file=sys.stderr)
    opt, sched = adam_cosine(parameter_groups(model, lr), lr, steps)
    progress = Progress(kind, steps, out_dir / "logs" / f"{Path(file_name).stem}.csv", every=50)
    for step in range(1, steps + 1):
        if kind == "meta":
            lr_batch, hr_batch = (t.to(dev) for t in meta_batch(sampler, rng))
            out = model(lr_batch, hr_batch.shape[-2], hr_batch.shape[-1])
        else:
            scale = int(MDRN_SCALES[rng.integers(len(MDRN_SCALES))])
            lr_batch, hr_batch = (t.to(dev) for t in sampler.batch(BATCH, scale, lr_patch, 2, blur=False))
            out = model(lr_batch, scale)
        loss = F.l1_loss(out, hr_batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        progress.step(step, loss.item())
    seconds = progress.close()
    model.cpu()
    meta = {"model": "meta" if kind == "meta" else "mdrn", **config.to_dict(), "steps": steps}
    weights.save(out_dir / file_name, model.state_dict(), meta,
                 card_text(kind, config, steps, seed, lr, seconds, parameter_count(model), str(dev)))
    print(f"wrote {out_dir / file_name} ({seconds:.0f} s)", file=sys.stderr)
    return out_dir / file_name


def parameter_groups(model, lr: float) -> list[dict]:
    """Every parameter at ``lr``, but Meta-Upscale's filter-predicting last layer at ``FILTER_LR_SCALE * lr``."""
    if not isinstance(model, MetaSR):
        return [{"params": list(model.parameters())}]
    slow = list(model.upscale.predict[-1].parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in slow)]
    return [{"params": rest}, {"params": slow, "lr": lr * FILTER_LR_SCALE}]


def card_text(kind: str, config, steps: int, seed: int, lr: float, seconds: float, params: int, dev: str) -> str:
    if kind == "meta":
        what = (f"Meta-Upscale (arbitrary scale 1-4 per axis) on a residual trunk of {config.blocks} blocks x "
                f"{config.channels} filters; filter predictor Linear({4 + 4 * config.frequencies}, {config.hidden})-"
                f"ReLU-Linear(9x{config.channels}) fed (1/s_h, 1/s_w, d_h, d_w) and sin/cos of k*pi*d, k = 1-"
                f"{config.frequencies}")
        recipe = (f"one factor per batch: {INTEGER_P:.0%} of batches 2, 3 or 4, the others in [{META_SCALES[0]}, "
                  f"{META_SCALES[1]}] in steps of 0.1; rows only in "
                  f"{ROWS_ONLY_P:.0%} of batches; LR patches {META_LR_PATCH} px; the predictor's last layer at "
                  f"{FILTER_LR_SCALE:g} x the learning rate")
    elif kind == "mdrn":
        what = (f"MDRN: {config.blocks} residual blocks x {config.channels} filters without batch norm (the paper "
                f"uses 80), LR input, tails for x2/x3/x4")
        recipe = f"one scale of 2/3/4 per batch; LR patches {MDRN_LR_PATCH} px"
    else:
        what = (f"fixed-scale baseline for Meta-Upscale: its trunk ({config.blocks} blocks x {config.channels} "
                "filters) with sub-pixel tails for x2/x3/x4 (evaluation only; no pipeline uses it)")
        recipe = f"one scale of 2/3/4 per batch; LR patches {META_LR_PATCH} px (Meta-Upscale's batch and rate)"
    inference = ("\n## Inference\nOn a CPU that computes bfloat16 natively (AVX512-BF16, AMX) the residual branch runs in "
                 "bfloat16 (`pipelines/models/precision.py`), 2.3x faster; the evaluation below is measured on that "
                 "path where the evaluating machine has it. `SRNODE_FP32=1` keeps float32.\n" if kind == "mdrn" else "")
    return f"""# sr2d: {what}

`pipelines/{"meta_sr" if kind == "meta" else "mdrn"}.py`, residual on Lanczos (last layer zero-initialised). {params:,}
trainable parameters.

## Data
A third each: chest X-rays (JSRT / Shenzhen train split of `shared/data/cxr`: JSRT / SCR research-only terms apply),
CT slices and MR slices (train split of `pipelines/training/volume_data.py`; terms in `shared/data/LICENSES.md`). Held out,
never trained on: the CXR test split and the sr3d test volumes. Not for clinical use.

## Recipe
Antialiased cubic downscaling; {recipe}; batch {BATCH}; rotations and flips; L1 loss; Adam {lr:g}, cosine decay
to {lr / 10:g}; {steps} steps, seed {seed}, on {dev}: {seconds / 60:.1f} min.
Reproduce: `srnode train sr2d {kind} --steps {steps} --seed {seed}`.

## Known limits
- Trained to undo antialiased cubic downscaling, not real acquisition blur or noise.
- A reduced CPU budget; the paper-size models were not trained (no GPU was lent to this task).
{inference}
## Evaluation
Written by `srnode eval sr2d --update-cards`.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="srnode train sr2d", description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=["meta", "mdrn", "fixed"])
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--data", type=Path, default=volume_data.default_data_dir())
    parser.add_argument("--cxr-data", type=Path, default=cxr_data.default_data_dir())
    parser.add_argument("--out", type=Path, default=weights.weights_dir())
    args = parser.parse_args(argv)
    train(args.kind, args.data, args.cxr_data, args.out, args.steps or STEPS[args.kind], args.seed, args.lr)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
