"""The two-stage 3D SR CNNs of Georgescu et al. 2020 (``shared/seeds/001_*``): in-plane, then through-plane.

Both stages share one body: ten 3x3 'same' convs of 32 filters with ReLU, a short skip 1->3 and a
long skip 1->5, a sub-pixel layer after conv 6, then conv 7 (1->32), a residual pair (8, 9) and
conv 10 (32->1). The in-plane network shuffles ``r*r`` channels into both image axes; the
through-plane network shuffles ``r`` channels into the first image axis only, which is the depth
axis of the views it is given (slices of the transposed volume). 57,573 parameters at x2 in-plane.

Training loss is L1 on the output plus L1 right after the sub-pixel layer (the intermediate loss).

Where we differ from the paper, and why:
  * both the sub-pixel output and the final output are residuals on a Lanczos upsampling of the
    input, with convs 6 and 10 zero-initialised: the network starts as Lanczos, the baseline it has
    to beat, and learns only the correction (measured in ``shared/notes/sr-models.md``: a global
    interpolation residual doubles the gain at a fixed CPU budget);
  * conv 10 is linear (no ReLU on the output): a residual must be able to be negative.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.models.lanczos import centres, lanczos_at

WIDTH = 32
INPLANE_FILES = {2: "sr3d_inplane_x2.safetensors", 4: "sr3d_inplane_x4.safetensors"}
THROUGH_FILE = "sr3d_through_x2.safetensors"


@dataclass(frozen=True)
class CNNConfig:
    scale: int = 2
    axes: int = 2  # 2: in-plane (both image axes); 1: through-plane (the first image axis)
    width: int = WIDTH

    def to_dict(self) -> dict:
        return asdict(self)


def halo(scale: int) -> int:
    """Input rows on each side that an output row depends on (receptive field radius, plus one):
    six convs before the sub-pixel layer, four after it at ``scale`` times the density, and the
    Lanczos base (radius 3) inside that."""
    return 6 + -(-4 // scale) + 1


def lanczos_up(x: torch.Tensor, scale: int, axes: int) -> torch.Tensor:
    """Lanczos-3 upsampling of (N, C, H, W) by ``scale`` on H (and W when ``axes`` is 2)."""
    h, w = x.shape[-2:]
    return lanczos_at(x, centres(h, h * scale), centres(w, w * scale) if axes == 2 else np.arange(w, dtype=np.float64))


def shuffle_rows(x: torch.Tensor, scale: int) -> torch.Tensor:
    """One-axis sub-pixel layer: (N, r, H, W) -> (N, 1, H*r, W), output row ``h*r + i`` = channel i, row h."""
    n, r, h, w = x.shape
    return x.permute(0, 2, 1, 3).reshape(n, 1, h * r, w)


class SRCNN(nn.Module):
    def __init__(self, config: CNNConfig = CNNConfig()):
        super().__init__()
        if config.axes not in (1, 2) or config.scale < 2:
            raise ValueError(f"unsupported configuration {config}")
        self.config = config
        w = config.width
        phases = config.scale ** config.axes
        conv = lambda i, o: nn.Conv2d(i, o, 3, padding=1)  # noqa: E731
        self.before = nn.ModuleList([conv(1, w)] + [conv(w, w) for _ in range(4)])
        self.subpixel = conv(w, phases)
        self.after = nn.ModuleList([conv(1, w), conv(w, w), conv(w, w)])
        self.out = conv(w, 1)
        for layer in (self.subpixel, self.out):  # start as the Lanczos baseline
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        # NHWC weights make every conv run in NHWC (a one-channel input is both layouts): on the
        # 2-core CPU 1.1x faster to train, 1.5x to run (benchmarks/sr3d_speed.py). Saved weights
        # are contiguous, so the files do not change.
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 1, H, W) in [0, 1] -> (final, intermediate), both upsampled."""
        r, axes = self.config.scale, self.config.axes
        c1, c2, c3, c4, c5 = self.before
        f1 = F.relu(c1(x))
        f3 = F.relu(c3(F.relu(c2(f1)))) + f1
        f5 = F.relu(c5(F.relu(c4(f3)))) + f1
        phases = self.subpixel(f5)
        shuffled = F.pixel_shuffle(phases, r) if axes == 2 else shuffle_rows(phases, r)
        mid = shuffled + lanczos_up(x, r, axes)
        c7, c8, c9 = self.after
        g7 = F.relu(c7(mid))
        g9 = F.relu(c9(F.relu(c8(g7)))) + g7
        return self.out(g9) + mid, mid



def intermediate_l1(out: torch.Tensor, mid: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The paper's loss: L1 of the output plus L1 right after the sub-pixel layer, equal weights."""
    return F.l1_loss(out, target) + F.l1_loss(mid, target)
