"""
Choose the noise-adaptive fusion's ``kappa`` (and compare windows) for a paired checkpoint on
validation volumes of a make_dataset.py dataset.

    python scripts/tune_fusion.py --val data/val --paired checkpoint/demo_paired.pt \\
        --drf 4 20 100 --z_range 96 192 --out results/fusion_tuning.json

Every validation volume is denoised once with fusion off (``scripts/test.py``'s sampler,
``--hot_voxels`` as there); each ``(kappa, window)`` of the grid then fuses that output with the
input (:func:`guided_diffusion.sampling.fusion.fuse_with_input`, cheap) and is scored by the mean PSNR
(UDPET convention, inside the body mask) over all volumes. The table (mean PSNR and the gain
per DRF over no fusion) goes to stdout and ``--out``; the best ``kappa`` is what
``scripts/package_checkpoint.py --sampling '{"fusion_kappa": K}'`` records as the checkpoint's
recommendation (the window is the library's ``FUSION_WINDOW``; pass a tuned one explicitly when
it differs).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # quality_report, when imported

import numpy as np
import torch
from tqdm.auto import tqdm

from guided_diffusion.sampling.hot_voxels import HOT_MODES
from guided_diffusion.evaluation import metrics
from guided_diffusion.pet import volumes
from guided_diffusion.sampling import fusion

import quality_report


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--val", required=True, help="make_dataset.py directory (its val split)")
    parser.add_argument("--paired", required=True, help="paired checkpoint .pt")
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--drf", type=float, nargs="+", default=None, help="DRFs to use (default all)")
    parser.add_argument("--max_subjects", type=int, default=0, help="first N subjects (0: all)")
    parser.add_argument("--z_range", type=int, nargs=2, default=None, metavar=("START", "STOP"))
    parser.add_argument("--mask_suv", type=float, default=0.05, help="body mask: full dose > this SUV")
    parser.add_argument("--kappas", type=float, nargs="+", default=[1.5, 2, 3, 4, 6])
    parser.add_argument("--windows", type=int, nargs="+", default=[5, fusion.FUSION_WINDOW])
    parser.add_argument("--steps", default="ddim10", help="timestep respacing of the sampler")
    parser.add_argument("--patch_z", type=int, default=None, help="slab depth (model voxels)")
    parser.add_argument("--patch_overlap", type=int, default=None,
                        help="patch overlap (voxels; default: the checkpoint's recommendation, else 8)")
    parser.add_argument("--batch_size", type=int, default=1, help="patches per network call")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--hot_voxels", choices=HOT_MODES, default="rescale")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def score_grid(cases, kappas, windows):
    """Rows ``{"kappa", "window", "mean_psnr", "gain_by_drf"}`` (kappa 0: no fusion) for
    ``cases`` = ``[{"full", "low", "mask", "drf", "denoised"}]``, best mean PSNR first."""
    psnr = {}
    for index, case in enumerate(cases):
        psnr[index, 0.0, 0] = metrics.psnr(case["full"], case["denoised"], mask=case["mask"])
        for kappa in kappas:
            for window in windows:
                fused = fusion.fuse_with_input(case["denoised"], case["low"], kappa, window)[0]
                psnr[index, kappa, window] = metrics.psnr(case["full"], fused, mask=case["mask"])
    drfs = sorted({case["drf"] for case in cases})
    rows = []
    for kappa, window in [(0.0, 0)] + [(k, w) for k in kappas for w in windows]:
        gains = {drf: float(np.mean([psnr[i, kappa, window] - psnr[i, 0.0, 0]
                                     for i, case in enumerate(cases) if case["drf"] == drf]))
                 for drf in drfs}
        rows.append(dict(kappa=kappa, window=window, gain_by_drf=gains,
                         mean_psnr=float(np.mean([psnr[i, kappa, window] for i in range(len(cases))]))))
    return sorted(rows, key=lambda row: -row["mean_psnr"])


def main(argv=None):
    args = create_argparser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.kappas or min(args.kappas) <= 0 or not args.windows or min(args.windows) < 1:
        raise ValueError("--kappas must be > 0 and --windows >= 1")
    sampler = argparse.Namespace(**vars(args), prior=None, fusion_kappa=0.0, num_ensemble=1)
    methods = quality_report.DiffusionMethods(sampler, torch.device(args.device))
    drfs = None if args.drf is None else [float(d) for d in args.drf]
    cases = []
    for description in tqdm(quality_report.select_files(args.val, "val", drfs, args.max_subjects),
                            desc="validation volumes"):
        case = quality_report.load_case(description, args.z_range, args.mask_suv)
        denoised = methods.denoise("paired", case)[0]
        cases.append(dict(full=case["full"], low=case["low"], mask=case["mask"], drf=case["drf"],
                          denoised=denoised))
    rows = score_grid(cases, args.kappas, args.windows)
    for row in rows:
        gains = " ".join(f"DRF {drf:g}: {gain:+.2f}" for drf, gain in row["gain_by_drf"].items())
        label = "no fusion" if not row["kappa"] else f"kappa {row['kappa']:g} window {row['window']}"
        print(f"{label:>22s}  mean PSNR {row['mean_psnr']:.3f} dB  gain {gains}")
    best = rows[0]
    print(f"best: kappa {best['kappa']:g}, window {best['window']}")
    volumes.atomic_write_bytes(args.out, json.dumps(dict(
        settings={k: v for k, v in vars(args).items() if k != "out"}, volumes=len(cases),
        rows=rows, best=dict(kappa=best["kappa"], window=best["window"])), indent=2))


if __name__ == "__main__":
    main()
