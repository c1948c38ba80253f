"""What every training script shares: seeding, the device, progress with a loss log, the optimiser."""
from __future__ import annotations

import csv
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from pipelines import progress as display


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Progress:
    """Step and loss every ``every`` steps: on the display (a bar on a terminal, else a line every 10 s,
    :mod:`pipelines.progress`) and as a CSV row; validation results as their own line."""

    def __init__(self, what: str, total: int, csv_path: Path, every: int = 20):
        self.what, self.total, self.every = what, total, every
        self.start = time.monotonic()
        self.display = display.Progress(what, total, unit="steps", every_s=10)
        self.csv_path = csv_path
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = csv_path.open("w", newline="")
        self._writer = csv.writer(self._fh)
        self._writer.writerow(["step", "loss", "val", "seconds"])

    def step(self, step: int, loss: float, val: float | None = None) -> None:
        if step % self.every and step != self.total and val is None:
            return
        elapsed = time.monotonic() - self.start
        self.display.update(step, note=f"loss {loss:.4f}")
        if val is not None:
            self.display.write(f"{self.what} {step}/{self.total}  loss {loss:.4f}  val {val:.4f}  {elapsed:.0f}s")
        self._writer.writerow([step, f"{loss:.6f}", "" if val is None else f"{val:.6f}", f"{elapsed:.1f}"])
        self._fh.flush()

    def close(self) -> float:
        self.display.close()
        self._fh.close()
        return time.monotonic() - self.start


def adam_cosine(params, lr: float, steps: int):
    """Adam with the learning rate decayed along a cosine to 10% over ``steps``."""
    opt = torch.optim.Adam(params, lr=lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / steps)))


def adam_step_decay(params, lr: float, steps: int):
    """Adam at ``lr``, then at a tenth of it for the second half of ``steps`` (Georgescu et al.: 1e-4, 1e-5
    after epoch 20 of 40)."""
    opt = torch.optim.Adam(params, lr=lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 if i < steps // 2 else 0.1)
