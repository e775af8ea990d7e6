"""Generate paired low-/full-dose whole-body PET training data from procedural phantoms.

Simulation, output layout, resume and seeding: ``guided_diffusion.pet.dataset``. Under
``mpiexec -n N`` rank r makes subjects r, r + N, ...; without ``mpiexec`` one process does all.
A re-run skips finished subjects and refuses to mix different parameters into one folder.

Example: ``python scripts/make_dataset.py --out data/phantoms --subjects 20 --seed 0 --preview``
"""

import argparse
import sys

from guided_diffusion.pet.dataset import (
    DEFAULT_COUNTS_PER_MM,
    DEFAULT_DRFS,
    SCANNERS,
    DatasetError,
    DatasetSettings,
    make_dataset,
    mpi_world,
)
from guided_diffusion.pet.tracers import TRACERS
from guided_diffusion.script_util import add_runtime_arguments, set_threads


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--subjects", type=int, required=True, help="number of subjects")
    parser.add_argument("--voxel_mm", type=float, default=3.3, help="isotropic voxel size (mm)")
    parser.add_argument("--drf", type=float, nargs="+", default=list(DEFAULT_DRFS),
                        help="dose reduction factors of the low-dose images")
    parser.add_argument("--tracers", nargs="+", default=["FDG"], help=f"tracers: {sorted(TRACERS)}")
    parser.add_argument("--scanner", choices=sorted(SCANNERS), default="demo")
    parser.add_argument("--split", type=float, nargs=3, default=[0.8, 0.1, 0.1],
                        metavar=("TRAIN", "VAL", "TEST"), help="subject fractions")
    parser.add_argument("--preview", action="store_true", help="write preview.png for the first subject")
    parser.add_argument("--counts_per_mm", type=float, default=DEFAULT_COUNTS_PER_MM,
                        help="full-dose prompts per mm of axial field of view")
    parser.add_argument("--fov_mm", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                        help="phantom field of view (default: the phantom's whole-body FOV)")
    parser.add_argument("--iterations", type=int, default=2, help="OSEM iterations")
    parser.add_argument("--subsets", type=int, default=8, help="OSEM subsets")
    parser.add_argument("--slab", type=int, default=32, help="slices projected together")
    parser.add_argument("--no_arms", action="store_true", help="phantoms without arms")
    parser.add_argument("--nifti_lowdose", action="store_true", help="also write low-dose NIfTI files")
    add_runtime_arguments(parser, seed_help="dataset seed", precision=False)
    return parser


def main(argv=None):
    args = create_argparser().parse_args(argv)
    settings = DatasetSettings(
        out=args.out, subjects=args.subjects, seed=args.seed, voxel_mm=args.voxel_mm, drf=args.drf,
        tracers=args.tracers, scanner=args.scanner, split=args.split, counts_per_mm=args.counts_per_mm,
        fov_mm=args.fov_mm, iterations=args.iterations, subsets=args.subsets, slab=args.slab,
        arms=not args.no_arms, preview=args.preview, nifti_lowdose=args.nifti_lowdose)
    try:
        settings = settings.checked()  # before anything is written or MPI starts
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
