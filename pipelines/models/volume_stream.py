"""Array-level super-resolution shared by the pipelines and their evaluations (what is evaluated is what runs).

Intensities: the networks work on a [0, 1] window (:mod:`pipelines.models.intensity`: CT HU clipped to
[-1024, 2976], MR at its 0.5/99.5 percentiles; projection images at their own percentiles). All of
them are residuals on Lanczos, so :func:`residual_images` writes ``lanczos(raw) + (net(x) -
lanczos(x)) * window width``: inside the window this equals the network's output, and values the
window clips (metal, air padding, bright MR vessels) keep their Lanczos value instead of being cut.

Slice axis: :func:`resample_stream` produces output slices at any source coordinates, in slabs
read with ``pad`` extra slices on each side, so memory stays bounded and the result does not depend
on the slab size (tests check this). One-axis networks run on the two views that contain the slice
axis (rows x depth, columns x depth), averaged, as in the Georgescu paper (:func:`through_views`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from pipelines.models.interpolation import apply_axis, resize, sample_weights
from pipelines.models.lanczos import centres, lanczos_at
from pipelines.models.mdrn import MDRN
from pipelines.models.mdrn import halo as mdrn_halo
from pipelines.models.meta_sr import MetaSR
from pipelines.models.meta_sr import halo as meta_halo
from pipelines.models.sr3d_cnn import SRCNN, halo

BATCH_VOXELS = 2**21  # output pixels per forward batch (x 32 channels x 4 B x a few live tensors ~ 1 GB)
SLAB_VOXELS = 2**27  # output voxels per through-plane slab (512 MB float32, about 2x that at the peak)
INTERP_PAD = 4  # > the widest interpolation kernel's radius (Lanczos-3)


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


Network = Callable[[torch.Tensor, np.ndarray, np.ndarray], torch.Tensor]
"""(B, 1, h, w) in [0, 1] and source coordinates (rows, cols) in that input -> (B, 1, len(rows), len(cols))."""


@torch.no_grad()
def residual_images(network: Network, images: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                    window: tuple[float, float], invert: bool = False, device: torch.device | str = "cpu",
                    halo: int = 0) -> np.ndarray:
    """A network's output for (N, h, w) images in modality units, sampled at source coordinates
    ``rows`` x ``cols``, back in modality units: ``lanczos(raw) + (network(x) - lanczos(x)) * width``
    with ``x`` the images on ``window`` (inverted for MONOCHROME1: the networks learned bright =
    dense). Images whose output exceeds ``BATCH_VOXELS`` pixels (a 2048-px radiograph at x2) go
    through in tiles read with ``halo`` extra input pixels (the network's receptive-field radius),
    so memory stays bounded and the result equals one whole-image forward."""
    n = images.shape[0]
    out = np.empty((n, len(rows), len(cols)), np.float32)
    per_image = len(rows) * len(cols)
    if per_image <= BATCH_VOXELS:
        chunk = max(1, BATCH_VOXELS // per_image)
        for start in range(0, n, chunk):
            out[start:start + chunk] = _residual(network, images[start:start + chunk], rows, cols, window, invert,
                                                 device)
        return out
    side = max(1, math.isqrt(BATCH_VOXELS))  # output pixels per tile side
    pad = max(halo, INTERP_PAD)
    h, w = images.shape[1:]
    for a in range(0, len(rows), side):
        r = rows[a:a + side]
        y0, y1 = max(0, math.floor(r[0]) - pad), min(h, math.ceil(r[-1]) + 1 + pad)
        for b in range(0, len(cols), side):
            c = cols[b:b + side]
            x0, x1 = max(0, math.floor(c[0]) - pad), min(w, math.ceil(c[-1]) + 1 + pad)
            for i in range(n):
                out[i, a:a + side, b:b + side] = _residual(network, images[i:i + 1, y0:y1, x0:x1], r - y0, c - x0,
                                                           window, invert, device)[0]
    return out


def _residual(network: Network, images: np.ndarray, rows: np.ndarray, cols: np.ndarray,
              window: tuple[float, float], invert: bool, device) -> np.ndarray:
    low, high = window
    sign = -1.0 if invert else 1.0
    raw = torch.from_numpy(np.ascontiguousarray(images, np.float32))[:, None].to(device)
    x = ((raw - low) / (high - low)).clamp(0, 1)
    x = 1.0 - x if invert else x
    result = lanczos_at(raw, rows, cols) + sign * (network(x, rows, cols) - lanczos_at(x, rows, cols)) * (high - low)
    return result[:, 0].cpu().numpy()


def grid_network(model: Callable[[torch.Tensor], torch.Tensor], row_scale: int, col_scale: int) -> Network:
    """A fixed-factor network (output on the grid ``centres(h, h * scale)``) as a :data:`Network`:
    its whole-grid output, then the samples at the requested coordinates."""

    def network(x: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        full = model(x)
        ri = torch.from_numpy(np.rint((rows + 0.5) * row_scale - 0.5).astype(np.int64)).to(full.device)
        ci = torch.from_numpy(np.rint((cols + 0.5) * col_scale - 0.5).astype(np.int64)).to(full.device)
        if len(ri) == full.shape[-2] and len(ci) == full.shape[-1]:
            return full
        return full.index_select(-2, ri).index_select(-1, ci)

    return network


def cnn_images(model: SRCNN, images: np.ndarray, window: tuple[float, float], ensemble: bool = False) -> np.ndarray:
    """Super-resolve (N, H, W) images in modality units with an sr3d CNN (``ensemble``: median of the
    flips/rotations of :func:`_dihedral`)."""
    r, axes = model.config.scale, model.config.axes
    h, w = images.shape[1:]

    def network(x: torch.Tensor) -> torch.Tensor:
        if not ensemble:
            return model(x)[0]
        outs = [_untransform(model(_transform(x, k, f))[0], k, f) for k, f in _dihedral(axes)]
        return torch.stack(outs).median(dim=0).values

    cols = centres(w, w * r) if axes == 2 else np.arange(w, dtype=np.float64)
    return residual_images(grid_network(network, r, r if axes == 2 else 1), images, centres(h, h * r), cols, window,
                           device=_device(model), halo=halo(r))


def meta_images(model: MetaSR, images: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                inverse_scales: tuple[float, float], window: tuple[float, float], invert: bool = False) -> np.ndarray:
    """Meta-Upscale samples of (N, h, w) images in modality units at source coordinates ``rows`` x ``cols``."""
    return residual_images(lambda x, r, c: model.sample(x, r, c, inverse_scales), images, rows, cols, window,
                           invert, _device(model), meta_halo(model.config))


def mdrn_images(model: MDRN, images: np.ndarray, scale: int, window: tuple[float, float],
                invert: bool = False) -> np.ndarray:
    h, w = images.shape[1:]
    return residual_images(grid_network(lambda x: model(x, scale), scale, scale), images, centres(h, h * scale),
                           centres(w, w * scale), window, invert, _device(model), mdrn_halo(model.config))


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


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
    """The ``n`` slices of ``slices`` (in order, along the normal) upsampled through-plane by ``scale``:
    by the one-axis CNN ``upsampler`` (x2 per pass) on both views, or by ``method`` interpolation."""
    coords = centres(n, n * scale)
    if upsampler is None:
        return resample_stream(slices, n, coords, interpolation_sampler(method), pad=INTERP_PAD, replicate=False)

    def sample(block: np.ndarray, local: np.ndarray) -> np.ndarray:
        up = through_views(block, upsampler)  # sub-pixel outputs of the whole block
        return up[np.rint((local + 0.5) * scale - 0.5).astype(np.int64)]

    return resample_stream(slices, n, coords, sample, pad=halo(scale), replicate=True)


Sampler = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(block (m, Y, X), source coordinates along axis 0 relative to the block) -> (len(coords), Y', X')."""


def interpolation_sampler(method: str) -> Sampler:
    return lambda block, local: apply_axis(block, 0, sample_weights(len(block), local, method))


def resample_stream(slices: Iterable[np.ndarray], n: int, coords: np.ndarray, sample: Sampler, pad: int,
                    replicate: bool) -> Iterator[np.ndarray]:
    """Output slices at source coordinates ``coords`` (ascending) along the stream of ``n`` slices.

    Outputs go in slabs of about ``SLAB_VOXELS``; each slab reads the source slices it needs plus
    ``pad`` on each side. With ``replicate`` (networks, which learned replicated edges) the volume's
    first and last slices are repeated beyond its ends, so every slab sees the same context as a
    whole-volume run; without it (interpolation) the block stops at the volume's ends, where the
    kernel renormalises exactly as on the whole axis. Either way the result does not depend on the
    slab size, as long as ``pad`` covers the sampler's reach.
    """
    it = iter(slices)
    buffer: dict[int, np.ndarray] = {0: next(it)}
    next_in = 1
    slab = max(1, SLAB_VOXELS // buffer[0].size)
    for j0 in range(0, len(coords), slab):
        part = coords[j0:j0 + slab]
        lo = int(np.floor(part.min())) - pad
        hi = int(np.ceil(part.max())) + pad + 1
        if not replicate:
            lo, hi = max(lo, 0), min(hi, n)
        indices = [min(max(k, 0), n - 1) for k in range(lo, hi)]
        for k in [k for k in buffer if k < min(indices)]:  # slabs move forward: these are done
            del buffer[k]
        while next_in <= max(indices):
            buffer[next_in] = next(it)
            next_in += 1
        yield from sample(np.stack([buffer[k] for k in indices]), part - lo)


def through_views(block: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """(Z, Y, X) -> (Z', Y, X): ``fn`` (a one-axis model: (B, Z, W) -> (B, Z', W)) on the (Z, X)
    views and on the (Z, Y) views, averaged, as in the paper. Views go through in batches and are
    added into one array, so the peak memory is the output slab plus one batch."""
    z, y, x = block.shape
    out = None
    step = max(1, BATCH_VOXELS // (4 * z * max(x, y)))
    for y0 in range(0, y, step):
        part = fn(np.ascontiguousarray(block[:, y0:y0 + step, :].transpose(1, 0, 2))).transpose(1, 0, 2)
        if out is None:
            out = np.empty((part.shape[0], y, x), np.float32)
        out[:, y0:y0 + step, :] = part
    for x0 in range(0, x, step):
        out[:, :, x0:x0 + step] += fn(np.ascontiguousarray(block[:, :, x0:x0 + step].transpose(2, 0, 1))).transpose(1, 2, 0)
    out *= 0.5
    return out
