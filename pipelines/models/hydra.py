"""The Hydra models for chest X-rays (Zamzmi et al. 2020, ``shared/seeds/000_*``): one SR trunk, two heads.

Trunk: BatchNorm on the interpolated input, six 3x3 'same' ReLU convs (8, 16, 32, 64, 128, 256
filters; dilation 2 on the 4th-6th), a linear 3x3 output conv, and the residual added to the raw
input (not the normalised one). At paper width and one channel it has 395,715 trainable
parameters (the paper's 395,717 counts Keras' two BatchNorm running statistics too). The network
is not told the scale: it is trained on inputs upsampled from x2, x3, x4 and x8 at once.

Heads tap the 6th conv, so one trunk forward gives the SR image and the features both heads use:
  * lungs: decoder convs 128-64-32-16-8-1 and a sigmoid (BCE). It runs on the features averaged
    onto an analysis grid (``grid`` px on the long side). At full output resolution its receptive
    field (about 30 px) is far too small to tell lung from air outside the body. Its dilations
    (1, 2, 4, 8, 16, 1) give it about half the grid as context without adding parameters. Two
    more input channels carry each cell's row and column position in [-1, 1]: convolutions cannot
    tell where in the image they are, and lungs always lie in the same region of a PA film. A
    head trained with ``film`` also gets the film averaged onto the grid (``film_on_grid``): the
    trunk's features encode the SR residual, not the brightness that tells air-filled lung from
    tissue (held-out IoU 0.930 -> 0.936 with it and a Dice term, same steps and seed). The
    upsampled probabilities are then edge-aligned with the film (:func:`guided_filter`, no training).
  * abnormality: global average pooling, a fully connected layer, dropout and a two-way softmax
    (cross-entropy).
Both heads train with the trunk frozen, as in the paper, and standardise the features they get
with the training split's per-channel mean and std (buffers saved with their weights): a trunk
trained for SR gives small activations (at most about 0.03 here) on few live channels, and
unscaled they stall a head's training (lung grid IoU 0.75 against 0.86 after 400 steps).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

PAPER_WIDTHS = (8, 16, 32, 64, 128, 256)
REDUCED_WIDTHS = (8, 16, 32, 32, 64, 64)  # 71K parameters, ~3.7x faster on CPU (sr-models note)
DILATIONS = (1, 1, 1, 2, 2, 2)
DECODER_WIDTHS = (128, 64, 32, 16, 8)
DECODER_DILATIONS = (1, 2, 4, 8, 16, 1)
HEAD_FILM = 512  # px on the long side of the films the heads learnt from (JSRT); see cxr.heads_input
TRUNK_FILE = "cxr_hydra_trunk.safetensors"
LUNGS_FILE = "cxr_hydra_lungs.safetensors"
ABNORMALITY_FILE = "cxr_hydra_abnormality.safetensors"


@dataclass(frozen=True)
class TrunkConfig:
    widths: tuple[int, ...] = PAPER_WIDTHS
    channels: int = 1

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class HydraTrunk(nn.Module):
    def __init__(self, config: TrunkConfig = TrunkConfig()):
        super().__init__()
        if len(config.widths) != len(DILATIONS):
            raise ValueError(f"the trunk has {len(DILATIONS)} hidden convs, got widths {config.widths}")
        self.config = config
        self.norm = nn.BatchNorm2d(config.channels)
        convs, previous = [], config.channels
        for width, dilation in zip(config.widths, DILATIONS):
            convs.append(nn.Conv2d(previous, width, 3, padding=dilation, dilation=dilation))
            previous = width
        self.convs = nn.ModuleList(convs)
        self.out = nn.Conv2d(previous, config.channels, 3, padding=1)
        # Start as the identity (the interpolation it improves on): the residual branch begins at zero.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.to(memory_format=torch.channels_last)  # 1.3x faster on the CPU: see sr3d_cnn.SRCNN

    @property
    def feature_channels(self) -> int:
        return self.config.widths[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 6th conv's activations for an interpolated input ``x`` (N, C, H, W) in [0, 1]."""
        h = self.norm(x)
        for conv in self.convs:
            h = F.relu(conv(h))
        return h

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(super-resolved image, 6th-conv features) for an interpolated input."""
        feats = self.features(x)
        return x + self.out(feats), feats


class Standardise(nn.Module):
    """Per-channel (x - mean) / std with the training split's statistics, kept as buffers."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(channels))
        self.register_buffer("feature_std", torch.ones(channels))

    def fit(self, features: torch.Tensor, dims: tuple[int, ...]) -> None:
        """Set the statistics from training features; dead channels (std ~ 0) map to ~0, not noise."""
        self.feature_mean.copy_(features.mean(dim=dims))
        self.feature_std.copy_(features.std(dim=dims).clamp_min(1e-3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.feature_mean.view(shape)) / self.feature_std.view(shape)


def position_channels(n: int, height: int, width: int, device=None) -> torch.Tensor:
    """(n, 2, height, width): each cell's row and column position, -1 at one edge to 1 at the other."""
    rows = torch.linspace(-1, 1, height, device=device).view(1, 1, height, 1).expand(n, 1, height, width)
    cols = torch.linspace(-1, 1, width, device=device).view(1, 1, 1, width).expand(n, 1, height, width)
    return torch.cat([rows, cols], dim=1)


class LungHead(nn.Module):
    """Decoder 128-64-32-16-8-1 on standardised trunk features pooled to the analysis grid, plus
    the two position channels and (``film``) the film itself averaged onto the grid, standardised
    per film; returns logits.

    The film channel: the trunk is an SR network whose 6th conv encodes the residual (edges,
    texture), while a lung is first of all a dark region inside brighter tissue. Standardising
    per film (its own grid mean and std) makes the channel blind to the film's windowing."""

    def __init__(self, in_channels: int, grid: int = 128, film: bool = False):
        super().__init__()
        self.grid = grid
        self.film = film
        self.standardise = Standardise(in_channels)
        layers, previous = [], in_channels + 2 + int(film)
        for width, dilation in zip(DECODER_WIDTHS, DECODER_DILATIONS):
            layers += [nn.Conv2d(previous, width, 3, padding=dilation, dilation=dilation), nn.ReLU(inplace=True)]
            previous = width
        layers.append(nn.Conv2d(previous, 1, 3, padding=DECODER_DILATIONS[-1], dilation=DECODER_DILATIONS[-1]))
        self.decoder = nn.Sequential(*layers)

    def forward(self, pooled: torch.Tensor, film: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for pooled features (N, C, g, g'); ``film`` (N, 1, g, g') from :func:`film_on_grid`
        when the head has the film channel."""
        n, _, h, w = pooled.shape
        parts = [self.standardise(pooled)]
        if self.film:
            if film is None:
                raise ValueError("this lung head needs the film on the grid (hydra.film_on_grid)")
            parts.append(film)
        return self.decoder(torch.cat(parts + [position_channels(n, h, w, pooled.device)], dim=1))


def film_on_grid(film: np.ndarray, cells: tuple[int, int]) -> torch.Tensor:
    """(1, 1, *cells): the film (the model input, any size) averaged onto the lung head's grid and
    standardised by its own mean and std there."""
    x = torch.from_numpy(np.ascontiguousarray(film, dtype=np.float32))
    rows, cols = pool_matrix(x.shape[0], cells[0]), pool_matrix(x.shape[1], cells[1])
    g = rows @ x @ cols.T
    return ((g - g.mean()) / g.std().clamp_min(1e-6))[None, None]


class AbnormalityHead(nn.Module):
    """Standardise -> FC -> ReLU -> dropout -> FC -> (softmax in :func:`abnormal_probability`)."""

    def __init__(self, in_channels: int, hidden: int = 64, dropout: float = 0.5):
        super().__init__()
        self.standardise = Standardise(in_channels)
        self.fc = nn.Linear(in_channels, hidden)
        self.dropout = nn.Dropout(dropout)
        self.classify = nn.Linear(hidden, 2)  # (normal, abnormal)

    def forward(self, gap: torch.Tensor) -> torch.Tensor:
        """Logits (N, 2) from globally averaged features (N, C)."""
        return self.classify(self.dropout(F.relu(self.fc(self.standardise(gap)))))


def analysis_grid(height: int, width: int, grid: int) -> tuple[int, int]:
    """The pooled feature map's size: ``grid`` on the long side, aspect kept."""
    scale = grid / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def pool_matrix(n: int, cells: int, device=None) -> torch.Tensor:
    """(cells, n) averaging matrix: input index i belongs to cell ``floor(i * cells / n)``.

    Pooling as ``R_rows @ F @ R_cols.T`` can be done tile by tile (sum the tiles' products with
    the matching columns of the matrices), so a large image never needs its whole feature map.
    """
    cell = torch.arange(n, device=device) * cells // n
    onehot = torch.zeros(cells, n, device=device)
    onehot[cell, torch.arange(n, device=device)] = 1.0
    return onehot / onehot.sum(dim=1, keepdim=True)


def pool_features(feats: torch.Tensor, grid: int) -> torch.Tensor:
    """Average trunk features (N, C, H, W) onto the analysis grid (what the lung head sees)."""
    h, w = feats.shape[-2:]
    gh, gw = analysis_grid(h, w, grid)
    rows, cols = pool_matrix(h, gh, feats.device), pool_matrix(w, gw, feats.device)
    return torch.einsum("gh,nchw,kw->ncgk", rows, feats, cols)


MIN_LUNG_PART = 0.05  # a connected piece under this fraction of the largest one is a speck, not lung
EDGE_RADIUS = 4  # px of the film at HEAD_FILM px: the guided filter's window (9x9), one grid cell each way
EDGE_EPS = 1e-3  # the guided filter's regulariser, on the film in about [0, 1] (the model input)


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He et al.'s guided filter (2010): ``src`` fitted, window by window, as a linear function of
    ``guide``, so its edges move onto the guide's where the guide has them and it stays smooth where
    the guide is flat."""
    size = 2 * radius + 1
    box = lambda x: ndimage.uniform_filter(x, size, mode="reflect")  # noqa: E731
    guide, src = guide.astype(np.float32), src.astype(np.float32)
    mean_g, mean_s = box(guide), box(src)
    a = (box(guide * src) - mean_g * mean_s) / (box(guide * guide) - mean_g * mean_g + eps)
    b = mean_s - a * mean_g
    return box(a) * guide + box(b)


def film_at(film: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The film resampled to ``shape``: averaged when it is larger, bilinear when smaller."""
    x = torch.from_numpy(np.ascontiguousarray(film, dtype=np.float32))
    if x.shape == shape:
        return x.numpy()
    if x.shape[0] >= shape[0] and x.shape[1] >= shape[1]:
        return (pool_matrix(x.shape[0], shape[0]) @ x @ pool_matrix(x.shape[1], shape[1]).T).numpy()
    return F.interpolate(x[None, None], size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()


@torch.no_grad()
def lung_probability(head: LungHead, pooled: torch.Tensor, shape: tuple[int, int],
                     film: np.ndarray | None = None) -> np.ndarray:
    """The head's lung probability on a (rows, cols) matrix from pooled features (1, C, g, g'):
    resampled bilinearly from the grid and, with the film (the model input on that matrix),
    edge-aligned with it by :func:`guided_filter` at the film's ``HEAD_FILM``-px size (the size the
    heads learnt from, where ``EDGE_RADIUS`` and ``EDGE_EPS`` were chosen on the validation split:
    IoU 0.9449 -> 0.9468; held-out test split 0.9357 -> 0.9382)."""
    grid_film = film_on_grid(film, pooled.shape[-2:]).to(pooled.device) if head.film else None
    prob = torch.sigmoid(head(pooled, grid_film))
    if film is None:
        return F.interpolate(prob, size=shape, mode="bilinear", align_corners=False)[0, 0].cpu().numpy()
    fine = analysis_grid(*film.shape, HEAD_FILM)
    prob = F.interpolate(prob, size=fine, mode="bilinear", align_corners=False)[0, 0].cpu().numpy()
    prob = guided_filter(film_at(film, fine), prob, EDGE_RADIUS, EDGE_EPS)
    if fine != tuple(shape):
        prob = F.interpolate(torch.from_numpy(prob)[None, None], size=shape, mode="bilinear",
                             align_corners=False)[0, 0].numpy()
    return prob


def lung_mask(head: LungHead, pooled: torch.Tensor, shape: tuple[int, int], film: np.ndarray | None = None,
              bounds: dict | None = None) -> np.ndarray:
    """The lung mask on a (rows, cols) matrix from pooled features (1, C, g, g'):
    :func:`lung_probability` at least 0.5, then :func:`clean_lung_mask` and, with the film (the
    model input on that matrix) and the lung head's ``bounds``, :func:`within_thorax`."""
    mask = clean_lung_mask(lung_probability(head, pooled, shape, film) >= 0.5)
    return within_thorax(mask, film, bounds) if film is not None or bounds else mask


def clean_lung_mask(mask: np.ndarray) -> np.ndarray:
    """Lungs as a reader expects them: at most the two largest connected pieces (each at least
    ``MIN_LUNG_PART`` of the largest), holes filled; specks elsewhere on the film are dropped."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    keep = [i + 1 for i in np.argsort(sizes)[::-1][:2] if sizes[i] >= MIN_LUNG_PART * sizes.max()]
    return ndimage.binary_fill_holes(np.isin(labels, keep))


BODY_LEVEL = 0.5  # outside the body: darker than this fraction of the lungs' median, connected to the film's edge


def outside_body(film: np.ndarray, lungs: np.ndarray) -> np.ndarray:
    """The air around the patient on a film (model input: dense is bright): pixels darker than
    ``BODY_LEVEL`` of the median over ``lungs`` (the lungs hold air behind the chest wall and ribs,
    so they are brighter than air in front of the detector) and connected to the film's edge."""
    if not lungs.any():
        return np.zeros(film.shape, bool)
    dark = film < BODY_LEVEL * float(np.median(film[lungs]))
    labels, _ = ndimage.label(dark)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return np.isin(labels, edge[edge > 0])


def within_thorax(mask: np.ndarray, film: np.ndarray | None = None, bounds: dict | None = None) -> np.ndarray:
    """Nothing outside the thorax: a cleaned lung mask without (1) the air around the patient
    (:func:`outside_body`, with ``film``), (2) rows above the other lung's apex or below its base
    by more than the training films show (``bounds["extent"]`` from :func:`lung_bounds`: a lung
    running up past the apex into the neck, or down below the hemidiaphragm into the gastric
    bubble, while the other does not), then :func:`clean_lung_mask` again."""
    out = mask.copy()
    if film is not None:
        out &= ~outside_body(film, mask)
    extent = (bounds or {}).get("extent")
    labels, n = ndimage.label(out)
    if extent and n >= 2:
        pair = two_lungs(labels)
        h = out.shape[0]
        top_lo, top_hi = extent["apex"]  # (image-left apex - image-right apex) / film height
        base_lo, base_hi = extent["base"]
        (top_l, bot_l), (top_r, bot_r) = vertical_extent(labels, pair)
        cut = [[0.0, 1.0], [0.0, 1.0]]  # rows kept per lung, fractions of the film
        if top_l - top_r < top_lo:
            cut[0][0] = top_r + top_lo
        elif top_l - top_r > top_hi:
            cut[1][0] = top_l - top_hi
        if bot_l - bot_r > base_hi:
            cut[0][1] = bot_r + base_hi
        elif bot_l - bot_r < base_lo:
            cut[1][1] = bot_l - base_lo
        y = np.arange(h)[:, None] / h
        for k, (lo, hi) in zip(pair, cut):
            out[(labels == k) & ((y < lo) | (y > hi))] = False
    return clean_lung_mask(out)


LUNG_MEASURES = ("col", "row", "area")  # centroid column and row (fractions of the film), area (fraction)
BOUNDS_MARGIN = 0.25  # of the training films' range, added on each side of it


def lung_geometry(mask: np.ndarray) -> tuple[int, dict[str, dict[str, float]]]:
    """(number of connected pieces, the two largest as the image-left and image-right lung with
    :data:`LUNG_MEASURES`). Fewer than two pieces give fewer sides."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return 0, {}
    h, w = mask.shape
    sizes = np.bincount(labels.ravel())[1:]
    parts = []
    for i in np.argsort(sizes)[::-1][:2]:
        rows, cols = np.nonzero(labels == i + 1)
        parts.append({"col": float(cols.mean() / w), "row": float(rows.mean() / h), "area": float(len(rows) / (h * w))})
    parts.sort(key=lambda part: part["col"])
    return int(n), dict(zip(("image_left", "image_right") if len(parts) == 2 else ("only",), parts))


def lung_bounds(masks) -> dict[str, dict[str, list[float]]]:
    """From reference masks (the training split's): per side and measure, the range the films span,
    widened by ``BOUNDS_MARGIN`` of it on each side; and under "extent" the same for the gaps
    between the two lungs' apices and bases (image-left minus image-right, fractions of the film
    height: :func:`within_thorax`). Stored with the lung head's weights."""
    seen: dict[str, dict[str, list[float]]] = {}
    gaps: dict[str, list[float]] = {"apex": [], "base": []}
    for mask in masks:
        mask = np.asarray(mask, bool)
        _, sides = lung_geometry(mask)
        for side, measures in sides.items():
            for key, value in measures.items():
                seen.setdefault(side, {}).setdefault(key, []).append(value)
        if len(sides) == 2:
            labels, _ = ndimage.label(mask)
            (top_l, bot_l), (top_r, bot_r) = vertical_extent(labels, two_lungs(labels))
            gaps["apex"].append(top_l - top_r)
            gaps["base"].append(bot_l - bot_r)
    bounds = {}
    for side in ("image_left", "image_right"):
        bounds[side] = {}
        for key in LUNG_MEASURES:
            lo, hi = min(seen[side][key]), max(seen[side][key])
            margin = BOUNDS_MARGIN * (hi - lo)
            bounds[side][key] = [math.floor((lo - margin) * 1e4) / 1e4, math.ceil((hi + margin) * 1e4) / 1e4]
    bounds["extent"] = {}
    for key, values in gaps.items():
        lo, hi = min(values), max(values)
        margin = BOUNDS_MARGIN * (hi - lo)
        bounds["extent"][key] = [math.floor((lo - margin) * 1e4) / 1e4, math.ceil((hi + margin) * 1e4) / 1e4]
    return bounds


def two_lungs(labels: np.ndarray) -> list[int]:
    """The labels of the two largest pieces of a labelled mask, image-left first."""
    sizes = np.bincount(labels.ravel())[1:]
    return sorted((int(i) + 1 for i in np.argsort(sizes)[::-1][:2]), key=lambda k: np.nonzero(labels == k)[1].mean())


def vertical_extent(labels: np.ndarray, pieces: list[int]) -> list[tuple[float, float]]:
    """(top row, bottom row) of each labelled piece, as fractions of the film height."""
    extents = []
    for k in pieces:
        rows = np.nonzero((labels == k).any(axis=1))[0]
        extents.append((rows.min() / labels.shape[0], rows.max() / labels.shape[0]))
    return extents


def implausible_lungs(mask: np.ndarray, bounds: dict) -> str | None:
    """Why ``mask`` (after :func:`clean_lung_mask`) is not a pair of lungs like the training films'
    (``bounds`` from :func:`lung_bounds`), else None."""
    n, sides = lung_geometry(mask)
    if n != 2:
        return f"the lung mask has {n} pieces, not two lungs"
    for side, measures in sides.items():
        for key, value in measures.items():
            lo, hi = bounds[side][key]
            if not lo <= value <= hi:
                what = {"col": "centre column", "row": "centre row", "area": "area"}[key]
                return (f"the {side.replace('_', '-')} lung's {what} is {value:.3f} of the film, outside "
                        f"[{lo:.3f}, {hi:.3f}] where the training films' lie")
    return None


def abnormal_probability(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, dim=1)[:, 1]



# -- shipped weights ------------------------------------------------------------------------------
def load_trunk(path: Path) -> HydraTrunk:
    from pipelines import weights

    state, config = weights.load(path, "hydra-trunk")
    model = HydraTrunk(TrunkConfig(widths=tuple(config["widths"]), channels=config["channels"]))
    return weights.restore(model, state, path).eval()


@dataclass(frozen=True)
class HydraModels:
    trunk: HydraTrunk
    lungs: LungHead
    abnormality: AbnormalityHead
    threshold: float  # operating point on the abnormal probability (chosen on the validation split)
    head_scale: int  # the heads learnt from the trunk's features of a source upsampled by this factor
    versions: dict[str, str]  # file name -> "sha256:<first 12 hex digits>"
    digests: dict[str, str]  # file name -> full sha256 hex digest
    operating_point: dict | None  # threshold, sensitivity, specificity, held_out: measured on the test split
    lung_bounds: dict | None  # :func:`lung_bounds` of the training split's masks

    def to(self, device) -> "HydraModels":
        return replace(self, trunk=self.trunk.to(device), lungs=self.lungs.to(device),
                       abnormality=self.abnormality.to(device))


def load_models(folder: Path) -> HydraModels:
    """The trunk and both heads from ``folder``, each checked against its model card; the heads
    must have been trained on this very trunk."""
    from pipelines import weights

    folder = Path(folder)
    trunk = load_trunk(folder / TRUNK_FILE)
    digests = {name: weights.sha256(folder / name) for name in (TRUNK_FILE, LUNGS_FILE, ABNORMALITY_FILE)
               if (folder / name).exists()}
    lung_state, lung_cfg = weights.load(folder / LUNGS_FILE, "hydra-lungs")
    abn_state, abn_cfg = weights.load(folder / ABNORMALITY_FILE, "hydra-abnormality")
    for name, cfg in ((LUNGS_FILE, lung_cfg), (ABNORMALITY_FILE, abn_cfg)):
        if cfg.get("recipe", {}).get("trunk_sha256") != digests[TRUNK_FILE]:
            raise weights.WeightsError(f"{name} was trained on another trunk than {TRUNK_FILE}: retrain the heads")
    lungs = weights.restore(LungHead(lung_cfg["channels"], lung_cfg["grid"], lung_cfg.get("film", False)), lung_state, folder / LUNGS_FILE)
    abnormality = weights.restore(AbnormalityHead(abn_cfg["channels"]), abn_state, folder / ABNORMALITY_FILE)
    versions = {name: f"sha256:{digest[:12]}" for name, digest in digests.items()}
    scales = {cfg["recipe"].get("trunk_scale", 2) for cfg in (lung_cfg, abn_cfg)}
    if len(scales) != 1:
        raise weights.WeightsError(f"the heads were trained at different trunk scales {sorted(scales)}: retrain them")
    point = abn_cfg.get("operating_point")
    if point and point.get("threshold") != abn_cfg["threshold"]:
        point = None  # measured at another threshold
    return HydraModels(trunk, lungs.eval(), abnormality.eval(), float(abn_cfg["threshold"]), scales.pop(), versions,
                       digests, point, lung_cfg.get("lung_bounds"))


def require_measured(models: HydraModels) -> HydraModels:
    """``models`` if their cards carry what the pipeline's outputs state (the lung bounds from the
    training split, the operating point measured on the test split), else a WeightsError saying
    which command writes it."""
    from pipelines import weights

    if not models.lung_bounds:
        raise weights.WeightsError(f"{LUNGS_FILE} has no lung_bounds: run `srnode train cxr lung-bounds`")
    if not models.operating_point:
        raise weights.WeightsError(f"{ABNORMALITY_FILE} has no sensitivity and specificity measured at its "
                                   f"threshold: run `srnode eval cxr --update-cards`")
    return models
