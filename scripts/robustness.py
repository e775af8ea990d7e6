"""
The out-of-distribution test matrix: denoisers on data unlike their training data.

    python scripts/robustness.py --model checkpoint/demo_paired.pt --model checkpoint/demo_prior.pt \\
        --json results/robustness/matrix.json

Cells vary one factor at a time around a training-like reference scan (OSEM 2x8 with PSF,
3.3 mm, FDG, DRF 10, torso): reconstruction (OSEM 4x8 without PSF, MLEM 100 without PSF,
a 4 mm post-filter), native voxel size (1.65 / 2 / 4 mm), tracer (PSMA), dose (DRF 4 / 50) and
anatomy (a head with a folded cortex, random "dead leaves" structure). MLEM 100 without PSF and
1.65 mm are held out of the toolkit's training recipes. Volumes are simulated on the fly from
subjects no training set uses: a validation subject per cell tunes the Gaussian FWHM and BM3D
sigma, test subjects score every method (PSNR / SSIM in the body, lesion SUVmean / SUVmax bias).
Each checkpoint runs in its default mode (paired, or BC-DPM for a prior) with its sidecar's
settings. Writes ``--json OUT``, ``OUT``'s stem + ``.md`` (the table) and ``.png`` (the PSNR gain
over the tuned Gaussian per cell and method), rewritten after every cell (``complete`` marks
the end). ``--members K``: K-member ensembles of the sampling models (mean, one sample and the
std's calibration). ``--oracle_draws K``: the oracle and the PSNR bound per cell (the most
any denoiser can reach; the full dose is itself noisy). ``--quick``: 3 cells, a smaller field of view,
no BM3D, one test subject.
"""

import argparse
import json
import os
import sys

from guided_diffusion.evaluation import robustness
from guided_diffusion.evaluation.statistics import finite_or_none
from guided_diffusion.pet import volumes
from guided_diffusion.sampling import arguments
from guided_diffusion.script_util import add_runtime_arguments, runtime_device, set_threads, exit_on_user_error


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], help="checkpoint .pt (repeatable)")
    parser.add_argument("--json", required=True, help="results JSON (table and heat map beside it)")
    parser.add_argument("--quick", action="store_true", help="3 cells, small volumes, no BM3D")
    parser.add_argument("--test_subjects", type=int, default=None, help="per cell (default 2; quick 1)")
    parser.add_argument("--val_subjects", type=int, default=1, help="per cell, to tune the baselines")
    parser.add_argument("--no_bm3d", action="store_true", help="skip BM3D (its tuning is the slowest part)")
    parser.add_argument("--members", type=int, default=None,
                        help="ensemble members per sampling model (default: each checkpoint's, as scripts/test.py): "
                             "for >= 2 scores the mean and one sample, and the std's calibration against the error")
    parser.add_argument("--oracle_draws", type=int, default=0,
                        help="K > 0: score the oracle (the full dose's posterior mean given the low-dose counts and "
                             "the true activity, K Monte Carlo draws) and the PSNR bound no denoiser can beat")
    parser.add_argument("--steps", default=None, help="timestep_respacing of every model (default: each sidecar's)")
    arguments.add_patching_arguments(parser)
    parser.add_argument("--cells", type=int, nargs="+", default=None, help="run only these cell indices")
    add_runtime_arguments(parser, seed_help="sampling seed", device=True)
    return parser


def write_report(args, results, complete):
    """``--json``, its table (``.md``) and heat map (``.png``) of the cells done so far: the table."""
    stem = os.path.splitext(args.json)[0]
    report = dict(settings=vars(args), complete=complete, cells=results)
    volumes.atomic_write_bytes(args.json, json.dumps(finite_or_none(report), indent=2, default=str) + "\n")
    table = robustness.markdown(results)
    volumes.atomic_write_bytes(stem + ".md", table + "\n")
    robustness.heat_map(stem + ".png", results)
    return table


def main(argv=None):
    args = create_argparser().parse_args(argv)
    set_threads(args.threads)
    cells = robustness.default_cells(args.quick)
    if args.cells:
        cells = [cells[i] for i in args.cells]
    given = dict(arguments.given_settings(args), timestep_respacing=args.steps, members=args.members)
    methods = robustness.load_methods(args.model, device=runtime_device(args), precision=args.precision,
                                      given=given)
    options = dict(n_val=args.val_subjects, n_test=args.test_subjects or (1 if args.quick else 2), seed=args.seed,
                   fov_scale=0.6 if args.quick else 1.0, bm3d=not (args.quick or args.no_bm3d),
                   members=args.members, oracle_draws=args.oracle_draws, log=lambda text: print(text, file=sys.stderr, flush=True))
    results = []
    for cell in cells:  # the report is rewritten after every cell: an interrupted run keeps its rows
        results.append(robustness.run_cell(cell, methods, **options))
        table = write_report(args, results, complete=len(results) == len(cells))
    print(table)
    return 0


if __name__ == "__main__":
    exit_on_user_error(main)
