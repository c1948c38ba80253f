"""sr3d pipeline speed on a 512x512xN CT: in-plane x2, and x2 on every axis, against Lanczos.

    python benchmarks/sr3d_speed.py [--slices 100] [--ensemble]

Input: pydicom's real CT_small.dcm (128 x 128) resampled to 512 x 512 and stacked into SLICES
slices at 5 mm (each slice shifted so the volume is not constant along the normal). Measured in one
run, on whatever device torch picks (CUDA when present), the whole pipeline with every output
slice encoded as DICOM (``node.jobs.run_pipeline``, files written):
  * reference: the same pipeline with ``model: lanczos`` (same geometry, interpolation only);
  * ``model: cnn`` (the shipped CNNs), in-plane x2 and x2 on every axis;
and prints seconds, slices per second and the ratios. ``--ensemble`` adds the self-ensemble runs.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from pydicom import dcmread  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from node.jobs import run_pipeline  # noqa: E402
from pipelines import sr3d, weights  # noqa: E402
from pipelines.models.interpolation import resize  # noqa: E402


def ct_volume(slices: int, size: int = 512) -> list:
    src = dcmread(get_testdata_file("CT_small.dcm"))
    base = resize(src.pixel_array.astype(np.float32), (size, size), "cubic")
    iop = np.array([float(v) for v in src.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    origin = np.array([float(v) for v in src.ImagePositionPatient])
    series = generate_uid()
    out = []
    for k in range(slices):
        ds = dcmread(get_testdata_file("CT_small.dcm"))
        shifted = np.roll(base, k, axis=1)
        ds.set_pixel_data(np.clip(np.rint(shifted), -32768, 32767).astype(np.int16), "MONOCHROME2", 16,
                          generate_instance_uid=False)
        ds.PixelSpacing = [f"{float(v) * 128 / size:.6f}" for v in src.PixelSpacing]
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + 5.0 * k * normal]
        ds.SliceThickness = "5"
        if "SliceLocation" in ds:
            del ds.SliceLocation
        out.append(ds)
    return out


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def pipeline_seconds(volume: list, pipeline: str, options: dict) -> float:
    """Seconds for ``pipeline`` on ``volume`` with every output written to a temporary folder."""
    out = Path(tempfile.mkdtemp(prefix=f"{pipeline}-bench-"))
    try:
        return timed(lambda: run_pipeline(volume, pipeline, options, out))
    finally:
        shutil.rmtree(out, ignore_errors=True)


def print_against_lanczos(label: str, seconds: dict[str, float], n_out: int) -> None:
    for model, s in seconds.items():
        ratio = "" if model == "lanczos" else f"   = {s / seconds['lanczos']:6.1f} x lanczos"
        print(f"  {label:14s} {model:13s} {s:8.1f} s  {n_out / s:7.2f} output slices/s{ratio}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--ensemble", action="store_true")
    args = parser.parse_args()
    volume = ct_volume(args.slices)
    sr3d.load_models(weights.weights_dir())  # load outside the timings
    dev = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    runs = [("in-plane x2", {"inplane_scale": 2}), ("x2 every axis", {"inplane_scale": 2, "through_scale": 2})]
    print(f"sr3d pipeline, 512x512x{args.slices} CT, {dev}; DICOM outputs written")
    for label, geometry in runs:
        n_out = args.slices * geometry.get("through_scale", 1)
        seconds = {}
        models = ["lanczos", "cnn"] + (["cnn+ensemble"] if args.ensemble else [])
        for model in models:
            options = {**geometry, "model": "cnn" if model.startswith("cnn") else model}
            if model == "cnn+ensemble":
                options["self_ensemble"] = True
            seconds[model] = pipeline_seconds(volume, "sr3d", options)
        print_against_lanczos(label, seconds, n_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
