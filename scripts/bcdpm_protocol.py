"""The BC-DPM paper's 2D evaluation protocol (Shen et al. 2023, section 3.1 and Table 1).

Subcommands
-----------
``make-slices --out DIR --subjects N --seed S [--slices_per_subject K] [--image_size 128]
[--voxel_mm 4.0] [--fwhm_mm 6.0] [--val_subjects 1] [--test_subjects T] [--tracers FDG ...]
[--anatomies whole_body ...] [--detail]``
    High-count 2D slices from procedural whole-body phantoms. Subject ``i`` is the phantom of
    seed ``SeedSequence([S, i])`` on an ``image_size x image_size`` transaxial grid of
    ``voxel_mm`` voxels (the whole body fits when ``image_size * voxel_mm`` >= 400 mm) and
    ``voxel_mm`` slices over 1 m. ``K`` axial slices per subject are drawn stratified over the
    body's axial extent (slices holding >= 10 % of the busiest slice's activity). The high-count
    image is the phantom slice blurred in-plane by a Gaussian of ``--fwhm_mm`` (the scanner
    resolution; 6 mm is the ECAT 921's transaxial resolution near the centre): a noise-free,
    reconstruction-like reference. It plays the role of the paper's full-count clinical images:
    the low-count data are simulated *from it*, so it is exactly the truth of the simulation.
    Each subject's tracer and anatomy are drawn from ``--tracers`` and ``--anatomies`` (the
    default, FDG whole bodies, is the paper's setting; a prior's training slices are drawn
    wider); ``--detail`` adds the whole body's fine structures.
    Subjects are split (seeded permutation) into ``--test_subjects`` (default ``ceil(N / 7)``,
    the paper's 60 : 10 ratio), ``--val_subjects`` (tuning of the baselines) and training.

    Files: ``DIR/slices/sNNNN_zZZZ.npz`` (``arr_0`` = ``(X, Y, 1)`` SUV, the single-volume
    layout that ``image_datasets`` reads in unpaired mode, plus ``affine``), ``train.txt``,
    ``val.txt``, ``test.txt`` (file lists relative to DIR; ``scripts/train.py`` uses
    ``train.txt``) and ``manifest.json`` (``voxel_mm`` read by ``train.py``, parameters, slices).

``evaluate --out OUTDIR [--slices DIR] [--prior CKPT] [--counts 1e6 3e5 1e5] [--n_test 20]
[--n_val 4] [--runs 5] [--steps 100] [--lam 0.2] [--l 5 10 15] [--mlem_iters 100]
[--inserter_iters N] [--gf_sigma_vox S] [--paper_n_test N] [--improved_l 2 4 8] [--improved_lams 0 0.3 0.6]
[--improved_sigma_factors 1 2 3]
[--bm3d_factors F ...] [--seed 0] [--threads N]
[--device cuda]``
    For every count level and slice (test slices, and validation slices for tuning): the
    noise-free sinogram is the ECAT-921-like 2D projection (``ecat921_2d``: 160 radial bins x
    192 views, no attenuation, as the paper states none) of the high-count slice; uniform randoms
    of 20 % of the trues are added; the expected total (trues + randoms) is scaled to the count
    level (events per slice) and Poisson noise drawn; ``--mlem_iters`` MLEM iterations with the
    randoms in the denominator give the low-count image. Methods:

    * ``MLEM (low-count)``: the low-count image itself (not in the paper's table; it anchors the
      gains and shows the count dependence).
    * ``Gaussian``: 2D Gaussian filter, sigma grid-searched per count level for the best mean
      PSNR on the ``--n_val`` validation slices.
    * ``BM3D``: 2D BM3D with its noise sigma grid-searched the same way (grid: multiples of the
      validation images' RMS error inside the body, ``--bm3d_factors``; the grid dominates the
      baselines' time).
    * ``BC-DPM (paper, Algorithm 2)``: the 2D unconditional prior ``--prior`` (``cond
      "none"``, ``dims 2``) sampled from pure noise with ``--steps`` respaced DDPM steps; in the
      last ``l`` steps (``--l``, per count level) the bidirectional conditioning block (Eq. 10)
      with a constant ``lambda = --lam``, the same BC-DPM code as ``scripts/test.py``; its
      Gaussian-filter condition uses the tuned Gaussian sigma of that count level
      (``--gf_sigma_vox`` overrides); its noise inserter re-simulates the same acquisition
      (projector, counts per unit activity, randoms) and reconstructs with ``--inserter_iters``
      MLEM iterations (default ``--mlem_iters``, the paper's P-dagger; fewer are faster). The
      result is the mean of ``--runs`` samples (the paper: 5); where the tuned Gaussian image
      exceeds 0.75 x the prior's saturation SUV, the output blends to it (as ``scripts/test.py
      --hot_voxels input`` does with the input). It runs ``steps x runs`` UNet evaluations per
      slice and count level: a GPU (``--device cuda``, the default when present) is faster; BM3D
      and the metrics run on the CPU.
    * ``BC-DPM, improved``: the toolkit's variant (``scripts/test.py --bc_start
      --bc_lam_schedule linear``): the chain starts at step ``l - 1`` from the low-count image
      diffused to that step, and lambda falls linearly from its value at the first conditioned
      step to 0 at the last (the noise-insertion term ``lambda (y - N(x'))`` adds noise that no
      later step removes). ``l``, ``lambda`` and the Gaussian condition's sigma are tuned per
      count level for the best mean PSNR on the validation slices over ``--improved_l`` x
      ``--improved_lams`` x ``--improved_sigma_factors`` (times the tuned Gaussian's sigma);
      ``l x runs`` UNet evaluations per slice.

    Metrics on each 2D slice (whole image, UDPET convention applied in 2D):
    ``PSNR = 20 log10(max(ref) / RMSE)`` and SSIM of both images divided by their own maximum,
    ``data_range=1``, 7x7 window, computed in 2D. Denoised images are in SUV; BC-DPM's output is
    mapped back from the prior's model space (values above the normalisation's ``clip`` SUV are
    clipped there).

    Output in OUTDIR: ``table.md`` (the layout of the paper's Table 1: rows = methods, columns =
    PSNR / SSIM per count level, means over the test slices; plus the BC-DPM gain over Gaussian
    next to the paper's), ``table.json`` (means, standard deviations, per-slice values, tuned
    parameters, settings) and ``example.png`` (first test slice: reference, low-count and every
    method at every count level, as the paper's Fig. 3). The table is also printed.

With the defaults, ``evaluate --out DIR`` runs the whole protocol from the shipped 2D prior
(``checkpoint/bcdpm_prior2d.pt``) on ``data/slices2d``, which it first makes (30 FDG subjects,
seed 300, 20 slices each) when it is missing. ``checkpoint/train_prior2d.sh`` reproduces the
prior (its own, wider training slices: other seeds, tracers and anatomies).

The work is done by :mod:`guided_diffusion.pet.slices` (make-slices) and
:mod:`guided_diffusion.evaluation.bcdpm_protocol` (evaluate).
"""

import argparse
import os
from functools import partial

from guided_diffusion.evaluation import bcdpm_protocol
from guided_diffusion.pet import slices
from guided_diffusion.script_util import add_runtime_arguments, runtime_device, set_threads

DEFAULT_PRIOR = "checkpoint/bcdpm_prior2d.pt"
DEFAULT_SLICES = "data/slices2d"
#: The protocol's test and validation slices (``make-slices`` arguments) when ``--slices`` is missing.
PROTOCOL_SLICES = dict(subjects=30, seed=300, slices_per_subject=20)
#: evaluate's flags that are not arguments of ``bcdpm_protocol.evaluate``.
RUNTIME_FLAGS = ("command", "threads", "device")


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-slices", help="high-count 2D slices from phantoms")
    make.add_argument("--out", required=True, help="output directory")
    make.add_argument("--subjects", type=int, required=True, help="number of phantom subjects")
    make.add_argument("--seed", type=int, required=True, help="dataset seed (no default: it names the dataset)")
    make.add_argument("--slices_per_subject", type=int, default=10)
    make.add_argument("--image_size", type=int, default=128, help="slice size X = Y in voxels")
    make.add_argument("--voxel_mm", type=float, default=4.0, help="voxel size (mm), in-plane and axial")
    make.add_argument("--fwhm_mm", type=float, default=6.0, help="in-plane resolution of the reference (mm)")
    make.add_argument("--val_subjects", type=int, default=1, help="subjects for tuning the baselines")
    make.add_argument("--test_subjects", type=int, default=None, help="test subjects (default ceil(N / 7))")
    make.add_argument("--tracers", nargs="+", default=["FDG"], help="tracers, one drawn per subject")
    make.add_argument("--anatomies", nargs="+", default=["whole_body"], choices=slices.ANATOMIES,
                      help="phantom anatomies, one drawn per subject")
    make.add_argument("--detail", action="store_true", help="whole body: fine structures (vessels, nodes, ...)")

    stack = commands.add_parser("make-stack", help="a NIfTI volume of slices scanned slice-wise (for test.py)")
    stack.add_argument("--slices", default=DEFAULT_SLICES, help="directory from make-slices")
    stack.add_argument("--out", required=True, help="output directory (low.nii.gz, reference.nii.gz, stack.json)")
    stack.add_argument("--split", default="test")
    stack.add_argument("--n_slices", type=int, default=8, help="slices (evenly spaced through the split)")
    stack.add_argument("--hottest_counts", type=float, default=1e6, help="expected events of the hottest slice")
    stack.add_argument("--mlem_iters", type=int, default=100)
    stack.add_argument("--seed", type=int, default=0, help="seed of the Poisson noise")

    run = commands.add_parser("evaluate", help="Table 1: Gaussian, BM3D and BC-DPM at each count level")
    run.add_argument("--slices", default=DEFAULT_SLICES,
                     help="directory from make-slices (default: made with the protocol's settings if missing)")
    run.add_argument("--prior", default=DEFAULT_PRIOR, help="2D unconditional prior .pt (with its .json sidecar)")
    run.add_argument("--out", required=True, help="output directory (table.md, table.json, example.png)")
    run.add_argument("--counts", type=float, nargs="+", default=[1e6, 3e5, 1e5], help="total events per slice")
    run.add_argument("--n_test", type=int, default=20, help="test slices (evenly spaced through test.txt)")
    run.add_argument("--n_val", type=int, default=4, help="validation slices for tuning the baselines")
    run.add_argument("--runs", type=int, default=5, help="BC-DPM samples averaged per slice")
    run.add_argument("--steps", type=int, default=100, help="respaced sampling steps")
    run.add_argument("--lam", type=float, default=0.2, help="BC-DPM lambda")
    run.add_argument("--l", dest="steps_l", type=int, nargs="+", default=[5, 10, 15],
                     help="BC-DPM l per count level")
    run.add_argument("--mlem_iters", type=int, default=100, help="MLEM iterations of the low-count images")
    run.add_argument("--inserter_iters", type=int, default=None,
                     help="MLEM iterations in BC-DPM's noise inserter (default: --mlem_iters)")
    run.add_argument("--gf_sigma_vox", type=float, default=None,
                     help="Gaussian-filter condition sigma (voxels; default: the tuned Gaussian sigma)")
    run.add_argument("--paper_n_test", type=int, default=None,
                     help="the paper's variant (steps x runs evaluations per slice) on the first N test slices only")
    run.add_argument("--improved_l", type=int, nargs="+", default=list(bcdpm_protocol.IMPROVED_L_GRID),
                     help="improved BC-DPM: l values tuned on the validation slices")
    run.add_argument("--improved_lams", type=float, nargs="+", default=list(bcdpm_protocol.IMPROVED_LAM_GRID),
                     help="improved BC-DPM: lambda values tuned on the validation slices")
    run.add_argument("--improved_sigma_factors", type=float, nargs="+",
                     default=list(bcdpm_protocol.IMPROVED_SIGMA_FACTORS),
                     help="improved BC-DPM: Gaussian-condition sigmas tuned, in units of the tuned Gaussian's sigma")
    run.add_argument("--bm3d_factors", type=float, nargs="+", default=list(bcdpm_protocol.BM3D_SIGMA_FACTORS),
                     help="BM3D sigma grid, in units of the validation images' RMS error in the body")
    add_runtime_arguments(run, seed_help="seed of the noise and the samplers", precision=False, device=True)
    return parser


def main(argv=None):
    args = create_argparser().parse_args(argv)
    if args.command == "make-slices":
        manifest = slices.make_slices(args.out, args.subjects, args.seed, args.slices_per_subject,
                                      args.image_size, args.voxel_mm, args.fwhm_mm, args.val_subjects,
                                      args.test_subjects, args.tracers, args.anatomies, args.detail)
        print(f"wrote {len(manifest['slices'])} slices to {args.out}: {manifest['split']}")
        return manifest
    if args.command == "make-stack":
        record = bcdpm_protocol.make_stack(args.slices, args.out, split=args.split, n_slices=args.n_slices,
                                           hottest_counts=args.hottest_counts, mlem_iters=args.mlem_iters,
                                           seed=args.seed)
        print(f"wrote {len(record['slices'])} slices to {args.out}/low.nii.gz (hottest {args.hottest_counts:g} "
              f"events); denoise it slice by slice with: python scripts/test.py --model_path {DEFAULT_PRIOR} "
              f"--cond_mode bcdpm --base_samples {args.out}/low.nii.gz --bc_scanner {bcdpm_protocol.SCANNER} "
              f"--bc_slice_counts {args.hottest_counts:g} --save_dir DIR")
        return record
    set_threads(args.threads)
    if not os.path.exists(os.path.join(args.slices, "manifest.json")):
        print(f"{args.slices}: no slice dataset; making the protocol's ({PROTOCOL_SLICES})", flush=True)
        slices.make_slices(args.slices, **PROTOCOL_SLICES)
    settings = {name: value for name, value in vars(args).items() if name not in RUNTIME_FLAGS}
    return bcdpm_protocol.evaluate(**settings, device=runtime_device(args), log=partial(print, flush=True))


if __name__ == "__main__":
    main()
