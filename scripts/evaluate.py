"""Evaluate denoised PET volumes against full-dose references.

Image quality (NRMSE, PSNR, SSIM; ``--convention udpet`` challenge definitions or ``published``,
the published 3D DDPM's script), and with label volumes the per-organ / per-lesion SUVmax,
SUVmean, TLM biases and lesion CRC / background variability (guided_diffusion.evaluation.metrics).

Every PATH is a volume file (``.npz`` in the published layout, NIfTI), a directory of them, or a
text file listing them. ``--denoised`` may be repeated, one per method (``--method`` names them
in the same order; default: the path's base name). Pairs are matched by file name (extension
removed), else in sorted order when the counts agree; a single reference (or label / mask file)
serves every denoised volume. In a 2-volume ``.npz`` the reference is ``arr_0[--reference_index]``
(default 1, full dose) and the denoised image ``arr_0[--denoised_index]`` (default 0).

The dose reduction factor (DRF) of a denoised volume comes from ``manifest.json`` in its folder
(the ``"drf"`` of the entry naming the file, else a top-level ``"drf"``), else from ``drf(\\d+)``
in its path. Outputs (all optional, written atomically): ``--csv`` per-subject rows, ``--markdown``
mean ± sd per method and DRF, ``--json`` everything (non-finite numbers as null), ``--plot``
PSNR and lesion SUVmean bias vs DRF per method. Exits 2 with a one-line error on bad input.
"""

import argparse
import sys

from guided_diffusion.evaluation import files, metrics
from guided_diffusion.pet import volumes


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, help="full-dose volume(s): file, dir, list")
    parser.add_argument("--denoised", required=True, action="append",
                        help="denoised volume(s); repeat once per method")
    parser.add_argument("--method", action="append", help="method name per --denoised")
    parser.add_argument("--labels", help="organ label volume(s) (int, 0 = background)")
    parser.add_argument("--lesion_labels", help="lesion label volume(s) (k = lesion k)")
    parser.add_argument("--mask", help="body mask volume(s) (non-zero = inside)")
    parser.add_argument("--reference_index", type=int, default=1,
                        help="index into a multi-volume .npz reference (1 = full dose)")
    parser.add_argument("--denoised_index", type=int, default=0,
                        help="index into a multi-volume .npz denoised file")
    parser.add_argument("--voxel_mm", type=float, nargs="+",
                        help="voxel size in mm (1 or 3 values); default: from the file's affine")
    parser.add_argument("--convention", choices=metrics.CONVENTIONS, default="udpet")
    parser.add_argument("--json", help="write all results as JSON")
    parser.add_argument("--csv", help="write one row per subject and method")
    parser.add_argument("--markdown", help="write a mean ± sd summary table")
    parser.add_argument("--plot", help="write PSNR / lesion bias vs DRF plots (PNG)")
    return parser


def main(argv=None):
    args = create_argparser().parse_args(argv)
    try:
        records = files.evaluate_files(
            args.reference, args.denoised, args.method, labels=args.labels,
            lesion_labels=args.lesion_labels, mask=args.mask, reference_index=args.reference_index,
            denoised_index=args.denoised_index, voxel_mm=args.voxel_mm, convention=args.convention)
        outputs = [(args.json, lambda: files.to_json(records, args.convention)),
                   (args.csv, lambda: files.to_csv(records)),
                   (args.markdown, lambda: files.to_markdown(records, args.convention)),
                   (args.plot, lambda: files.to_png(records))]
        for path, render in outputs:
            if path:
                volumes.atomic_write_bytes(path, render())
    except (OSError, ValueError) as error:
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        return 2
    print(files.to_markdown(records, args.convention), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
