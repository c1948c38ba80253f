"""Separable resampling with classic kernels (nearest, linear, cubic, Lanczos).

The same code upsamples images in the ``interp`` pipeline and makes the low-resolution inputs
for training (downscaling with antialiasing), so the degradation a model learns is exactly the
one it is evaluated against.

Conventions follow Pillow's ``Image.resize`` (``libImaging/Resample.c``):

- sample ``i`` of a length-``n`` axis resized to ``m`` sits at input coordinate
  ``(i + 0.5) * n / m - 0.5`` (pixel centres aligned, the field of view is kept);
- when downscaling by ``f = n / m > 1`` the kernel is stretched by ``f`` (antialiasing);
- taps outside the input are dropped and the remaining weights renormalised to sum 1, so a
  constant stays constant up to the border.

Nearest is point sampling (index ``floor((i + 0.5) * n / m)``), without antialiasing, so an integer
upscale duplicates pixels exactly. Kernels: linear = triangle; cubic = Keys (1981) with
``a = -0.5``; lanczos = ``sinc(x) sinc(x / 3)`` for ``|x| < 3``.

A resampling of one axis is a sparse (out, in) matrix (:func:`resize_weights`,
:func:`sample_weights`) applied with a sparse-dense matmul in float32 (:func:`apply_axis`); the
matrices are cached. ``matrix.toarray()`` gives the dense form for torch code.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
import scipy.sparse as sp

logger = logging.getLogger(__name__)

METHODS = ("nearest", "linear", "cubic", "lanczos")


def _linear(x: np.ndarray) -> np.ndarray:
    return np.clip(1.0 - np.abs(x), 0.0, None)


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _lanczos(x: np.ndarray, lobes: int = 3) -> np.ndarray:
    return np.where(np.abs(x) < lobes, np.sinc(x) * np.sinc(x / lobes), 0.0)


#: method -> (kernel, support radius in input samples at scale 1)
KERNELS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float]] = {
    "linear": (_linear, 1.0),
    "cubic": (_cubic, 2.0),
    "lanczos": (_lanczos, 3.0),
}


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown interpolation method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def sample_weights(in_len: int, centres: Sequence[float] | np.ndarray, method: str,
                   stretch: float = 1.0) -> sp.csr_array:
    """Weights that sample an axis of length ``in_len`` at fractional input coordinates.

    Parameters
    ----------
    in_len
        Number of input samples; input sample ``j`` is at coordinate ``j``.
    centres
        Coordinates of the output samples (may be outside ``[0, in_len - 1]``: the border taps are
        renormalised, which amounts to extending the edge).
    method
        One of :data:`METHODS`.
    stretch
        Kernel stretch factor, ``max(1, output spacing / input spacing)`` for antialiasing.

    Returns
    -------
    scipy.sparse.csr_array
        float32, shape ``(len(centres), in_len)``, each row summing to 1.
    """
    check_method(method)
    if in_len < 1:
        raise ValueError(f"in_len must be >= 1, got {in_len}")
    centres = np.asarray(centres, dtype=np.float64)
    out_len = centres.size
    if method == "nearest":
        cols = np.clip(np.floor(centres + 0.5), 0, in_len - 1).astype(np.int64)
        return sp.csr_array((np.ones(out_len, np.float32), (np.arange(out_len), cols)), shape=(out_len, in_len))
    kernel, radius = KERNELS[method]
    stretch = max(float(stretch), 1.0)
    support = radius * stretch
    width = int(np.ceil(2.0 * support)) + 1
    first = np.floor(centres - support).astype(np.int64) + 1
    cols = first[:, None] + np.arange(width)[None, :]
    weights = kernel((cols - centres[:, None]) / stretch)
    weights[(cols < 0) | (cols >= in_len)] = 0.0
    total = weights.sum(axis=1, keepdims=True)
    empty = total[:, 0] == 0.0
    if empty.any():  # only for centres far outside the input: fall back to the nearest sample
        nearest = np.clip(np.floor(centres[empty] + 0.5), 0, in_len - 1).astype(np.int64)
        weights[empty] = 0.0
        cols[empty] = nearest[:, None]
        weights[empty, 0] = 1.0
        total[empty] = 1.0
    weights /= total
    keep = weights != 0.0
    rows = np.broadcast_to(np.arange(out_len)[:, None], cols.shape)
    matrix = sp.csr_array(
        (weights[keep].astype(np.float32), (rows[keep], cols[keep])), shape=(out_len, in_len)
    )
    matrix.sum_duplicates()
    return matrix


@lru_cache(maxsize=64)
def resize_weights(in_len: int, out_len: int, method: str) -> sp.csr_array:
    """Weights resizing an axis from ``in_len`` to ``out_len`` samples (Pillow's alignment).

    Cached: treat the result as read-only.
    """
    if out_len < 1:
        raise ValueError(f"out_len must be >= 1, got {out_len}")
    factor = in_len / out_len
    centres = (np.arange(out_len) + 0.5) * factor - 0.5
    return sample_weights(in_len, centres, method, stretch=factor)


def apply_axis(x: np.ndarray, axis: int, weights: sp.csr_array) -> np.ndarray:
    """Apply an (out, in) weight matrix along ``axis`` of ``x``; returns float32, C-contiguous."""
    x = np.asarray(x, dtype=np.float32)
    axis = axis % x.ndim
    if x.shape[axis] != weights.shape[1]:
        raise ValueError(f"axis {axis} has length {x.shape[axis]}, weights expect {weights.shape[1]}")
    moved = np.moveaxis(x, axis, 0)
    flat = np.ascontiguousarray(moved).reshape(moved.shape[0], -1)
    out = (weights @ flat).astype(np.float32, copy=False)
    out = out.reshape((weights.shape[0],) + moved.shape[1:])
    return np.ascontiguousarray(np.moveaxis(out, 0, axis))


def resize_axis(x: np.ndarray, axis: int, out_len: int, method: str) -> np.ndarray:
    """Resize one axis of ``x`` to ``out_len`` samples (float32 result)."""
    in_len = x.shape[axis]
    if out_len == in_len:
        return np.asarray(x, dtype=np.float32)
    return apply_axis(x, axis, resize_weights(in_len, out_len, method))


def resize(x: np.ndarray, shape: Sequence[int | None], method: str) -> np.ndarray:
    """Resize the last ``len(shape)`` axes of ``x`` (``None`` keeps an axis); float32 result.

    Axes that shrink are done first, so the intermediate arrays stay small.
    """
    if len(shape) > x.ndim:
        raise ValueError(f"shape {tuple(shape)} has more axes than the array ({x.ndim})")
    offset = x.ndim - len(shape)
    todo = [(offset + i, n) for i, n in enumerate(shape) if n is not None and n != x.shape[offset + i]]
    todo.sort(key=lambda item: item[1] / x.shape[item[0]])
    out = np.asarray(x, dtype=np.float32)
    for axis, n in todo:
        out = resize_axis(out, axis, int(n), method)
    return out
