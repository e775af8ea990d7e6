"""
Model-card quality protocol: tuned Gaussian vs the paired 3D DDPM vs BC-DPM on a make_dataset.py
dataset, with the quality-bar verdict (guided_diffusion.evaluation.quality).

    python scripts/quality_report.py --val data/demo --test data/demo \\
        --paired checkpoint/demo_paired.pt --prior checkpoint/demo_prior.pt --out results/quality

1. Gaussian baseline: per dose reduction factor (DRF), the filter width of ``--fwhm_grid_mm``
   (FWHM in mm) with the best mean PSNR (UDPET convention) inside the body mask (full dose >
   ``--mask_suv`` SUV) over the validation volumes, saved to ``OUTDIR/gaussian_params.json``.
2. Every held-out test volume (each subject, tracer and DRF) is denoised in-process: ``paired``
   (the paired checkpoint, low dose as input channel), ``unet`` (the supervised U-Net baseline,
   one step), ``bcdpm`` (the prior plus BC-DPM's
   block, simulating the dataset's scanner settings and the file's counts from its subject
   manifest), and the tuned Gaussian. Every sampling flag resolves as ``scripts/test.py``'s:
   flag > the checkpoint's tuning table > its sidecar > the toolkit's default.
3. Metrics of ``low_dose``, ``gaussian``, ``paired``, ``unet``, ``bcdpm`` against the full dose with the
   dataset's organ and lesion labels, inside the body mask.
4. ``OUTDIR/per_volume.csv``, ``summary.md`` / ``summary.json`` (mean +- sd per method and DRF),
   ``quality_vs_drf.png`` and ``example.png`` (coronal MIPs of one test volume), and the
   quality-bar verdict on stdout.

``--z_range START STOP`` keeps the axial slices ``START:STOP`` of every volume (a cheap CPU run);
it is recorded in every output. Without ``--paired`` or ``--prior`` that method is skipped.
"""

import argparse
import os

from guided_diffusion.evaluation import cases, quality
from guided_diffusion.evaluation.methods import DiffusionMethod
from guided_diffusion.sampling import arguments
from guided_diffusion.script_util import add_runtime_arguments, runtime_device, set_threads, exit_on_user_error


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--val", required=True,
                        help="validation split: a make_dataset.py directory (its val.txt) or a list")
    parser.add_argument("--test", required=True,
                        help="test split: a make_dataset.py directory (its test.txt) or a list")
    parser.add_argument("--paired", default=None, help="paired checkpoint .pt (skipped if absent)")
    parser.add_argument("--unet", default=None,
                        help="supervised 3D U-Net baseline checkpoint .pt (a --regression model, "
                             "method 'unet'; skipped if absent)")
    parser.add_argument("--prior", default=None,
                        help="BC-DPM prior: an unconditional checkpoint, or a paired one trained "
                             "with --cond_dropout (skipped if absent)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--json", default=None, help="also write summary.json here")
    parser.add_argument("--drf", type=float, nargs="+", default=None,
                        help="dose reduction factors to evaluate (default: every DRF of the test split)")
    parser.add_argument("--max_subjects", type=int, default=0,
                        help="use at most this many subjects per split (0: all)")
    parser.add_argument("--z_range", type=int, nargs=2, default=None, metavar=("START", "STOP"),
                        help="keep only the axial slices START:STOP of every volume")
    parser.add_argument("--mask_suv", type=float, default=0.05, help="body mask: full-dose voxels above this SUV")
    parser.add_argument("--fwhm_grid_mm", type=float, nargs="+", default=[0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0],
                        help="Gaussian FWHM grid (mm) searched per DRF on the validation split")
    parser.add_argument("--steps", default=None,
                        help="timestep_respacing of the paired model ('ddimN': DDIM; default: its sidecar's)")
    parser.add_argument("--bc_respacing", default=None,
                        help="timestep_respacing of the BC-DPM prior (default: its sidecar's)")
    parser.add_argument("--num_ensemble", type=int, default=None,
                        help="members averaged per volume (default: each checkpoint's, scripts/test.py's default)")
    add_runtime_arguments(parser, seed_help="sampling seed", device=True)
    arguments.add_patching_arguments(parser)
    arguments.add_guidance_arguments(parser)
    return parser


def main(argv=None):
    args = create_argparser().parse_args(argv)
    cases.check_z_range(args.z_range)
    bad_ensemble = args.num_ensemble is not None and args.num_ensemble < 1
    if args.max_subjects < 0 or bad_ensemble or any(f < 0 for f in args.fwhm_grid_mm):
        raise ValueError("--max_subjects must be >= 0, --num_ensemble >= 1, --fwhm_grid_mm widths >= 0")
    set_threads(args.threads)
    device = runtime_device(args)
    given = arguments.given_settings(args)
    respacing = dict(paired=args.steps, unet=None, bcdpm=args.bc_respacing)
    diffusion = {}
    for name, mode, flag, path in (("paired", "paired", "--paired", args.paired),
                                   ("unet", "paired", "--unet", args.unet),
                                   ("bcdpm", "bcdpm", "--prior", args.prior)):
        if path is not None:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: checkpoint not found ({flag})")
            diffusion[name] = DiffusionMethod(path, mode, dict(given, timestep_respacing=respacing[name]),
                                              device=device, precision=args.precision,
                                              defaults=arguments.noise_class_defaults(args))
    markdown, _ = quality.run_report(
        args.val, args.test, args.out, diffusion, drfs=args.drf, max_subjects=args.max_subjects,
        z_range=args.z_range, mask_suv=args.mask_suv, fwhm_grid_mm=args.fwhm_grid_mm,
        num_ensemble=args.num_ensemble, seed=args.seed, json_copy=args.json,
        settings=dict(vars(args), device=str(device)))
    print(markdown)
    return 0


if __name__ == "__main__":
    exit_on_user_error(main)
