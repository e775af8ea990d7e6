"""
Tune BC-DPM's balance ``lambda``, Gaussian-filter sigma, number of conditioned steps ``l`` and
hot-voxel mode per dose level for a prior on validation volumes of a make_dataset.py dataset,
or on the out-of-distribution matrix's validation subjects (``--matrix_drfs``;
guided_diffusion.evaluation.tuning).

    python scripts/tune_bcdpm.py --val data/val --prior checkpoint/demo_prior.pt \\
        --z_range 112 176 --max_subjects 1 --out results/bcdpm_tuning.json

The paper fixes ``lambda = 0.2`` and sets ``l`` per count level (5 / 10 / 15); which values
work depends on the prior and on the noise, so every validation volume is denoised with each
``(l, sigma, lambda, hot-voxel mode)`` of the grid and scored by PSNR inside the body mask.
With ``--bc_start`` the chain starts at step ``l`` from the diffused input, so ``l`` also sets
how much diffusion noise is added to an input that may be nearly noise-free (low DRF). For each
DRF the best point becomes one row of the table, with the DRF's mean noise index; record it in
the prior's sidecar (``scripts/package_checkpoint.py --sampling '{"bc_tuning": [...]}'``) and
``scripts/test.py`` and ``scripts/quality_report.py`` pick the row nearest to each input's own
noise index.
"""

import argparse
import json

from guided_diffusion.evaluation import cases, robustness, tuning
from guided_diffusion.evaluation.methods import DiffusionMethod
from guided_diffusion.pet import volumes
from guided_diffusion.sampling import arguments
from guided_diffusion.sampling.hot_voxels import DEFAULT_HOT_MODE, HOT_MODES
from guided_diffusion.script_util import runtime_device, set_threads, str2bool


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--val", help="make_dataset.py directory (its val split)")
    source.add_argument("--matrix_drfs", type=float, nargs="+", default=None,
                        help="instead of --val: the out-of-distribution matrix's validation subjects of its "
                             "reference scan (scripts/robustness.py), simulated at these DRFs")
    parser.add_argument("--matrix_subjects", type=int, default=1, help="--matrix_drfs: subjects per DRF")
    parser.add_argument("--matrix_fov_scale", type=float, default=1.0,
                        help="--matrix_drfs: transaxial field-of-view scale (robustness.py --quick: 0.6)")
    parser.add_argument("--prior", required=True, help="BC-DPM prior checkpoint .pt")
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--sigmas_mm", type=float, nargs="+", default=[3.0, 6.0, 9.0, 12.0])
    parser.add_argument("--bc_steps", type=int, nargs="+", default=None,
                        help="l values (default: the prior's sidecar recommendation, else 10)")
    parser.add_argument("--hot_voxels", choices=HOT_MODES, nargs="+", default=[DEFAULT_HOT_MODE],
                        help="hot-voxel modes to try (see scripts/test.py)")
    parser.add_argument("--members", type=int, default=1,
                        help="ensemble size: each point is scored by its members' mean (record the table for "
                             "that --num_ensemble)")
    parser.add_argument("--bc_respacing", default="100", help="timestep respacing of the prior")
    parser.add_argument("--bc_start", type=str2bool, nargs="?", const=True, default=None,
                        help="start at step l from the diffused input (default: the prior's recommendation)")
    parser.add_argument("--bc_recon_iters", type=int, default=None, help="OSEM iterations of P^+ (default 2)")
    parser.add_argument("--bc_recon_subsets", type=int, default=None, help="OSEM subsets of P^+ (default 8)")
    cases.add_validation_run_arguments(parser)
    return parser


def main(argv=None):
    args = create_argparser().parse_args(argv)
    cases.check_z_range(args.z_range)
    if not all(0 <= v <= 1 for v in args.lambdas) or min(args.sigmas_mm) <= 0:
        raise ValueError("--lambdas must lie in [0, 1] and --sigmas_mm be > 0")
    set_threads(args.threads)
    # the largest l of the grid is checked against the sampler's steps; each point sets its own
    given = dict(arguments.given_settings(args), timestep_respacing=args.bc_respacing,
                 bc_steps=max(args.bc_steps) if args.bc_steps else None, hot_voxels=None, fusion_kappa=0.0)
    method = DiffusionMethod(args.prior, "bcdpm", given, device=runtime_device(args), precision=args.precision)
    steps = args.bc_steps or [method.run["bc_steps"]]
    grid = [dict(bc_steps=l, bc_sigma_mm=s, bc_lambda=lam, hot_voxels=hot)
            for l in steps for s in args.sigmas_mm for lam in args.lambdas for hot in args.hot_voxels]
    if args.val:
        scores, table = tuning.tune_bcdpm(method, args.val, grid, drfs=args.drf, max_subjects=args.max_subjects,
                                          z_range=args.z_range, mask_suv=args.mask_suv, seed=args.seed,
                                          members=args.members)
    else:
        val = robustness.validation_cases(args.matrix_drfs, args.matrix_subjects, args.matrix_fov_scale, log=print)
        scores, table = tuning.tune_bcdpm_on_cases(method, val, grid, seed=args.seed, members=args.members)
    for row in table:
        print(f"DRF {row['drf']:>5g}: noise index {row['noise_index']:.4f} SUV -> l {row['bc_steps']}, "
              f"lambda {row['bc_lambda']:g}, sigma {row['bc_sigma_mm']:g} mm, hot voxels {row['hot_voxels']} "
              f"(mean PSNR {row['psnr']:.2f} dB of the {row['members']}-member mean, {row['volumes']} volumes)")
    bc_tuning = [{k: row[k] for k in ("drf", "noise_index", "noise_estimator", *tuning.GRID_KEYS, "members")} for row in table]
    print(f"record it: python scripts/package_checkpoint.py ... --sampling '{json.dumps(dict(bc_tuning=bc_tuning))}'")
    record = dict({k: v for k, v in vars(args).items() if k != "out"}, bc_steps=steps,
                  bc_start=method.run["bc_start"], precision=method.precision)
    volumes.atomic_write_bytes(args.out, json.dumps(dict(
        settings=record, scores=scores, table=table, bc_tuning=bc_tuning), indent=2))


if __name__ == "__main__":
    main()
