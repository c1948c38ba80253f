"""Array-level 3D super-resolution: the in-plane stage slice by slice, the through-plane stage in slabs.

Used by the ``sr3d`` pipeline and by ``srnode eval sr3d`` alike, so what is evaluated is what runs.

Intensities: the CNNs work on the [0, 1] window of :mod:`pipelines.volume_data` (CT HU clipped to
[-1024, 2976], MR at its 0.5/99.5 percentiles). Because the CNNs are residuals on Lanczos, the
result is written as ``lanczos(raw) + (cnn(x) - lanczos(x)) * window width``: inside the window
this equals the CNN's output, and values the window clips (metal, air padding, bright MR vessels)
keep their Lanczos-interpolated value instead of being cut off.

Through-plane: the network runs on the two views that contain the depth axis (rows x depth and
columns x depth) and the two results are averaged, as in the paper. x4 is x2 applied twice.
Slabs of output slices are computed from input slabs with ``halo`` extra slices on each side
(replicated at the ends of the volume): larger than the network's receptive field, so the result
does not depend on the slab size (a test checks this). Memory stays bounded by the slab size.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from pipelines.interpolation import apply_axis, resize, resize_weights
from pipelines.sr3d_cnn import SRCNN, halo, lanczos_up

BATCH_VOXELS = 2**21  # output pixels per forward batch (x 32 channels x 4 B x a few live tensors ~ 1 GB)
SLAB_VOXELS = 2**26  # output voxels per through-plane slab (256 MB float32; ~4x that in flight)


def _dihedral(axes: int) -> list[tuple[int, bool]]:
    """(rot90 count, flip columns) pairs: all 8 for in-plane; for one-axis models only those that
    keep the depth axis as the rows (flips of rows and of columns)."""
    if axes == 2:
        return [(k, f) for k in range(4) for f in (False, True)]
    return [(0, False), (0, True), (2, False), (2, True)]


def _transform(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = torch.rot90(x, k, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if flip else x


def _untransform(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = torch.flip(x, dims=(-1,)) if flip else x
    return torch.rot90(x, -k, dims=(-2, -1))


@torch.no_grad()
def cnn_images(model: SRCNN, images: np.ndarray, window: tuple[float, float], ensemble: bool = False) -> np.ndarray:
    """Super-resolve (N, H, W) images in modality units with ``model``; the output keeps the units."""
    r, axes = model.config.scale, model.config.axes
    dev = next(model.parameters()).device
    low, high = window
    n, h, w = images.shape
    out_shape = (n, h * r, w * r if axes == 2 else w)
    out = np.empty(out_shape, np.float32)
    per_image = out_shape[1] * out_shape[2]
    chunk = max(1, BATCH_VOXELS // per_image)
    for start in range(0, n, chunk):
        raw = torch.from_numpy(np.ascontiguousarray(images[start:start + chunk], np.float32))[:, None].to(dev)
        x = ((raw - low) / (high - low)).clamp(0, 1)
        if ensemble:
            outs = [_untransform(model(_transform(x, k, f))[0], k, f) for k, f in _dihedral(axes)]
            y = torch.stack(outs).median(dim=0).values
        else:
            y = model(x)[0]
        result = lanczos_up(raw, r, axes) + (y - lanczos_up(x, r, axes)) * (high - low)
        out[start:start + chunk] = result[:, 0].cpu().numpy()
    return out


Upsampler = Callable[[np.ndarray], np.ndarray]
"""(N, H, W) modality values -> (N, H*r, W*r) (in-plane) or (N, H*r, W) (one axis)."""


def cnn_upsampler(model: SRCNN, window: tuple[float, float], ensemble: bool = False) -> Upsampler:
    return lambda images: cnn_images(model, images, window, ensemble)


def inplane_stream(volume: np.ndarray, scale: int, upsampler: Upsampler | None, method: str = "lanczos",
                   times: int = 1) -> Iterator[np.ndarray]:
    """Each slice of ``volume`` (N, H, W) upsampled in-plane: by ``upsampler`` applied ``times``
    times, or (``upsampler`` None) by ``method`` interpolation with factor ``scale``. Slices go
    through in small batches (``BATCH_VOXELS`` output pixels)."""
    n, h, w = volume.shape
    chunk = max(1, BATCH_VOXELS // (h * w * scale * scale))
    for start in range(0, n, chunk):
        images = volume[start:start + chunk]
        if upsampler is None:
            images = resize(images, (h * scale, w * scale), method)
        else:
            for _ in range(times):
                images = upsampler(images)
        yield from images


def through_stream(slices: Iterable[np.ndarray], n: int, upsampler: Upsampler | None, method: str = "lanczos",
                   scale: int = 2) -> Iterator[np.ndarray]:
    """The ``n`` slices of ``slices`` (in order, along the normal) upsampled through-plane by ``scale``.

    With a CNN ``upsampler`` (x2 per pass, one-axis model) slabs are padded with :func:`halo`
    slices; with an interpolation ``method`` each slab uses the rows of the whole-axis weight matrix
    it needs, so it equals resizing the whole volume at once.
    """
    it = iter(slices)
    buffer: dict[int, np.ndarray] = {0: next(it)}
    next_in = 1
    pad = halo(scale) if upsampler is not None else 0
    weights = resize_weights(n, n * scale, method) if upsampler is None else None
    slab = max(1, SLAB_VOXELS // (buffer[0].size * scale))
    for z0 in range(0, n, slab):
        z1 = min(z0 + slab, n)
        if weights is not None:
            part = weights[scale * z0: scale * z1]
            lo, hi = int(part.indices.min()), int(part.indices.max()) + 1
        else:
            lo, hi = max(0, z0 - pad), min(n, z1 + pad)
        for k in [k for k in buffer if k < lo]:  # lo never decreases: these are done
            del buffer[k]
        while next_in < hi:
            buffer[next_in] = next(it)
            next_in += 1
        if weights is not None:
            out = apply_axis(np.stack([buffer[k] for k in range(lo, hi)]), 0, part[:, lo:hi])
        else:
            block = np.stack([buffer[min(max(k, 0), n - 1)] for k in range(z0 - pad, z1 + pad)])
            out = _through_views(block, upsampler)[scale * pad: scale * (pad + z1 - z0)]
        yield from out


def _through_views(block: np.ndarray, upsampler: Upsampler) -> np.ndarray:
    """(Z, Y, X) -> (Z*r, Y, X): the one-axis model on the (Z, X) views and the (Z, Y) views, averaged."""
    rows_view = upsampler(np.ascontiguousarray(block.transpose(1, 0, 2)))  # (Y, Z*r, X)
    cols_view = upsampler(np.ascontiguousarray(block.transpose(2, 0, 1)))  # (X, Z*r, Y)
    return 0.5 * (rows_view.transpose(1, 0, 2) + cols_view.transpose(1, 2, 0))
