"""Benchmark the PET projector: forward / back projection and OSEM iteration times, peak memory.

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
import resource
import sys
import time



def _timed(fn, repeats):
    """Best wall time (s) of ``repeats`` calls and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _projector_case(name, preset, shape, voxel, options, n_subsets, repeats, views_fraction=1):
    import torch

    from guided_diffusion.pet import recon, simulate
    from guided_diffusion.pet.projector import make_projector

    start = time.perf_counter()
    projector = make_projector(preset, shape, voxel, **options)
    n_views_full = projector.sinogram_shape[1]
    if views_fraction > 1:
        projector = projector.subset(0, views_fraction)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    y = projector.forward(x)                        # first call builds (and caches) the system matrix
    build_s = time.perf_counter() - start
    forward_s, y = _timed(lambda: projector.forward(x), repeats)
    back_s, _ = _timed(lambda: projector.adjoint(y), repeats)
    data = simulate.expected_data(x, projector, total_counts=1e6 * shape[2])
    counts = simulate.poisson(data.ybar, seed=0)
    subsets = n_subsets if views_fraction == 1 else 1
    recon.osem(counts, projector, 1, n_subsets=subsets, scale=data.scale)    # builds subset matrices
    # one OSEM call with one iteration: sensitivity images + one pass over all subsets
    osem_s, _ = _timed(lambda: recon.osem(counts, projector, 1, n_subsets=subsets, scale=data.scale), repeats)
    row = {
        "case": name, "preset": preset, "image_shape": list(shape), "voxel_mm": voxel,
        "options": {k: v for k, v in options.items()}, "sinogram_shape": list(projector.sinogram_shape),
        "build_s": round(build_s, 4), "forward_s": round(forward_s, 4), "back_s": round(back_s, 4),
        "osem_1iter_incl_sensitivity_s": round(osem_s, 4), "osem_subsets": n_subsets,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }
    if views_fraction > 1:
        row.update({
            "views_projected": projector.sinogram_shape[1], "views_total": n_views_full,
            "forward_s_all_views_extrapolated": round(forward_s * views_fraction, 2),
            "back_s_all_views_extrapolated": round(back_s * views_fraction, 2),
            "osem_1iter_incl_sensitivity_s_extrapolated": round(osem_s * views_fraction, 2),
            "note": f"timed on views 0::{views_fraction}; full-view figures extrapolated linearly",
        })
    return row


def _skimage_pair(repeats):
    import numpy as np
    from skimage.transform import iradon, radon

    image = np.random.default_rng(0).random((128, 128))
    theta = np.arange(192) * 180.0 / 192
    out = {}
    for circle in (True, False):
        forward_s, sino = _timed(lambda: radon(image, theta, circle=circle), repeats)
        back_s, _ = _timed(lambda: iradon(sino, theta, filter_name=None, circle=circle, output_size=128), repeats)
        out[f"circle_{circle}"] = {"forward_s": round(forward_s, 4), "back_s": round(back_s, 4),
                                   "sinogram_shape": list(sino.shape)}
    return out


def _run_case(args):
    name, threads, repeats, mrd, span, fraction = args
    import torch

    torch.set_num_threads(threads)
    if name == "ecat921_2d":
        row = _projector_case(name, "ecat921_2d", (128, 128, 1), 4.0, {"mode": "2d"}, 8, repeats)
        row["skimage"] = _skimage_pair(repeats)
        ours = row["forward_s"] + row["back_s"]
        row["speedup_vs_skimage"] = {
            key: round((v["forward_s"] + v["back_s"]) / ours, 2) for key, v in row["skimage"].items()}
        return row
    if name == "demo_3d":
        return _projector_case(name, "demo", (32, 32, 16), 4.0, {"mode": "3d", "max_ring_difference": 7}, 8,
                               repeats)
    if name == "quadra_ssrb":
        return _projector_case(name, "quadra", (192, 288, 96), 1.65, {"mode": "ssrb", "cache_bytes": 3 << 30},
                               19, 1)
    if name == "quadra_3d":
        options = {"mode": "3d", "max_ring_difference": mrd, "span": span}
        return _projector_case(name, "quadra", (192, 288, 96), 1.65, options, 19, 1, views_fraction=fraction)
    raise ValueError(f"unknown case {name!r}")


CASES = ("ecat921_2d", "demo_3d", "quadra_ssrb", "quadra_3d")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (best of) for small cases")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--quadra-mrd", type=int, default=4, help="max ring difference of quadra_3d")
    parser.add_argument("--quadra-span", type=int, default=3, help="span of quadra_3d")
    parser.add_argument("--quadra-view-fraction", type=int, default=19,
                        help="quadra_3d projects views 0::N only and extrapolates (default 19)")
    args = parser.parse_args(argv)

    context = multiprocessing.get_context("spawn")
    results = {"host": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads},
               "cases": []}
    for name in args.cases:
        with context.Pool(1) as pool:
            row = pool.apply(_run_case, ((name, args.threads, args.repeats, args.quadra_mrd,
                                          args.quadra_span, args.quadra_view_fraction),))
        results["cases"].append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
