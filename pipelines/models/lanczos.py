"""Lanczos-3 resampling of torch tensors at arbitrary source coordinates: the base every network here
adds its residual to, with the numbers of the interpolation baseline (:mod:`pipelines.models.interpolation`)."""
from __future__ import annotations

import numpy as np
import torch

from pipelines.models.interpolation import sample_weights


def centres(n_in: int, n_out: int) -> np.ndarray:
    """Source coordinates of the ``n_out`` samples that resize an axis of ``n_in`` (pixel centres
    aligned, the field of view kept)."""
    return (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5


def lanczos_at(x: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
    """Lanczos-3 samples of (N, C, H, W) at source coordinates ``rows`` x ``cols`` (upsampling: no
    antialiasing; taps outside the image renormalised, as :mod:`pipelines.models.interpolation`)."""
    wr = torch.from_numpy(sample_weights(x.shape[-2], rows, "lanczos").toarray()).to(x.device, x.dtype)
    wc = torch.from_numpy(sample_weights(x.shape[-1], cols, "lanczos").toarray()).to(x.device, x.dtype)
    return torch.matmul(torch.matmul(wr, x), wc.T)
