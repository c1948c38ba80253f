"""Arbitrary-scale SR: a residual feature trunk with the Meta-Upscale module (Hu et al. 2019, as used in
Meta-SRGAN, Tan et al. 2020, ``shared/seeds/003_*``).

Trunk (EDSR-style, no batch norm): conv 1->C, ``blocks`` residual blocks (conv-ReLU-conv + skip),
conv C->C plus a long skip. Meta-Upscale: for output pixel (i, j) at scales (s_h, s_w) the source
coordinate is ``c = (i + 0.5) / s - 0.5`` (pixel centres aligned, as everywhere in this project); the
module takes the features of the 3x3 neighbourhood around the nearest LR pixel ``round(c)`` and
weighs them with a filter that a small network predicts from ``(1/s_h, 1/s_w, d_h, d_w)``,
``d = c - round(c)`` in [-0.5, 0.5). The paper feeds ``(1/s, d_h, d_w)``; we give each axis its
own scale so that the same network also upsamples one axis only (the slice axis of a volume).

Filters are predicted only for the distinct sub-pixel phases (offsets quantised to 1/``PHASES``
of a pixel, so at most ``PHASES`` + 1 per axis; the largest error is 1/64 pixel), and applied as
convolutions on the LR rows each row phase needs (see :meth:`MetaUpscale.forward`): the work grows
with the output rows times the column phases (at 2x2 or 1.4x1.4, well under the trunk's), and no
per-output-pixel weights are ever materialised.

Like the other models here, the output is a residual on a Lanczos resampling of the input, and
the filter predictor's last layer starts at zero: the untrained network is Lanczos.

Two things the paper leaves out make the predictor learn as fast as a fixed-scale tail (measured:
the README's sr2d training notes): the offsets reach it also as sines and cosines of ``k * pi * d`` (k = 1 to
``frequencies``), so that neighbouring phases get distinct hidden codes (a plain ReLU layer of
(1/s, d) gives nearly the same code to every phase), and its last layer trains at a small fraction
of the trunk's learning rate (``pipelines.training.train_sr2d.FILTER_LR_SCALE``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.models.lanczos import centres, lanczos_at

META_FILE = "meta_upscale.safetensors"
PHASES = 32
MIN_SCALE, MAX_SCALE = 1.0, 4.0
PHASE_MAP_FLOATS = 2**25  # feature strips and phase maps computed at once (128 MB float32)
STRIP_COST = 3  # per output row, a 3-row strip costs about 3 rows of a whole-map conv (2-core CPU, measured)


@dataclass(frozen=True)
class MetaConfig:
    channels: int = 32
    blocks: int = 8
    hidden: int = 256
    frequencies: int = 4

    def to_dict(self) -> dict:
        return asdict(self)


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class ResidualTrunk(nn.Module):
    """conv 1->C, residual blocks, conv C->C, long skip: LR features (N, C, H, W)."""

    def __init__(self, channels: int, blocks: int):
        super().__init__()
        self.head = nn.Conv2d(1, channels, 3, padding=1)
        self.body = nn.Sequential(*[ResBlock(channels) for _ in range(blocks)])
        self.tail = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.head(x)
        return f + self.tail(self.body(f))


def axis_plan(n_in: int, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For one axis: (nearest LR index per output sample, phase index per output sample, the
    distinct quantised offsets)."""
    nearest = np.clip(np.floor(coords + 0.5), 0, n_in - 1).astype(np.int64)
    offsets = np.clip(np.round((coords - nearest) * PHASES) / PHASES, -0.5, 0.5)
    phases, index = np.unique(offsets, return_inverse=True)
    return nearest, index.astype(np.int64).reshape(-1), phases.astype(np.float32)


class PhaseEncoding(nn.Module):
    """(1/s_h, 1/s_w, d_h, d_w) -> the same plus sin and cos of ``k * pi * d`` for k = 1..``frequencies``."""

    def __init__(self, frequencies: int):
        super().__init__()
        self.register_buffer("k", torch.arange(1, frequencies + 1, dtype=torch.float32) * np.pi, persistent=False)
        self.width = 4 + 4 * frequencies

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = (x[..., 2:, None] * self.k.to(x.dtype)).flatten(-2)
        return torch.cat([x, torch.sin(angles), torch.cos(angles)], dim=-1)


class MetaUpscale(nn.Module):
    def __init__(self, channels: int, hidden: int, frequencies: int):
        super().__init__()
        self.channels = channels
        encoding = PhaseEncoding(frequencies)
        self.predict = nn.Sequential(encoding, nn.Linear(encoding.width, hidden), nn.ReLU(),
                                     nn.Linear(hidden, 9 * channels))
        nn.init.zeros_(self.predict[-1].weight)
        nn.init.zeros_(self.predict[-1].bias)

    def forward(self, features: torch.Tensor, rows: np.ndarray, cols: np.ndarray,
                inverse_scales: tuple[float, float]) -> torch.Tensor:
        """Samples at source coordinates ``rows`` x ``cols``. Output rows go by row phase: their
        nearest LR rows are convolved with that phase's filters for every column phase (one output
        channel each), and every output pixel picks its column phase's value at its nearest LR
        column. Where a row phase needs most LR rows (integer factors), the convolution runs on bands
        of the whole map; where it needs few (a factor like 1.4 has 33 row phases), on each needed
        row's 3-row strip only, so the work follows the output rows instead of all phase pairs times
        the LR grid (which at 33 x 33 phase pairs cost twice the trunk). Bands and strips are sized
        to stay within ``PHASE_MAP_FLOATS``."""
        n, c, h, w = features.shape
        near_r, phase_r, off_r = axis_plan(h, rows)
        near_c, phase_c, off_c = axis_plan(w, cols)
        dev, dtype = features.device, features.dtype
        grid = torch.stack(torch.meshgrid(torch.from_numpy(off_r), torch.from_numpy(off_c), indexing="ij"), -1)
        inv = torch.tensor(inverse_scales, dtype=grid.dtype).expand_as(grid)
        filters = self.predict(torch.cat([inv, grid], dim=-1).to(dev, dtype))  # (Pr, Pc, 9C)
        pc = len(off_c)
        padded = F.pad(features, (1, 1, 1, 1))  # the zero padding of a padding=1 conv
        pixels = padded.permute(0, 2, 3, 1)  # (N, h+2, w+2, C): whole rows gather fast from NHWC features
        channel = torch.from_numpy(phase_c).to(dev)[None, :]
        col_index = torch.from_numpy(near_c).to(dev)[None, :]
        band = max(1, PHASE_MAP_FLOATS // (n * pc * w))
        strip_rows = max(1, PHASE_MAP_FLOATS // (n * (3 * c + pc) * (w + 2)))
        out = features.new_empty(n, len(rows), len(cols))

        def put(out_rows: np.ndarray, maps: torch.Tensor, map_rows: np.ndarray) -> None:
            """``maps`` (N, Pc, r, w): output row ``out_rows[i]`` is map row ``map_rows[i]``."""
            picked = maps[:, channel, torch.from_numpy(map_rows).to(dev)[:, None], col_index]
            out[:, torch.from_numpy(out_rows).to(dev)] = picked

        for a in range(len(off_r)):
            out_rows = np.nonzero(phase_r == a)[0]
            lr_rows = near_r[out_rows]
            kernel = filters[a].reshape(pc, c, 3, 3)
            if STRIP_COST * len(out_rows) >= h:
                for r0 in range(0, h, band):
                    inside = (lr_rows >= r0) & (lr_rows < r0 + band)
                    maps = F.conv2d(padded[:, :, r0:r0 + band + 2], kernel)
                    put(out_rows[inside], maps, lr_rows[inside] - r0)
            else:
                for start in range(0, len(out_rows), strip_rows):
                    part = slice(start, start + strip_rows)
                    taps = torch.from_numpy(lr_rows[part, None] + np.arange(3)).to(dev)  # rows of padded
                    strips = pixels[:, taps].reshape(n, -1, w + 2, c).permute(0, 3, 1, 2)
                    maps = F.conv2d(strips, kernel, stride=(3, 1))
                    put(out_rows[part], maps, np.arange(maps.shape[2]))
        return out[:, None]


class MetaSR(nn.Module):
    def __init__(self, config: MetaConfig = MetaConfig()):
        super().__init__()
        self.config = config
        self.trunk = ResidualTrunk(config.channels, config.blocks)
        self.upscale = MetaUpscale(config.channels, config.hidden, config.frequencies)
        self.to(memory_format=torch.channels_last)  # trunk 1.6x faster on the CPU: see sr3d_cnn.SRCNN

    def forward(self, x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """(N, 1, h, w) in [0, 1] -> (N, 1, rows, cols), the whole field of view; factors in [1, 4]."""
        h, w = x.shape[-2:]
        return self.sample(x, centres(h, rows), centres(w, cols), (h / rows, w / cols))

    def sample(self, x: torch.Tensor, rows: np.ndarray, cols: np.ndarray,
               inverse_scales: tuple[float, float]) -> torch.Tensor:
        """(N, 1, h, w) -> samples at source coordinates ``rows`` x ``cols`` for the factors whose
        inverses are ``inverse_scales`` (what the filter predictor is told)."""
        for inverse in inverse_scales:
            if not 1 / MAX_SCALE - 1e-6 <= inverse <= 1 / MIN_SCALE + 1e-6:
                raise ValueError(f"Meta-Upscale factor {1 / inverse:.3g} is outside [{MIN_SCALE:g}, {MAX_SCALE:g}]")
        return lanczos_at(x, rows, cols) + self.upscale(self.trunk(x), rows, cols, inverse_scales)


def halo(config: MetaConfig) -> int:
    """Input rows on each side an output row depends on: the trunk's convs (2 per block + 2), the
    3x3 Meta filter, the nearest-pixel rounding (the Lanczos base reaches 3), plus one."""
    return 2 * config.blocks + 2 + 1 + 1 + 1


def load_meta(path) -> MetaSR:
    """The model in ``path``, checked against its model card."""
    from pipelines import weights

    state, config = weights.load(path, "meta")
    model = MetaSR(MetaConfig(channels=config["channels"], blocks=config["blocks"], hidden=config["hidden"],
                              frequencies=config.get("frequencies", 0)))
    return weights.restore(model, state, path).eval()


