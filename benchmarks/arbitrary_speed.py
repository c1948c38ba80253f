"""``arbitrary`` pipeline speed (Meta-Upscale) at integer and non-integer factors, against Lanczos.

    python benchmarks/arbitrary_speed.py [--slices 20]

Input: the 512 x 512 x SLICES CT of ``benchmarks/sr3d_speed.py`` (pydicom's real CT_small.dcm
resampled, 5 mm slices). Measured in one run, on whatever device torch picks (CUDA when present),
the whole pipeline with every output slice encoded as DICOM (``node.jobs.run_pipeline``):
  * reference: the same geometry with ``model: lanczos``;
  * ``model: meta`` in-plane x2, in-plane x1.4 (e.g. 0.7 mm pixels to 0.5 mm; a factor like this
    has 33 sub-pixel phases per axis, x2 has 2), and slices x2.5 (5 mm to 2 mm);
and prints seconds, output slices per second and the ratio to Lanczos.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.sr3d_speed import ct_volume, pipeline_seconds, print_against_lanczos  # noqa: E402
from pipelines import arbitrary, weights  # noqa: E402

RUNS = (("in-plane x2", {"scale": 2}, 1.0), ("in-plane x1.4", {"scale": 1.4}, 1.0),
        ("slices x2.5", {"scale": 1, "through_scale": 2.5}, 2.5))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=20)
    args = parser.parse_args()
    volume = ct_volume(args.slices)
    arbitrary.load_models(weights.weights_dir())  # load outside the timings
    dev = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"arbitrary pipeline, 512x512x{args.slices} CT, {dev}; DICOM outputs written")
    for label, geometry, through in RUNS:
        n_out = arbitrary.output_length(args.slices, through)
        seconds = {model: pipeline_seconds(volume, "arbitrary", {**geometry, "model": model})
                   for model in ("lanczos", "meta")}
        print_against_lanczos(label, seconds, n_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
