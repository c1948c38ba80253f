"""CXR pipeline speed: the default pipeline (MDRN SR at x2-x4 + the Hydra trunk for the heads), the
Hydra trunk shared by SR and both heads, and three separate models, against Lanczos.

    python benchmarks/cxr_speed.py [--size 2048] [--scale 2] [--repeats 1] [--models mdrn meta]

Input: pydicom-data's real CR (RG1_UNCR.dcm) resampled to SIZE x SIZE and written as a CR. Measured in
one run, on whatever device torch picks (CUDA when present):
  * reference: Lanczos upsampling of the image alone (the baseline every SR output is judged against);
  * the `cxr` pipeline with its default options, all outputs (SR series by the scale's best network,
    ``cxr.BEST_MODEL``, + lung SEG + nodule SR), DICOM encoding included;
  * `cxr` pipeline with ``model: hydra``, all outputs:
    one trunk forward for a 512-px film at x2, else the SR forward plus the heads' 1024-px forward
    (the geometry they were trained on, ``cxr.heads_input``);
  * the traditional approach with the same models: three separate forwards (SR; trunk + lung head;
    trunk + abnormality head, each head's encoder at the heads' geometry), as three independent
    networks of this size would cost;
  * the pipeline with ``model: mdrn`` / ``meta`` (that network's SR series, tiled, plus the trunk
    forward the heads need), all outputs;
and prints seconds and ratios. On a GPU it also prints images per second for the pipeline.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from pydicom import dcmread  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

from node.jobs import run_pipeline  # noqa: E402
from pipelines import cxr, weights  # noqa: E402
from pipelines.dicom.series import decode  # noqa: E402
from pipelines.models import hydra, parameter_count  # noqa: E402
from pipelines.models.interpolation import resize  # noqa: E402


def square_cr(size: int):
    src = dcmread(get_testdata_file("RG1_UNCR.dcm"))
    pixels = resize(decode(src), (size, size), "cubic")
    ds = copy.deepcopy(src)
    top = 2 ** int(src.BitsStored) - 1
    ds.set_pixel_data(np.clip(np.rint(pixels), 0, top).astype(np.uint16), src.PhotometricInterpretation,
                      int(src.BitsStored), generate_instance_uid=False)
    return ds


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (weights loaded, kernels chosen)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--scale", type=int, default=2, choices=cxr.SCALES)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--models", nargs="*", default=["meta"], choices=["mdrn", "meta"],
                        help="also time the pipeline with these SR networks (scales 2-4)")
    args = parser.parse_args()
    ds = square_cr(args.size)
    models = cxr.load_models(weights.weights_dir())
    x, _ = cxr.to_model_input(decode(ds), ds)
    up = resize(x, (args.size * args.scale,) * 2, "cubic")
    head_up = cxr.heads_input(x, models.head_scale)
    out_dir = Path(tempfile.mkdtemp(prefix="cxr-bench-"))

    def pipeline():
        run_pipeline([ds], "cxr", {"scale": args.scale, "model": "hydra"}, out_dir)

    def three_models():
        cxr.trunk_tiled(models.trunk, up, models.lungs.grid)  # SR model
        _, pooled = cxr.trunk_tiled(models.trunk, head_up, models.lungs.grid)  # segmentation model's encoder
        hydra.lung_mask(models.lungs, pooled, x.shape, x, models.lung_bounds)
        _, pooled = cxr.trunk_tiled(models.trunk, head_up, models.lungs.grid)  # classification model's encoder
        models.abnormality(pooled.mean(dim=(2, 3)))

    lanczos = timed(lambda: resize(x, (args.size * args.scale,) * 2, "lanczos"), args.repeats)
    default = timed(lambda: run_pipeline([ds], "cxr", {"scale": args.scale}, out_dir), args.repeats)
    one = timed(pipeline, args.repeats)
    with torch.no_grad():
        three = timed(three_models, args.repeats)
    dev = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"cxr pipeline, {args.size}x{args.size} CR at x{args.scale}, {dev}, trunk "
          f"{parameter_count(models.trunk):,} parameters, mean of {args.repeats}")
    print(f"  Lanczos upsampling alone (reference)               {lanczos:8.2f} s")
    print(f"  pipeline, default ({cxr.BEST_MODEL[args.scale]} SR + heads), 3 outputs   {default:8.2f} s   "
          f"= {default / lanczos:6.1f} x Lanczos")
    shared = "one forward" if up.shape == head_up.shape else "SR + heads forward"
    print(f"  Hydra pipeline ({shared}), 3 DICOM outputs  {one:8.2f} s   = {one / lanczos:6.1f} x Lanczos")
    print(f"  three separate models (forwards only, no DICOM)    {three:8.2f} s   = {three / lanczos:6.1f} x Lanczos")
    print(f"  ratio three separate / Hydra                       {three / one:8.2f}")
    for name in args.models if args.scale in (2, 3, 4) else []:
        t = timed(lambda name=name: run_pipeline([ds], "cxr", {"scale": args.scale, "model": name}, out_dir),
                  args.repeats)
        print(f"  pipeline with model: {name:<5} (+ trunk for the heads) {t:8.2f} s   = {t / lanczos:6.1f} x Lanczos")
    if torch.cuda.is_available():
        print(f"  images per second (pipeline)                       {1 / one:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
