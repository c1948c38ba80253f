"""The [0, 1] intensity window the CT/MR networks work on, the same in training, evaluation and the pipeline.

  * CT: Hounsfield units clipped to ``CT_RANGE`` = [-1024, 2976] and mapped to [0, 1];
  * MR: clipped per volume at its 0.5 and 99.5 percentiles and mapped to [0, 1].
Never min-max per slice. PSNR is reported on these [0, 1] ranges.
"""
from __future__ import annotations

import numpy as np

from pipelines.dicom import input_checks

CT_RANGE = (-1024.0, 2976.0)
MR_PERCENTILES = (0.5, 99.5)


def normaliser(volume: np.ndarray, modality: str) -> tuple[float, float]:
    """(low, high) of the fixed intensity window that maps to [0, 1] for this volume; a CT volume
    that is one value in the CT window (e.g. a RescaleSlope of 1e-9) is refused (:class:`Refusal`)."""
    if modality == "CT":
        input_checks.check_contrast(volume, CT_RANGE, "CT")
        return CT_RANGE
    low, high = np.percentile(volume, MR_PERCENTILES)
    return float(low), float(max(high, low + 1e-3))


def normalise(volume: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    low, high = window
    return np.clip((volume - low) / (high - low), 0.0, 1.0).astype(np.float32)
