"""
Is an unconditional prior fit for BC-DPM? Its x0 estimate against a Gaussian filter of x_t,
per diffusion step t, on held-out high-count images (guided_diffusion.evaluation.prior_check).

    python scripts/check_prior.py --prior checkpoint/bcdpm_prior2d.pt --slices data/slices2d \\
        --split val --n 16 --out docs/prior_check_2d
    python scripts/check_prior.py --prior checkpoint/demo_prior.pt \\
        --volumes data/val/*drf4*.npz --out docs/prior_check_3d

A 2D prior is checked on slices of a ``bcdpm_protocol.py make-slices`` dataset, a 3D prior on
crops of its training patch size from volume files (index 1, the full dose of a paired
``.npz``). Writes ``prior_check.json`` (one row per t: the prior's PSNR, the tuned filter's
PSNR and sigma, the margin) and ``prior_check.png``; the table goes to stdout. The prior is
*fit* when it beats the filter at every t <= ``--conditioned_max_t`` (BC-DPM's conditioned
range: ``l`` of 100 respaced steps reach t = 10 l; default 150, l <= 15).
"""

import argparse
import json
import os

from guided_diffusion.checkpoint_hub import portable_paths
from guided_diffusion.checkpoints import load_model_and_diffusion
from guided_diffusion.evaluation import prior_check
from guided_diffusion.pet.volumes import atomic_write_bytes
from guided_diffusion.sampling.settings import resolve_precision
from guided_diffusion.script_util import add_runtime_arguments, exit_on_user_error, runtime_device, set_threads


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prior", required=True, help="unconditional prior .pt (with its .json sidecar)")
    images = parser.add_mutually_exclusive_group(required=True)
    images.add_argument("--slices", help="make-slices dataset (2D prior)")
    images.add_argument("--volumes", nargs="+", help="volume files (3D prior; index 1 = full dose)")
    parser.add_argument("--split", default="val", help="--slices: the split to check on")
    parser.add_argument("--n", type=int, default=16, help="--slices: the number of slices checked")
    parser.add_argument("--crops_per_volume", type=int, default=2, help="--volumes: axial crops per volume")
    parser.add_argument("--steps", type=int, nargs="+", default=list(prior_check.DEFAULT_STEPS),
                        help="diffusion steps t (of the prior's 1000) to check")
    parser.add_argument("--conditioned_max_t", type=int, default=150,
                        help="the prior must beat the filter at every checked t up to this")
    parser.add_argument("--out", required=True, help="output directory")
    add_runtime_arguments(parser, seed_help="seed of the diffusion noise", device=True)
    return parser


def load_images(args, metadata):
    """The held-out SUV images in the prior's layout."""
    if args.slices:
        if metadata["flags"].get("dims") != 2:
            raise ValueError(f"{args.prior}: --slices needs a 2D prior (dims 2)")
        return prior_check.slice_images(args.slices, args.split, args.n)
    if metadata["flags"].get("dims") != 3:
        raise ValueError(f"{args.prior}: --volumes needs a 3D prior (dims 3)")
    return prior_check.volume_crops(args.volumes, metadata["patch_size_zxy"], metadata["voxel_mm"],
                                    args.crops_per_volume)


def main(argv=None):
    args = create_argparser().parse_args(argv)
    set_threads(args.threads)
    device = runtime_device(args)
    model, diffusion, metadata = load_model_and_diffusion(args.prior, overrides={"timestep_respacing": ""},
                                                          device=device)
    if metadata["cond"] != "none":
        raise ValueError(f"{args.prior}: not an unconditional prior (cond {metadata['cond']!r})")
    precision = resolve_precision(args.precision, metadata["flags"].get("use_fp16", False), device)
    images = load_images(args, metadata)
    print(f"{len(images)} images {tuple(images.shape[1:])}, precision {precision}")
    print("    t  prior dB  filter dB  sigma vox  margin dB")
    rows = prior_check.check_prior(
        model, diffusion, images, metadata["normalisation"], steps=args.steps, seed=args.seed, precision=precision,
        progress=lambda r: print(f"{r['t']:5d}  {r['prior_psnr']:8.2f}  {r['gaussian_psnr']:9.2f}  "
                                 f"{r['gaussian_sigma_vox']:9.2f}  {r['margin_db']:+9.2f}", flush=True))
    fit = prior_check.fit_over(rows, args.conditioned_max_t)
    print(f"fit for BC-DPM (beats the filter at every t <= {args.conditioned_max_t}): {fit}")
    os.makedirs(args.out, exist_ok=True)
    report = dict(rows=rows, fit=fit, conditioned_max_t=args.conditioned_max_t, images=len(images),
                  image_shape=list(images.shape[1:]), precision=precision, seed=args.seed,
                  prior=args.prior, prior_sha256=metadata["sha256"],
                  data=dict(slices=args.slices, split=args.split) if args.slices else dict(volumes=args.volumes))
    atomic_write_bytes(os.path.join(args.out, "prior_check.json"),
                       json.dumps(portable_paths(report), indent=2) + "\n")
    prior_check.plot_rows(os.path.join(args.out, "prior_check.png"), rows,
                          f"{os.path.basename(args.prior)}: x0 estimate vs tuned Gaussian of x_t "
                          f"({len(images)} held-out images)", args.conditioned_max_t)
    return 0


if __name__ == "__main__":
    exit_on_user_error(main)
