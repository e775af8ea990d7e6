"""Generate paired low-/full-dose whole-body PET training data from procedural phantoms.

Simulation, output layout, resume and seeding: ``guided_diffusion.pet.dataset``. Under
``mpiexec -n N`` the ranks share the subjects by estimated cost (a fixed dataset's rank r makes
subjects r, r + N, ...); without ``mpiexec`` one process does all.
A re-run skips finished subjects and refuses to mix different parameters into one folder.

Without ``--randomise`` every subject is scanned alike (``--scanner``, OSEM ``--iterations`` x
``--subsets`` with the scanner's PSF, ``--voxel_mm``, the DRFs ``--drf``). With it each subject
draws its reconstruction, PSF, post-filter, 2D / SSRB mode, randoms, scatter and native voxel
size (``guided_diffusion.pet.acquisition.DEFAULT_RANGES``), ``--drfs_per_subject`` DRFs
log-uniform over ``--drf_range``, an anatomy from ``--anatomies`` and a tracer from
``--tracers``; images are resampled to ``--voxel_mm`` unless ``--no_resample``, and the
simulation runs on one torch thread per rank (data independent of ``--threads``; use ranks).
``--hold_out`` tags (e.g. ``mlem100_nopsf`` ``1.65`` ``ssrb`` ``nopsf``), anatomies or tracers
are never drawn for train / val subjects.

Examples: ``python scripts/make_dataset.py --out data/phantoms --subjects 20 --seed 0 --preview``;
``mpiexec -n 2 python scripts/make_dataset.py --out data/mixed --subjects 40 --randomise
--fov_mm 300 300 200 --hold_out mlem100_nopsf 1.65``
"""

import argparse
import sys

from guided_diffusion.pet.dataset import (
    DEFAULT_COUNTS_PER_MM,
    DEFAULT_DRF_RANGE,
    DEFAULT_DRFS,
    DEFAULT_DRFS_PER_SUBJECT,
    SCANNERS,
    WHOLE_BODY,
    DatasetError,
    DatasetSettings,
    anatomy_names,
    make_dataset,
    mpi_world,
)
from guided_diffusion.pet.tracers import TRACERS
from guided_diffusion.script_util import add_runtime_arguments, set_threads

#: Flags of a fixed dataset (drawn per subject with --randomise), with their defaults (absent
#: from the parsed flags unless given).
FIXED_FLAGS = {"drf": list(DEFAULT_DRFS), "iterations": 2, "subsets": 8}
#: Flags that only apply with --randomise, with their defaults.
RANDOMISE_FLAGS = {"drfs_per_subject": DEFAULT_DRFS_PER_SUBJECT, "drf_range": list(DEFAULT_DRF_RANGE),
                   "anatomies": [WHOLE_BODY], "hold_out": []}


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--subjects", type=int, required=True, help="number of subjects")
    parser.add_argument("--voxel_mm", type=float, default=3.3,
                        help="isotropic voxel size (mm); with --randomise the model grid")
    parser.add_argument("--drf", type=float, nargs="+", default=argparse.SUPPRESS,
                        help=f"dose reduction factors of the low-dose images (default {FIXED_FLAGS['drf']}; "
                        "not with --randomise)")
    parser.add_argument("--tracers", nargs="+", default=["FDG"],
                        help=f"tracers: {sorted(TRACERS)} (with --randomise one is drawn per subject)")
    parser.add_argument("--scanner", choices=sorted(SCANNERS), default="demo")
    parser.add_argument("--split", type=float, nargs=3, default=[0.8, 0.1, 0.1],
                        metavar=("TRAIN", "VAL", "TEST"), help="subject fractions")
    parser.add_argument("--preview", action="store_true", help="write preview.png for the first subject")
    parser.add_argument("--counts_per_mm", type=float, default=DEFAULT_COUNTS_PER_MM,
                        help="full-dose prompts per mm of axial field of view")
    parser.add_argument("--fov_mm", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                        help="phantom field of view (default: the phantom's whole-body FOV)")
    parser.add_argument("--iterations", type=int, default=argparse.SUPPRESS,
                        help=f"OSEM iterations (default {FIXED_FLAGS['iterations']}; not with --randomise)")
    parser.add_argument("--subsets", type=int, default=argparse.SUPPRESS,
                        help=f"OSEM subsets (default {FIXED_FLAGS['subsets']}; not with --randomise)")
    parser.add_argument("--slab", type=int, default=32, help="slices projected together")
    parser.add_argument("--no_arms", action="store_true", help="phantoms without arms")
    parser.add_argument("--nifti_lowdose", action="store_true", help="also write low-dose NIfTI files")
    parser.add_argument("--detail", action="store_true", help="whole-body phantoms with fine anatomical detail")
    group = parser.add_argument_group("randomised datasets")
    group.add_argument("--randomise", action="store_true",
                       help="draw each subject's scan, DRFs, anatomy and tracer (see the module docstring)")
    group.add_argument("--drfs_per_subject", type=int, default=argparse.SUPPRESS,
                       help=f"DRFs drawn per subject (default {RANDOMISE_FLAGS['drfs_per_subject']})")
    group.add_argument("--drf_range", type=float, nargs=2, metavar=("LOW", "HIGH"), default=argparse.SUPPRESS,
                       help=f"log-uniform DRF range (default {RANDOMISE_FLAGS['drf_range']})")
    group.add_argument("--anatomies", nargs="+", choices=anatomy_names(), default=argparse.SUPPRESS,
                       help=f"anatomy classes drawn from (default {RANDOMISE_FLAGS['anatomies']})")
    group.add_argument("--resample", action="store_true", default=argparse.SUPPRESS,
                       help="resample images to --voxel_mm, linearly, labels by nearest neighbour (the default)")
    group.add_argument("--no_resample", dest="resample", action="store_false", default=argparse.SUPPRESS,
                       help="keep every subject's native grid (the manifest's voxel_mm is then nominal)")
    group.add_argument("--hold_out", nargs="+", metavar="LABEL", default=argparse.SUPPRESS,
                       help="settings tags (e.g. mlem100_nopsf 1.65 ssrb nopsf), anatomies or tracers never "
                       "drawn for train / val subjects")
    add_runtime_arguments(parser, seed_help="dataset seed", precision=False)
    return parser


def settings_from_args(args):
    """The DatasetSettings of parsed flags; DatasetError for flags of the other kind of dataset."""
    given = {name for name in (*FIXED_FLAGS, *RANDOMISE_FLAGS, "resample") if hasattr(args, name)}
    misplaced = sorted(given & set(FIXED_FLAGS if args.randomise else (*RANDOMISE_FLAGS, "resample")))
    if misplaced:
        flags = " ".join(f"--{name}" for name in misplaced)
        raise DatasetError(f"{flags} {'cannot be used with' if args.randomise else 'need'} --randomise")
    options = {name: getattr(args, name) if name in given else default
               for name, default in {**FIXED_FLAGS, **RANDOMISE_FLAGS}.items()}
    return DatasetSettings(
        out=args.out, subjects=args.subjects, seed=args.seed, voxel_mm=args.voxel_mm, tracers=args.tracers,
        scanner=args.scanner, split=args.split, counts_per_mm=args.counts_per_mm, fov_mm=args.fov_mm,
        slab=args.slab, arms=not args.no_arms, preview=args.preview, nifti_lowdose=args.nifti_lowdose,
        detail=args.detail, randomise=args.randomise, resample=getattr(args, "resample", None), **options)


def main(argv=None):
    args = create_argparser().parse_args(argv)
    try:
        settings = settings_from_args(args).checked()  # before anything is written or MPI starts
        comm = mpi_world()
        set_threads(args.threads, ranks=comm.Get_size() if comm is not None else 1)
        result = make_dataset(settings, comm)
    except DatasetError as error:
        print(f"make_dataset.py: error: {error}", file=sys.stderr)
        return 2
    if result["rank"] == 0:
        print(f"{args.subjects} subject(s) in {args.out} ({result['made']} made here, "
              f"{result['finished']} already finished)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
