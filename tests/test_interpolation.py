"""Separable resampling: agreement with Pillow, constants, exact duplication, interpolating kernels."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.models.interpolation import (
    METHODS,
    apply_axis,
    resize,
    resize_axis,
    resize_weights,
    sample_weights,
)

PIL_FILTERS = {"linear": Image.Resampling.BILINEAR, "cubic": Image.Resampling.BICUBIC,
               "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(1234).random((37, 53)).astype(np.float32)


@pytest.mark.parametrize("method", ["linear", "cubic", "lanczos", "nearest"])
@pytest.mark.parametrize("shape", [(74, 106), (93, 133), (15, 20), (50, 31)], ids=["x2", "x2.5", "down", "mixed"])
def test_matches_pillow_mode_f(image: np.ndarray, method: str, shape: tuple[int, int]) -> None:
    ref = np.asarray(Image.fromarray(image, mode="F").resize((shape[1], shape[0]), PIL_FILTERS[method]))
    got = resize(image, shape, method)
    assert got.dtype == np.float32 and got.shape == shape
    assert np.abs(got - ref).max() < 1e-5


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("out_len", [7, 13, 40, 61])
def test_constant_is_preserved(method: str, out_len: int) -> None:
    x = np.full((13, 5), -1024.0, dtype=np.float32)
    y = resize_axis(x, 0, out_len, method)
    assert y.shape == (out_len, 5)
    np.testing.assert_allclose(y, -1024.0, rtol=0, atol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_weight_rows_sum_to_one(method: str) -> None:
    for in_len, out_len in [(10, 20), (20, 7), (1, 4), (5, 5)]:
        weights = resize_weights(in_len, out_len, method)
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)


def test_nearest_integer_scale_duplicates_exactly(image: np.ndarray) -> None:
    got = resize(image, (image.shape[0] * 3, image.shape[1] * 2), "nearest")
    np.testing.assert_array_equal(got, np.repeat(np.repeat(image, 3, axis=0), 2, axis=1))


@pytest.mark.parametrize("method", ["linear", "cubic", "lanczos"])
def test_sampling_at_source_positions_is_exact(image: np.ndarray, method: str) -> None:
    """Through-plane rule: output slices at source positions reproduce the source slices."""
    n = image.shape[0]
    centres = np.linspace(0, n - 1, 2 * (n - 1) + 1)
    got = apply_axis(image, 0, sample_weights(n, centres, method))
    np.testing.assert_allclose(got[::2], image, atol=1e-6)
    linear_mid = apply_axis(image, 0, sample_weights(n, centres, "linear"))[1::2]
    np.testing.assert_allclose(linear_mid, 0.5 * (image[:-1] + image[1:]), atol=1e-6)


def test_downscale_is_antialiased() -> None:
    """A Nyquist-rate stripe pattern averages out instead of aliasing when shrunk by 4."""
    stripes = np.tile(np.array([0.0, 1.0], dtype=np.float32), 64)[None, :].repeat(4, axis=0)
    for method in ("linear", "cubic", "lanczos"):
        small = resize(stripes, (4, 32), method)
        np.testing.assert_allclose(small[:, 2:-2], 0.5, atol=0.02)


def test_resize_keeps_leading_axes_and_unchanged_axes() -> None:
    vol = np.random.default_rng(0).random((3, 8, 6)).astype(np.float32)
    out = resize(vol, (None, 16, 6), "cubic")
    assert out.shape == (3, 16, 6)
    for k in range(3):
        np.testing.assert_allclose(out[k], resize(vol[k], (16, 6), "cubic"), atol=1e-6)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="method"):
        resize_weights(4, 8, "bilinear")
    with pytest.raises(ValueError, match="out_len"):
        resize_weights(4, 0, "linear")
    with pytest.raises(ValueError, match="more axes"):
        resize(np.zeros(4), (2, 2), "linear")
