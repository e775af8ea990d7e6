"""
Choose the noise-adaptive fusion's ``kappa`` (and compare windows) for a paired checkpoint on
validation volumes of a make_dataset.py dataset (guided_diffusion.evaluation.tuning).

    python scripts/tune_fusion.py --val data/val --paired checkpoint/demo_paired.pt \\
        --drf 4 20 100 --z_range 96 192 --out results/fusion_tuning.json

Every validation volume is denoised once with fusion off (``scripts/test.py``'s sampler and
settings resolution); each ``(kappa, window)`` of the grid then fuses that output with the
input (:func:`guided_diffusion.sampling.fusion.fuse_with_input`, cheap) and is scored by the
mean PSNR (UDPET convention, inside the body mask) over all volumes. The table (mean PSNR and
the gain per DRF over no fusion) goes to stdout and ``--out``; the best ``kappa`` is what
``scripts/package_checkpoint.py --sampling '{"fusion_kappa": K}'`` records as the checkpoint's
recommendation (the window is the library's ``FUSION_WINDOW``; pass a tuned one explicitly when
it differs).
"""

import argparse
import json

from guided_diffusion.evaluation import cases, tuning
from guided_diffusion.evaluation.methods import DiffusionMethod
from guided_diffusion.pet import volumes
from guided_diffusion.sampling import arguments, fusion
from guided_diffusion.sampling.hot_voxels import HOT_MODES
from guided_diffusion.script_util import runtime_device, set_threads


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--val", required=True, help="make_dataset.py directory (its val split)")
    parser.add_argument("--paired", required=True, help="paired checkpoint .pt")
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--kappas", type=float, nargs="+", default=[1.5, 2, 3, 4, 6])
    parser.add_argument("--windows", type=int, nargs="+", default=[5, fusion.FUSION_WINDOW])
    parser.add_argument("--steps", default=None, help="timestep respacing of the sampler (default: the sidecar's)")
    parser.add_argument("--hot_voxels", choices=HOT_MODES, default=None,
                        help="voxels above the model's SUV range (see scripts/test.py; default rescale)")
    cases.add_validation_run_arguments(parser)
    return parser


def main(argv=None):
    args = create_argparser().parse_args(argv)
    cases.check_z_range(args.z_range)
    if min(args.kappas) <= 0 or min(args.windows) < 1:
        raise ValueError("--kappas must be > 0 and --windows >= 1")
    set_threads(args.threads)
    given = dict(arguments.given_settings(args), timestep_respacing=args.steps)
    method = DiffusionMethod(args.paired, "paired", given, device=runtime_device(args), precision=args.precision)
    rows, count = tuning.tune_fusion(method, args.val, args.kappas, args.windows, drfs=args.drf,
                                     max_subjects=args.max_subjects, z_range=args.z_range,
                                     mask_suv=args.mask_suv, seed=args.seed)
    for row in rows:
        gains = " ".join(f"DRF {drf:g}: {gain:+.2f}" for drf, gain in row["gain_by_drf"].items())
        label = "no fusion" if not row["kappa"] else f"kappa {row['kappa']:g} window {row['window']}"
        print(f"{label:>22s}  mean PSNR {row['mean_psnr']:.3f} dB  gain {gains}")
    best = rows[0]
    print(f"best: kappa {best['kappa']:g}, window {best['window']}")
    record = dict({k: v for k, v in vars(args).items() if k != "out"}, precision=method.precision)
    volumes.atomic_write_bytes(args.out, json.dumps(dict(
        settings=record, volumes=count, rows=rows, best=dict(kappa=best["kappa"], window=best["window"])),
        indent=2))


if __name__ == "__main__":
    main()
