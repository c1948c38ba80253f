"""CT and MR training/evaluation volumes (``shared/data``): splits, intensities, the SR degradation.

Splits (fixed, by name; at least one CT and one MR volume are never trained on):
  * ``test``: CT ``totalseg_basel_abdomen_ct`` (DICOM, 20 x 512^2, 2D only: 2 mm spacing is not
    isotropic) and ``totalseg_aorta_chest_ct_1p5mm`` (NIfTI, 1.5 mm isotropic, 2D and 3D);
    MR ``ixi015_hh_1258_t1_2mm`` (NIfTI, 2 mm isotropic, 2D and 3D) and ``decubitus_hfs_t1_sag``
    (DICOM, 35 x 256^2 sagittal, 2D only).
  * ``train``: every other CT/MR volume in ``ct/``, ``ct_nifti/``, ``mr/``, ``mr_nifti/`` (the
    JPEG 2000 copy of the MR phantom is left out: it is the same phantom as the JPEG-LS one).

Intensities: :mod:`pipelines.models.intensity` (the same in training, evaluation and the pipeline).

Degradation (training and evaluation): antialiased cubic downscaling by the factor on the axes
being super-resolved (:mod:`pipelines.models.interpolation`, Pillow's BICUBIC convention). Training adds
the paper's augmentation: a 3x3 Gaussian blur with sigma ~ U(0, 0.5) on half of the samples,
before downscaling.

Other ways of making the LR image (:data:`DEGRADATIONS`, :func:`degrade`; the ``mix`` training recipe
and ``srnode eval sr3d --degradations``): ``area`` (the mean of each block of factor x factor HR
pixels: a detector that integrates over its pixel), ``gaussian`` (a Gaussian point-spread function of
``sigma`` HR pixels, sampled at the LR pixel centres: blur then decimation), and antialiased ``linear``
or ``lanczos`` downscaling. Every one keeps Pillow's alignment (LR pixel ``i`` is centred at HR
coordinate ``(i + 0.5) * factor - 0.5``), so the upsamplers see the same geometry whatever the
degradation. :func:`add_noise`: Gaussian noise of a fraction of the intensity window.

Thick slices (:data:`SLAB_PROFILES`, kinds ``slab``, ``slab-triangle``, ``slab-gaussian``; the ``slab``
through-plane training recipe and ``srnode eval sr3d --through``): a scanner's thick slice is the average of
the anatomy over its slice profile, not one thin slice picked out. Each LR slice is the weighted mean of the HR
slices its profile covers, the profile's full width at half maximum being ``factor`` HR slices (contiguous thick
slices): ``box`` (the mean of the ``factor`` slices it covers: the same weights as ``area``), ``triangle``
(base 2 x factor, overlapping its neighbours: a spiral CT's slice sensitivity profile) and ``gaussian``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from pipelines.dicom.series import decode
from pipelines.models.intensity import normalise, normaliser
import scipy.sparse as sp

from pipelines.models.interpolation import apply_axis, resize_axis, resize_weights

@dataclass(frozen=True)
class VolumeSource:
    name: str
    modality: str  # "CT" or "MR"
    path: str  # relative to the data root: a DICOM folder or a .nii.gz file
    split: str  # "train" or "test"
    isotropic: bool  # through-plane ground truth exists (3D evaluation / through-plane training views)


SOURCES = (
    VolumeSource("philips_phantom_ct_5mm", "CT", "ct/philips_phantom_ct_5mm", "train", False),
    VolumeSource("ge_head_ct_tilt", "CT", "ct/ge_head_ct_tilt", "train", False),
    VolumeSource("dcmqi_ge_abdomen_ct_3slice", "CT", "ct/dcmqi_ge_abdomen_ct_3slice", "train", False),
    VolumeSource("totalseg_example_ct_abdomen_3mm", "CT", "ct_nifti/totalseg_example_ct_abdomen_3mm.nii.gz", "train", True),
    VolumeSource("studyforrest_sub02_t1w", "MR", "mr/studyforrest_sub02_t1w", "train", True),
    VolumeSource("phantom_t1_jpegll", "MR", "mr/phantom_t1_jpegll", "train", False),
    VolumeSource("mni_icbm152_t1_2009a", "MR", "mr_nifti/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "train", True),
    VolumeSource("ixi012_hh_1211_t1_2mm", "MR", "mr_nifti/ixi012_hh_1211_t1_2mm.nii.gz", "train", True),
    VolumeSource("totalseg_example_mr_abdomen_3mm", "MR", "mr_nifti/totalseg_example_mr_abdomen_3mm.nii.gz", "train", True),
    VolumeSource("totalseg_basel_abdomen_ct", "CT", "ct/totalseg_basel_abdomen_ct", "test", False),
    VolumeSource("totalseg_aorta_chest_ct_1p5mm", "CT", "ct_nifti/totalseg_aorta_chest_ct_1p5mm.nii.gz", "test", True),
    VolumeSource("ixi015_hh_1258_t1_2mm", "MR", "mr_nifti/ixi015_hh_1258_t1_2mm.nii.gz", "test", True),
    VolumeSource("decubitus_hfs_t1_sag", "MR", "mr/decubitus_hfs_t1_sag", "test", False),
)


def default_data_dir() -> Path:
    """``$SRNODE_DATA``, else ``shared/data`` next to the repository."""
    env = os.environ.get("SRNODE_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def sources(split: str) -> list[VolumeSource]:
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}: train or test")
    return [s for s in SOURCES if s.split == split]


def read_volume(source: VolumeSource, data_dir: Path) -> np.ndarray:
    """(slices, rows, columns) float32 in modality units (HU for CT), slices in file order for DICOM."""
    path = Path(data_dir) / source.path
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing (set SRNODE_DATA or --data)")
    if path.suffix == ".gz":
        import nibabel  # only training and evaluation read NIfTI

        data = np.asarray(nibabel.load(str(path)).dataobj, dtype=np.float32)
        return np.ascontiguousarray(data.transpose(2, 1, 0))
    datasets = [pydicom.dcmread(f) for f in sorted(path.iterdir()) if f.is_file()]
    datasets.sort(key=lambda ds: int(ds.get("InstanceNumber") or 0))
    return np.stack([decode(ds) for ds in datasets])


def load(source: VolumeSource, data_dir: Path) -> np.ndarray:
    """The volume in [0, 1] (see the module docstring)."""
    volume = read_volume(source, data_dir)
    return normalise(volume, normaliser(volume, source.modality))


def downscale(hr: np.ndarray, scale: int, axes: tuple[int, ...]) -> np.ndarray:
    """The LR input for ``hr``: antialiased cubic downscaling by ``scale`` on ``axes`` (lengths must
    be multiples of ``scale``)."""
    out = hr
    for axis in axes:
        n = hr.shape[axis]
        if n % scale:
            raise ValueError(f"axis {axis} has {n} samples, not a multiple of {scale}: crop first")
        out = resize_axis(out, axis, n // scale, "cubic")
    return out


def crop_to(volume: np.ndarray, multiple: int, axes: tuple[int, ...]) -> np.ndarray:
    index = [slice(None)] * volume.ndim
    for axis in axes:
        index[axis] = slice(0, volume.shape[axis] // multiple * multiple)
    return volume[tuple(index)]


def gaussian_blur3(images: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """3x3 Gaussian blur of each (H, W) image of ``images`` (N, H, W) with its own sigma (0: none);
    edges replicated."""
    out = images.copy()
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)), mode="edge")
    for i, sigma in enumerate(sigmas):
        if sigma <= 0:
            continue
        g = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * sigma * sigma))
        g /= g.sum()
        rows = g[0] * padded[i, :-2] + g[1] * padded[i, 1:-1] + g[2] * padded[i, 2:]
        out[i] = g[0] * rows[:, :-2] + g[1] * rows[:, 1:-1] + g[2] * rows[:, 2:]
    return out



DEGRADATIONS = ("cubic", "area", "gaussian", "linear", "lanczos", "slab", "slab-triangle", "slab-gaussian")
#: slice profiles of a thick slice, FWHM = the factor in HR slices (degradation kinds ``slab`` / ``slab-<profile>``)
SLAB_PROFILES = {"box": "slab", "triangle": "slab-triangle", "gaussian": "slab-gaussian"}
FWHM_TO_SIGMA = 1 / (2 * np.sqrt(2 * np.log(2)))
#: Gaussian PSF sigma of the evaluation, in HR pixels per unit of factor (0.6 HR px at x2)
PSF_SIGMA_PER_SCALE = 0.3


def psf_sigma(scale: int) -> float:
    return PSF_SIGMA_PER_SCALE * scale


def degradation_weights(n: int, scale: int, kind: str, sigma: float | None = None) -> sp.csr_array:
    """(n // scale, n) float32 matrix making the LR samples of an axis of ``n`` HR samples, rows summing to 1."""
    m = n // scale
    if kind in ("cubic", "linear", "lanczos"):
        return resize_weights(n, m, kind)
    if kind in ("area", "slab"):
        cols = np.arange(m * scale)
        return sp.csr_array((np.full(cols.size, 1 / scale, np.float32), (cols // scale, cols)), shape=(m, n))
    if kind == "slab-triangle":
        centres = (np.arange(m) + 0.5) * scale - 0.5
        cols = np.floor(centres).astype(np.int64)[:, None] + np.arange(-scale + 1, scale + 1)[None, :]
        w = np.clip(1 - np.abs(cols - centres[:, None]) / scale, 0, None)
        return _normalised(w, cols, n, m)
    if kind == "slab-gaussian":
        return degradation_weights(n, scale, "gaussian", scale * FWHM_TO_SIGMA)
    if kind == "gaussian":
        sigma = psf_sigma(scale) if sigma is None else float(sigma)
        if sigma <= 0:
            raise ValueError(f"PSF sigma must be > 0, got {sigma}")
        centres = (np.arange(m) + 0.5) * scale - 0.5
        radius = int(np.ceil(3 * sigma)) + 1
        cols = np.floor(centres).astype(np.int64)[:, None] + np.arange(-radius + 1, radius + 1)[None, :]
        w = np.exp(-((cols - centres[:, None]) ** 2) / (2 * sigma * sigma))
        return _normalised(w, cols, n, m)
    raise ValueError(f"unknown degradation {kind!r}: {', '.join(DEGRADATIONS)}")


def _normalised(w: np.ndarray, cols: np.ndarray, n: int, m: int) -> sp.csr_array:
    """(m, n) matrix of the tap weights ``w`` at HR indices ``cols`` (m, taps): taps outside the axis dropped,
    the rest renormalised (as Pillow does)."""
    w = np.where((cols < 0) | (cols >= n), 0.0, w)
    w = w / w.sum(axis=1, keepdims=True)
    keep = w > 0
    rows = np.broadcast_to(np.arange(m)[:, None], cols.shape)
    return sp.csr_array((w[keep].astype(np.float32), (rows[keep], cols[keep])), shape=(m, n))


def degrade(hr: np.ndarray, scale: int, axes: tuple[int, ...], kind: str = "cubic",
            sigma: float | None = None) -> np.ndarray:
    """The LR image of ``hr`` under degradation ``kind`` on ``axes`` (lengths multiples of ``scale``);
    ``sigma``: the Gaussian PSF's, in HR pixels (default :func:`psf_sigma`)."""
    out = np.asarray(hr, dtype=np.float32)
    for axis in axes:
        n = out.shape[axis]
        if n % scale:
            raise ValueError(f"axis {axis} has {n} samples, not a multiple of {scale}: crop first")
        out = apply_axis(out, axis, degradation_weights(n, scale, kind, sigma))
    return out


def add_noise(image: np.ndarray, fraction: float, span: float, rng: np.random.Generator) -> np.ndarray:
    """``image`` plus Gaussian noise of standard deviation ``fraction * span`` (float32)."""
    if fraction <= 0:
        return np.asarray(image, dtype=np.float32)
    return (image + rng.normal(0.0, fraction * span, image.shape)).astype(np.float32)
