"""The networks (Hydra, the 3D CNN, Meta-Upscale, MDRN), the classical resamplers they build on
(cubic/Lanczos), the intensity window, and the array-level streaming that runs them on volumes."""
from __future__ import annotations


def parameter_count(model) -> int:
    """Trainable parameters of a ``torch.nn.Module`` (BatchNorm's running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
