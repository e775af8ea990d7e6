"""Benchmark the PET projector: forward / back projection and OSEM iteration times, peak memory
(guided_diffusion.evaluation.speed).

Cases (each in a fresh process so its peak RSS is its own):
  ecat921_2d   128 x 128 image (4 mm voxels), 160 x 192 sinogram; compared in the same run with
               skimage.transform.radon + iradon(filter_name=None) on the same image and views.
  demo_3d      demo scanner, 32 x 32 x 16 volume (4 mm), oblique segments (max ring difference 7).
  quadra_ssrb  one Biograph Vision Quadra slab of 192 x 288 x 96 voxels at 1.65 mm, direct planes.
  quadra_3d    the same slab with oblique segments up to --quadra-mrd (span --quadra-span); only
               one OSEM subset (views k::n) is projected and the full-view figures are
               extrapolated from it (reported as such) to keep the run feasible on a small CPU.

Usage: python scripts/benchmark_projector.py [--json OUT] [--threads N] [--cases ...]
"""

import argparse
import json
import multiprocessing
import os
import platform
import sys

from guided_diffusion.evaluation import speed
from guided_diffusion.pet import volumes
from guided_diffusion.script_util import add_runtime_arguments


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (best of) for small cases")
    parser.add_argument("--cases", nargs="+", default=list(speed.PROJECTOR_CASES), choices=speed.PROJECTOR_CASES)
    parser.add_argument("--quadra-mrd", type=int, default=4, help="max ring difference of quadra_3d")
    parser.add_argument("--quadra-span", type=int, default=3, help="span of quadra_3d")
    parser.add_argument("--quadra-view-fraction", type=int, default=19,
                        help="quadra_3d projects views 0::N only and extrapolates (default 19)")
    add_runtime_arguments(parser, seed_help="seed of the test image and its counts", precision=False)
    return parser


def main(argv=None):
    args = create_argparser().parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    context = multiprocessing.get_context("spawn")
    results = {"host": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": threads},
               "cases": []}
    for name in args.cases:
        with context.Pool(1) as pool:
            row = pool.apply(speed.projector_case, (name, threads, args.repeats, args.quadra_mrd,
                                                    args.quadra_span, args.quadra_view_fraction, args.seed))
        results["cases"].append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        volumes.atomic_write_bytes(args.json, json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
