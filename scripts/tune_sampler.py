"""
Choose a paired checkpoint's sampler on validation volumes of a make_dataset.py dataset
(guided_diffusion.evaluation.tuning.tune_sampler).

    python scripts/tune_sampler.py --val data/gd_val --paired checkpoint/demo_paired.pt \\
        --respacings ddim5 ddim10 10 --members 4 --z_range 40 72 --out results/sampler.json

Every validation volume is denoised with ``--members`` members by each respacing (``ddimN``:
DDIM, eta 0; ``N``: ancestral sampling), as ``scripts/test.py`` would with that
``--timestep_respacing`` (and, with ``--flip_options``, each ``--flips``). Per sampler: the mean
PSNR of one member and of the members' mean (UDPET convention, inside the body mask), the
calibration of the members' voxel-wise std (mean std / RMSE of the mean, Spearman rank
correlation of std with |error|) and the network evaluations per member. The table goes to stdout and ``--out``, best one-member PSNR first,
except the chosen row on top: the cheapest respacing within ``--tolerance_db`` dB of the best,
the default for ``scripts/package_checkpoint.py --sampling '{"timestep_respacing": ...}'``.
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
    parser.add_argument("--paired", required=True, help="paired checkpoint .pt")
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--respacings", nargs="+", default=["ddim5", "ddim10", "10"],
                        help="timestep respacings to compare")
    parser.add_argument("--flip_options", nargs="+", type=arguments.flips_argument, default=None, metavar="FLIPS",
                        help="test-time flips to compare with each respacing ('none' or axes among 'zxy', "
                             "e.g. none x xy; default: the checkpoint's)")
    parser.add_argument("--members", type=int, default=4, help="ensemble members per volume (>= 2)")
    parser.add_argument("--tolerance_db", type=float, default=0.05,
                        help="the cheapest respacing within this many dB of the best one-member PSNR is chosen")
    cases.add_validation_run_arguments(parser)
    return parser


def main(argv=None):
    args = create_argparser().parse_args(argv)
    cases.check_z_range(args.z_range)
    set_threads(args.threads)
    device = runtime_device(args)
    flip_options = [None] if args.flip_options is None else args.flip_options
    methods = {respacing + ("" if flips is None else f" flips {flips or 'none'}"):
               DiffusionMethod(args.paired, "paired",
                               dict(arguments.given_settings(args), timestep_respacing=respacing, flips=flips),
                               device=device, precision=args.precision)
               for respacing in args.respacings for flips in flip_options}
    scores, rows = tuning.tune_sampler(methods, args.val, args.members, drfs=args.drf,
                                       max_subjects=args.max_subjects, z_range=args.z_range,
                                       mask_suv=args.mask_suv, seed=args.seed,
                                       tolerance_db=args.tolerance_db)
    print(f"{'sampler':>18s} {'evals':>6s} {'PSNR 1':>8s} {'PSNR mean':>10s} {'std/RMSE':>9s} {'rank corr':>9s}")
    for row in rows:
        print(f"{row['sampler']:>18s} {row['evaluations']:6.0f} {row['psnr_one']:8.2f} "
              f"{row['psnr_mean']:10.2f} {row['std_over_rmse']:9.2f} {row['rank_correlation']:+9.2f}")
    print(f"chosen (cheapest within {args.tolerance_db} dB of the best one-member PSNR): {rows[0]['sampler']}")
    record = dict({k: v for k, v in vars(args).items() if k != "out"},
                  precision=next(iter(methods.values())).precision)
    volumes.atomic_write_bytes(args.out, json.dumps(portable_paths(dict(settings=record, rows=rows, scores=scores)),
                                                    indent=2) + "\n")
    return 0


if __name__ == "__main__":
    exit_on_user_error(main)
