"""Image quality metrics and the SR loss, in torch, for images in [0, 1].

SSIM follows Wang et al. 2004 (Gaussian window, sigma 1.5, K1 0.01, K2 0.03, valid filtering).
MS-SSIM follows Wang et al. 2003: contrast-structure at every level, luminance at the last, the
standard five weights (renormalised when fewer levels are used), 2x average pooling between
levels. The window and number of levels are parameters because the paper's 5 levels with an
11-px window need images over 160 px; training crops use 3 levels and a 7-px window.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
C1, C2 = 0.01 ** 2, 0.03 ** 2


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image (N,) PSNR in dB for data range 1."""
    mse = ((pred - target) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def _window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def _ssim_parts(x: torch.Tensor, y: torch.Tensor, win: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(SSIM map mean, contrast-structure map mean), each (N,)."""
    groups = x.shape[1]
    mu_x = F.conv2d(x, win, groups=groups)
    mu_y = F.conv2d(y, win, groups=groups)
    sxx = F.conv2d(x * x, win, groups=groups) - mu_x ** 2
    syy = F.conv2d(y * y, win, groups=groups) - mu_y ** 2
    sxy = F.conv2d(x * y, win, groups=groups) - mu_x * mu_y
    cs = (2 * sxy + C2) / (sxx + syy + C2)
    lum = (2 * mu_x * mu_y + C1) / (mu_x ** 2 + mu_y ** 2 + C1)
    return (lum * cs).flatten(1).mean(1), cs.flatten(1).mean(1)


def ssim(pred: torch.Tensor, target: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    win = _window(window, sigma, pred.shape[1], pred.device, pred.dtype)
    return _ssim_parts(pred, target, win)[0]


def ms_ssim(pred: torch.Tensor, target: torch.Tensor, levels: int = 5, window: int = 11,
            sigma: float = 1.5) -> torch.Tensor:
    """Per image (N,) MS-SSIM. The smallest level must still be at least ``window`` px."""
    smallest = min(pred.shape[-2:]) // 2 ** (levels - 1)
    if smallest < window:
        raise ValueError(f"MS-SSIM with {levels} levels and a {window}-px window needs images of at least "
                         f"{window * 2 ** (levels - 1)} px, got {tuple(pred.shape[-2:])}")
    weights = torch.tensor(MS_SSIM_WEIGHTS[:levels], device=pred.device, dtype=pred.dtype)
    weights = weights / weights.sum()
    win = _window(window, sigma, pred.shape[1], pred.device, pred.dtype)
    values = []
    for level in range(levels):
        full, cs = _ssim_parts(pred, target, win)
        values.append(full if level == levels - 1 else cs)
        if level < levels - 1:
            pred, target = F.avg_pool2d(pred, 2), F.avg_pool2d(target, 2)
    stacked = torch.stack(values, dim=1).clamp_min(1e-6)  # (N, levels); negative cs would give NaN
    return torch.prod(stacked ** weights, dim=1)


def sr_loss(pred: torch.Tensor, target: torch.Tensor, levels: int = 3, window: int = 7) -> torch.Tensor:
    """The paper's loss: 0.6 * MAE + 0.4 * (1 - MS-SSIM)."""
    mae = (pred - target).abs().mean()
    return 0.6 * mae + 0.4 * (1 - ms_ssim(pred, target, levels=levels, window=window).mean())
