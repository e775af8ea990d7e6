"""
Fit a paired posterior sampler's ensemble spread to the input's noise level on validation
volumes of a make_dataset.py dataset (guided_diffusion.evaluation.tuning.tune_spread).

    python scripts/tune_spread.py --val data/gd_val4 --paired checkpoint/demo_paired.pt \\
        --sigmas 0.0125 0.025 0.05 --members 4 --z_range 8 56 --out results/spread.json

A model that predicts x0 blended with x_t (``x0_skip_sigma`` s, model units) samples members
that differ by about s where the data leave the image uncertain; one s for every input
over-disperses clean inputs and under-disperses the noisiest. Every validation volume is
denoised with ``--members`` members at each ``--sigmas`` width (the sidecar's ensemble
respacing); per volume, the width at which the mean std equals the RMSE of the ensemble's image
(the one-member estimate where the sidecar recommends one, else the members' mean) is found, and ``s = s_ref (index / index_ref)^power`` is fitted over the volumes' noise indices.
The std is first pooled over the ``--std_fwhms_mm`` FWHM whose map ranks the voxels' errors best
(guided_diffusion.sampling.uncertainty). Record both in the sidecar (``scripts/package_checkpoint.py
--sampling '{"ensemble_spread": {...}, "std_fwhm_mm": F}'``) and ``scripts/test.py
--num_ensemble K`` sets s per input and pools its std map.
"""

import argparse
import json

from guided_diffusion.checkpoint_hub import portable_paths
from guided_diffusion.evaluation import cases, tuning
from guided_diffusion.evaluation.methods import DiffusionMethod
from guided_diffusion.pet import volumes
from guided_diffusion.sampling import arguments
from guided_diffusion.script_util import exit_on_user_error, runtime_device, set_threads


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--val", required=True, help="make_dataset.py directory (its val split)")
    parser.add_argument("--paired", required=True, help="paired posterior-sampler checkpoint .pt")
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0125, 0.025, 0.05],
                        help="blend widths s to try (model units, two or more)")
    parser.add_argument("--members", type=int, default=4, help="ensemble members per volume (>= 2)")
    parser.add_argument("--std_fwhms_mm", type=float, nargs="+", default=[0.0],
                        help="FWHMs (mm) to pool the members' variance over; the smallest within 0.01 of the "
                             "best mean rank correlation of std with |error| is chosen, then the widths are fitted")
    cases.add_validation_run_arguments(parser)
    return parser


def main(argv=None):
    args = create_argparser().parse_args(argv)
    cases.check_z_range(args.z_range)
    if len(args.sigmas) < 2 or min(args.sigmas) <= 0:
        raise ValueError("--sigmas needs two or more widths > 0")
    set_threads(args.threads)
    given = dict(arguments.given_settings(args), members=args.members)
    method = DiffusionMethod(args.paired, "paired", given, device=runtime_device(args), precision=args.precision)
    if min(args.std_fwhms_mm) < 0:
        raise ValueError("--std_fwhms_mm must be >= 0")
    scores, spread, fwhm = tuning.tune_spread(method, args.val, sorted(args.sigmas), args.members,
                                              fwhms_mm=sorted(set(args.std_fwhms_mm)), drfs=args.drf,
                                              max_subjects=args.max_subjects, z_range=args.z_range,
                                              mask_suv=args.mask_suv, seed=args.seed)
    print(f"{'volume':>40s} {'index':>7s} {'s':>7s} {'std/RMSE':>9s} {'rank corr':>9s} {'PSNR image':>10s} "
          f"{'PSNR mean':>9s}")
    for s in scores:
        print(f"{str(s['volume'])[-40:]:>40s} {s['noise_index']:7.4f} {s['x0_skip_sigma']:7.4f} "
              f"{s['std_over_rmse']:9.2f} {s['rank_correlation']:+9.2f} {s['psnr_image']:10.2f} {s['psnr_mean']:9.2f}")
    print(f"fit over {spread['volumes']} volumes: s = {spread['x0_skip_sigma']:.4f} x (index / "
          f"{spread['noise_index']:.4f})^{spread['power']:.2f}, within {spread['range']}")
    print("mean rank correlation per pooling FWHM: " + ", ".join(
        f"{f:g} mm {sum(s['pooled'][f]['rank_correlation'] for s in scores) / len(scores):+.3f}"
        for f in sorted(scores[0]["pooled"])) + f"; chosen {fwhm:g} mm")
    recommendation = dict(ensemble_spread=spread, std_fwhm_mm=fwhm)
    print(f"record it: python scripts/package_checkpoint.py ... --sampling '{json.dumps(recommendation)}'")
    record = dict({k: v for k, v in vars(args).items() if k != "out"}, precision=method.precision)
    volumes.atomic_write_bytes(args.out, json.dumps(portable_paths(dict(settings=record, scores=scores,
                                                                        **recommendation)), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    exit_on_user_error(main)
