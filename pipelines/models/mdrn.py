"""MDRN (Ren et al. 2019, ``shared/seeds/004_*``): a deep residual SR network without batch norm, multi-scale.

The LR image goes in directly (no interpolation first, the paper's efficiency point): conv 1->64,
``blocks`` residual blocks (conv-ReLU-conv + skip, no batch norm), conv 64->64 plus a long skip,
then one upsampling tail per scale (x2, x3, x4: conv 64 -> 64*r*r, pixel shuffle, conv 64->1).
All scales share the body and train together (one scale per batch). The paper uses 80 blocks;
the depth here is what trains on 2 CPU cores within the budget, stated in the model card.

As in the paper's Algorithm 2 the network adds a residual to an interpolated image; here that
is Lanczos (the baseline to beat) and each tail's last conv starts at zero.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.models.lanczos import centres, lanczos_at
from pipelines.models.meta_sr import ResidualTrunk
from pipelines.models.precision import cpu_bf16, residual_precision

MDRN_FILE = "mdrn.safetensors"
SCALES = (2, 3, 4)
FIXED_FILE = "sr2d_fixed.safetensors"


@dataclass(frozen=True)
class MDRNConfig:
    channels: int = 64
    blocks: int = 16

    def to_dict(self) -> dict:
        return asdict(self)


def fixed_config() -> "MDRNConfig":
    """Meta-Upscale's trunk (:class:`pipelines.models.meta_sr.MetaConfig`) with this module's fixed x2/x3/x4
    sub-pixel tails: the fixed-scale counterpart the Meta-SR paper compares Meta-Upscale with
    (same trunk, same data and steps). An evaluation baseline (``FIXED_FILE``); no pipeline uses it."""
    from pipelines.models.meta_sr import MetaConfig

    meta = MetaConfig()
    return MDRNConfig(channels=meta.channels, blocks=meta.blocks)


class Tail(nn.Module):
    def __init__(self, channels: int, scale: int):
        super().__init__()
        self.scale = scale
        self.expand = nn.Conv2d(channels, channels * scale * scale, 3, padding=1)
        self.out = nn.Conv2d(channels, 1, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.out(F.pixel_shuffle(self.expand(f), self.scale))


class MDRN(nn.Module):
    def __init__(self, config: MDRNConfig = MDRNConfig()):
        super().__init__()
        self.config = config
        self.trunk = ResidualTrunk(config.channels, config.blocks)
        self.tails = nn.ModuleDict({str(s): Tail(config.channels, s) for s in SCALES})
        self.to(memory_format=torch.channels_last)  # 1.2x faster on the CPU: see SRCNN

    def forward(self, x: torch.Tensor, scale: int) -> torch.Tensor:
        """(N, 1, h, w) in [0, 1] -> (N, 1, h*scale, w*scale)."""
        if scale not in SCALES:
            raise ValueError(f"MDRN scales are {SCALES}, got {scale}")
        h, w = x.shape[-2:]
        base = lanczos_at(x, centres(h, h * scale), centres(w, w * scale))
        with residual_precision(x, self.training):
            residual = self.tails[str(scale)](self.trunk(x))
        return base + residual.float()


def halo(config: MDRNConfig) -> int:
    """Input pixels on each side an output pixel depends on: the trunk's convs (2 per block + 2),
    the tail's two convs (the second at the output density, so at most one input pixel), plus one.
    The Lanczos base (radius 3) lies inside that."""
    return 2 * config.blocks + 2 + 2 + 1


def load_mdrn(path) -> MDRN:
    """The model in ``path``, checked against its model card."""
    from pipelines import weights

    state, config = weights.load(path, "mdrn")
    model = MDRN(MDRNConfig(channels=config["channels"], blocks=config["blocks"]))
    return weights.restore(model, state, path).eval()


@dataclass(frozen=True)
class LoadedMDRN:
    model: MDRN
    version: str


@lru_cache(maxsize=2)
def load_mdrn_once(folder) -> LoadedMDRN:
    """The shipped MDRN, checked against its card, once per worker process, on the GPU if any."""
    from pathlib import Path

    from pipelines import weights

    path = Path(folder) / MDRN_FILE
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    precision = "+bf16" if dev == "cpu" and cpu_bf16() else ""  # in the outputs' model version: how they were made
    return LoadedMDRN(load_mdrn(path).to(dev), f"mdrn:{weights.sha256(path)[:8]}{precision}")
