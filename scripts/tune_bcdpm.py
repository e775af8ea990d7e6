"""
Tune BC-DPM's balance ``lambda``, Gaussian-filter sigma, number of conditioned steps ``l`` and
hot-voxel mode per dose level for an unconditional prior on validation volumes of a make_dataset.py dataset.

    python scripts/tune_bcdpm.py --val data/val --prior checkpoint/demo_prior.pt \\
        --z_range 112 176 --max_subjects 1 --out results/bcdpm_tuning.json

The paper fixes ``lambda = 0.2`` and sets ``l`` per count level (5 / 10 / 15); which values
work depends on the prior and on the noise, so here every validation volume is denoised with
each ``(l, sigma, lambda, hot-voxel mode)`` of the grid (the prior's recommended sampler and slabs, as
``scripts/quality_report.py``) and scored by PSNR (UDPET convention, inside the body mask).
With ``--bc_start`` the chain starts at step ``l`` from the diffused input, so ``l`` also sets
how much diffusion noise is added to an input that may be nearly noise-free (low DRF). For each
DRF the point with the best mean PSNR becomes one row of the table

    [{"drf", "noise_index", "bc_lambda", "bc_sigma_mm", "bc_steps", "hot_voxels", "psnr",
      "volumes"}, ...]

with ``noise_index`` the mean :func:`guided_diffusion.sampling.fusion.noise_index` (SUV) of that
DRF's inputs. Recorded in the prior's sidecar (``scripts/package_checkpoint.py --sampling
'{"bc_tuning": [...]}'``), ``scripts/test.py`` and ``scripts/quality_report.py`` pick the row
nearest to each input's own noise index, so no DRF needs to be known at denoising time.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # quality_report, when imported

import numpy as np
import torch
from tqdm.auto import tqdm

from guided_diffusion.sampling.hot_voxels import DEFAULT_HOT_MODE, HOT_MODES, hot_weight
from guided_diffusion.evaluation import metrics
from guided_diffusion.pet import volumes
from guided_diffusion.sampling import fusion
from guided_diffusion.normalisation import resolve_normalisation
from guided_diffusion.script_util import str2bool

import quality_report


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--val", required=True, help="make_dataset.py directory (its val split)")
    parser.add_argument("--prior", required=True, help="unconditional prior checkpoint .pt")
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--drf", type=float, nargs="+", default=None, help="DRFs to use (default all)")
    parser.add_argument("--max_subjects", type=int, default=0, help="first N subjects (0: all)")
    parser.add_argument("--z_range", type=int, nargs=2, default=None, metavar=("START", "STOP"))
    parser.add_argument("--mask_suv", type=float, default=0.05, help="body mask: full dose > this SUV")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--sigmas_mm", type=float, nargs="+", default=[3.0, 6.0, 9.0, 12.0])
    parser.add_argument("--bc_respacing", default="100", help="timestep respacing of the prior")
    parser.add_argument("--bc_steps", type=int, nargs="+", default=None,
                        help="l values (default: the prior's sidecar recommendation)")
    parser.add_argument("--bc_start", type=str2bool, nargs="?", const=True,
                        default=None, help="start at step l from the diffused input "
                                           "(default: the prior's recommendation)")
    parser.add_argument("--bc_recon_iters", type=int, default=2, help="OSEM iterations of P^+")
    parser.add_argument("--bc_recon_subsets", type=int, default=8, help="OSEM subsets of P^+")
    parser.add_argument("--patch_z", type=int, default=None, help="slab depth (default: the prior's)")
    parser.add_argument("--patch_overlap", type=int, default=None, help="overlap (default: the prior's)")
    parser.add_argument("--batch_size", type=int, default=1, help="patches per network call")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--hot_voxels", choices=HOT_MODES, nargs="+", default=[DEFAULT_HOT_MODE],
                        help="hot-voxel modes to try (see scripts/test.py)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


GRID_KEYS = ("bc_steps", "bc_sigma_mm", "bc_lambda", "hot_voxels")


def best_per_drf(scores):
    """Rows of the tuning table from ``scores`` = ``[{"drf", "noise_index", "bc_lambda",
    "bc_sigma_mm", "bc_steps", "hot_voxels", "psnr"}]`` (one per volume and grid point): per DRF, the grid
    point with the best mean PSNR, with the DRF's mean noise index; ordered by DRF."""
    table = []
    for drf in sorted({s["drf"] for s in scores}):
        mine = [s for s in scores if s["drf"] == drf]
        points = sorted({tuple(s[k] for k in GRID_KEYS) for s in mine})
        mean_psnr = {p: float(np.mean([s["psnr"] for s in mine if tuple(s[k] for k in GRID_KEYS) == p]))
                     for p in points}
        best = max(points, key=lambda p: mean_psnr[p])
        indices = {s["volume"]: s["noise_index"] for s in mine if s["noise_index"] is not None}
        if not indices:
            raise ValueError(f"DRF {drf:g}: no validation volume with a measurable noise index")
        table.append(dict(drf=drf, noise_index=float(np.mean(list(indices.values()))),
                          **dict(zip(GRID_KEYS, best)), psnr=mean_psnr[best],
                          volumes=len({s["volume"] for s in mine})))
    return table


def main(argv=None):
    args = create_argparser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.lambdas or not all(0 <= v <= 1 for v in args.lambdas) or not args.sigmas_mm \
            or min(args.sigmas_mm) <= 0:
        raise ValueError("--lambdas must lie in [0, 1] and --sigmas_mm be > 0")
    sampler = argparse.Namespace(**dict(vars(args), paired=None, steps=args.bc_respacing,
                                        bc_steps=None, bc_lambda=None, bc_sigma_mm=None, hot_voxels=None,
                                        fusion_kappa=0.0, num_ensemble=1))
    methods = quality_report.DiffusionMethods(sampler, torch.device(args.device))
    clip_suv = resolve_normalisation(methods.models["bcdpm"][2]["normalisation"])["clip"]
    drfs = None if args.drf is None else [float(d) for d in args.drf]
    files = quality_report.select_files(args.val, "val", drfs, args.max_subjects)
    steps = args.bc_steps or [methods.default_bc_steps]
    grid = [dict(bc_steps=l, bc_sigma_mm=s, bc_lambda=lam, hot_voxels=hot)
            for l in steps for s in args.sigmas_mm for lam in args.lambdas for hot in args.hot_voxels]
    scores = []
    progress = tqdm(total=len(files) * len(grid), desc="validation volumes x grid")
    for description in files:
        case = quality_report.load_case(description, args.z_range, args.mask_suv)
        index = fusion.noise_index(case["low"])
        # without voxels near the model's clip every hot-voxel mode gives the same image
        has_hot = hot_weight(case["low"], clip_suv).max() > 0
        psnr_of = {}
        for point in grid:
            key = tuple(v for k, v in point.items() if has_hot or k != "hot_voxels")
            if key not in psnr_of:
                vars(sampler).update(point)
                image = methods.denoise("bcdpm", case)[0]
                psnr_of[key] = metrics.psnr(case["full"], image, mask=case["mask"])
            scores.append(dict(volume=case["path"], drf=case["drf"], noise_index=index, **point,
                               psnr=psnr_of[key]))
            progress.update()
    progress.close()
    table = best_per_drf(scores)
    for row in table:
        print(f"DRF {row['drf']:>5g}: noise index {row['noise_index']:.4f} SUV -> l {row['bc_steps']}, "
              f"lambda {row['bc_lambda']:g}, sigma {row['bc_sigma_mm']:g} mm, hot voxels {row['hot_voxels']} "
              f"(mean PSNR {row['psnr']:.2f} dB, "
              f"{row['volumes']} volumes)")
    tuning = [{k: row[k] for k in ("drf", "noise_index", *GRID_KEYS)} for row in table]
    print("record it: python scripts/package_checkpoint.py ... --sampling "
          f"'{json.dumps(dict(bc_tuning=tuning))}'")
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings.update(bc_steps=steps, bc_start=sampler.bc_start)
    volumes.atomic_write_bytes(args.out, json.dumps(dict(
        settings=settings, scores=scores, table=table, bc_tuning=tuning), indent=2))


if __name__ == "__main__":
    main()
