"""The networks (Hydra, the 3D CNN, Meta-Upscale, MDRN), the classical resamplers they build on
(cubic/Lanczos), the intensity window, and the array-level streaming that runs them on volumes."""
