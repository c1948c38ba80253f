"""What ``srnode eval sr3d`` and its tables (:mod:`~pipelines.evaluation.degradation_table`,
:mod:`~pipelines.evaluation.through_table`) share: the volume metric and the pipeline's 3D path.

* :func:`metrics`: PSNR on the fixed intensity window of :mod:`pipelines.models.intensity` (CT
  [-1024, 2976] HU, MR the HR volume's 0.5/99.5 percentiles) mapped to [0, 1], over the whole volume;
  SSIM (11-px Gaussian window) averaged over the slices along the first axis.
* :func:`sr3d_cnn`: the in-plane CNN (or MDRN), then the through-plane CNN, exactly as the pipeline
  runs them (:mod:`pipelines.models.volume_stream`).
"""
from __future__ import annotations

import numpy as np
import torch

from pipelines.evaluation.image_metrics import ssim
from pipelines.models import intensity
from pipelines.models.volume_stream import cnn_upsampler, inplane_stream, mdrn_images, through_stream


def metrics(pred: np.ndarray, target: np.ndarray, window: tuple[float, float]) -> dict[str, float]:
    p = intensity.normalise(pred, window)
    t = intensity.normalise(target, window)
    mse = float(np.mean((p - t) ** 2, dtype=np.float64))
    with torch.no_grad():
        s = ssim(torch.from_numpy(p)[:, None], torch.from_numpy(t)[:, None]).mean().item()
    return {"psnr": 10 * np.log10(1.0 / max(mse, 1e-12)), "ssim": s}


def mdrn_upsampler(mdrn, scale: int, window):
    return lambda images: mdrn_images(mdrn, images, scale, window)


def sr3d_cnn(lr: np.ndarray, window, models, scale: int, mdrn=None, ensemble: bool = False) -> np.ndarray:
    """The pipeline's 3D path: the in-plane CNN (or MDRN), then the through-plane CNN on both views;
    ``ensemble``: both CNN stages as a self-ensemble (the pipeline's ``self_ensemble``)."""
    inplane = (cnn_upsampler(models.inplane[scale], window, ensemble) if mdrn is None
               else mdrn_upsampler(mdrn, scale, window))
    stream = inplane_stream(lr, scale, inplane)
    through = cnn_upsampler(models.through, window, ensemble)
    n = lr.shape[0]
    for _ in range(int(np.log2(scale))):
        stream = through_stream(stream, n, through, scale=2)
        n *= 2
    return np.stack(list(stream))
