"""
A preview of the toolkit's data: one subject of each anatomy class (whole body, a head with a
folded cortex, random "dead leaves" structure) under several reconstructions (OSEM 2x8 with PSF,
OSEM 4x8 and MLEM 100 without PSF, a 4 mm post-filter), central axial slices.

    python scripts/preview_data.py --out docs/data_preview.png
"""

import argparse

from guided_diffusion.evaluation import robustness
from guided_diffusion.script_util import add_runtime_arguments, set_threads


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="PNG path")
    parser.add_argument("--drf", type=float, default=10.0, help="dose reduction factor of the low-dose images")
    parser.add_argument("--fov_scale", type=float, default=1.0, help="shrink the field of view (faster)")
    add_runtime_arguments(parser, seed_help="which test subject of the matrix", precision=False)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    robustness.preview(args.out, drf=args.drf, fov_scale=args.fov_scale, subject=args.seed)
    print(f"preview: {args.out}")


if __name__ == "__main__":
    main()
