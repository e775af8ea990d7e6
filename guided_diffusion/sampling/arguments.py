"""Command-line argument groups of the sampling settings, shared by every script that samples.

Every flag defaults to ``None`` ("not given"): :func:`~.settings.resolve_settings` then takes
the value from the checkpoint's tuning table, its sidecar or :data:`~.settings.DEFAULTS`, and
the help texts name those defaults. :func:`given_settings` and :func:`given_acquisition` turn the
parsed arguments into the resolver's ``given`` dicts.
"""

from ..script_util import str2bool
from .guidance import LAMBDA_SCHEDULES
from .hot_voxels import HOT_MODES
from .settings import ACQUISITION_DEFAULTS, BC_STEPS_BY_NOISE, DEFAULTS

D = DEFAULTS


def flips_argument(value):
    """``--flips`` values: axes among ``zxy``, or ``none`` (one evaluation), which is ``""``."""
    return "" if value.strip().lower() == "none" else value


def add_patching_arguments(parser):
    """``--patch_z --patch_overlap --max_patch_voxels --batch_size --stitch``."""
    group = parser.add_argument_group("patching")
    group.add_argument("--patch_z", type=int, default=None,
                       help="axial slab depth in model voxels (default: the checkpoint's "
                            "recommendation, else its training patch depth)")
    group.add_argument("--patch_overlap", type=int, default=None,
                       help=f"patch overlap in voxels (default: the checkpoint's, else {D['patch_overlap']})")
    group.add_argument("--max_patch_voxels", type=int, default=None,
                       help="also tile the transaxial plane when a slab is larger than this")
    group.add_argument("--batch_size", type=int, default=None,
                       help=f"patches per network call (default {D['batch_size']})")
    group.add_argument("--x0_skip_sigma", type=float, default=None,
                       help="paired posterior samplers: width s (model units) of the blend of the x0 "
                            "estimate with x_t; larger s, wider ensembles (default: for --num_ensemble >= 2 "
                            "the checkpoint's ensemble_spread fit to the input's noise level, else the "
                            "trained value; an ensemble's image, the one-member estimate, keeps the trained value)")
    group.add_argument("--flips", type=flips_argument, default=None,
                       help="test-time augmentation: axes among 'zxy' (e.g. 'xy'), or 'none'; every network evaluation "
                            "averages the mirrored inputs' outputs, 2^len(FLIPS) times the cost (default: "
                            "the checkpoint's recommendation, else none)")
    group.add_argument("--std_fwhm_mm", type=float, default=None,
                       help="ensembles: pool the members' variance over a Gaussian of this FWHM (mm) before the "
                            "uncertainty map is its square root; a few members' std is noisy voxel by voxel "
                            "(default: the checkpoint's recommendation, else 0, none)")
    group.add_argument("--stitch", choices=("seamfree", "independent"), default=None,
                       help="blend overlapping patches at every step (seamfree, the default), or "
                            "stitch independent chains at the end (the published code's behaviour)")
    return group


def add_guidance_arguments(parser):
    """BC-DPM's block, data consistency and post-processing: ``--bc_* --dc_* --hot_voxels
    --fusion_kappa``."""
    group = parser.add_argument_group("guidance and post-processing")
    group.add_argument("--bc_steps", type=int, default=None,
                       help="BC-DPM: condition the last l reverse steps (default: the prior's "
                            "tuning table, else its sidecar, else --bc_noise; 0 samples the prior alone)")
    group.add_argument("--bc_noise", choices=tuple(BC_STEPS_BY_NOISE), default="medium",
                       help="BC-DPM paper defaults l = 5 / 10 / 15 for light / medium / heavy noise")
    group.add_argument("--bc_lambda", type=float, default=None,
                       help="BC-DPM balance lambda (default: the prior's tuning table, row nearest "
                            f"to the input's measured noise level; without one {D['bc_lambda']})")
    group.add_argument("--bc_sigma_mm", type=float, default=None,
                       help="BC-DPM Gaussian-filter condition sigma in mm (default: as --bc_lambda; "
                            f"without a table {D['bc_sigma_mm']})")
    group.add_argument("--bc_lam_schedule", choices=LAMBDA_SCHEDULES, default=None,
                       help="BC-DPM lambda over the l steps: constant (the paper's Algorithm 2) or linear "
                            "(to 0 at the last step: the toolkit's improved variant with --bc_start; "
                            "default: the checkpoint's recommendation, else constant)")
    group.add_argument("--bc_start", type=str2bool, nargs="?", const=True, default=None,
                       help="start the reverse process at step l from the diffused low-dose volume "
                            "instead of pure noise (skips the T-l unconditioned steps; default: the "
                            "checkpoint's recommendation, else off)")
    group.add_argument("--bc_recon_iters", type=int, default=None,
                       help=f"OSEM iterations of P^+ (default {D['bc_recon_iters']})")
    group.add_argument("--bc_recon_subsets", type=int, default=None,
                       help=f"OSEM subsets of P^+ (default {D['bc_recon_subsets']})")
    group.add_argument("--dc_steps", type=int, default=None,
                       help="Poisson data consistency: EM-update the x0 estimate towards the "
                            "low-dose data in the last DC_STEPS reverse steps (any mode; uses the "
                            "acquisition below; default 0: off)")
    group.add_argument("--dc_iters", type=int, default=None, help="EM iterations per active step (default 1)")
    group.add_argument("--dc_subsets", type=int, default=None, help="EM view subsets (default 1)")
    group.add_argument("--hot_voxels", choices=HOT_MODES, default=None,
                       help="voxels near and above the model's SUV range (the normalisation clip): "
                            "'rescale' denoises the input scaled into range a second time (volumes "
                            "with hot voxels only), 'input' takes them from the input, 'clip' keeps "
                            "the saturated output (default: BC-DPM the prior's tuning table, else "
                            f"{D['hot_voxels']})")
    group.add_argument("--fusion_kappa", type=float, default=None,
                       help="fuse the output with the input where they differ by more than "
                            "FUSION_KAPPA times the input's estimated noise variance (0: off; "
                            "default: the checkpoint's recommendation, else off)")
    return group


def add_acquisition_arguments(parser):
    """The low-dose acquisition that BC-DPM and data consistency simulate: ``--bc_counts
    --bc_drf --bc_full_counts --bc_slice_counts --bc_scanner --bc_view_mashing --bc_psf_fwhm_mm
    --bc_randoms_fraction``; each defaults to the input's make_dataset.py subject manifest."""
    a = ACQUISITION_DEFAULTS
    group = parser.add_argument_group("simulated acquisition (default: the input's subject manifest)")
    group.add_argument("--bc_counts", type=float, default=None,
                       help="total counts of the low-dose acquisition (default: the input's entry in "
                            "its make_dataset.py subject manifest, else --bc_full_counts / --bc_drf)")
    group.add_argument("--bc_drf", type=float, default=None, help="dose reduction factor, with --bc_full_counts")
    group.add_argument("--bc_full_counts", type=float, default=None,
                       help="total counts of a full-dose acquisition of this volume")
    group.add_argument("--bc_slice_counts", type=float, default=None,
                       help="slice-wise (2D) acquisitions: events of the hottest axial slice, other slices in "
                            "proportion to their activity, randoms per slice (the BC-DPM paper's protocol; "
                            "with a 2D prior, e.g. --bc_scanner ecat921_2d)")
    group.add_argument("--bc_scanner", default=None, help=f"scanner preset of the projector (default {a['scanner']})")
    group.add_argument("--bc_view_mashing", type=int, default=None,
                       help="view mashing of the projector (default: the preset's)")
    group.add_argument("--bc_psf_fwhm_mm", type=float, default=None,
                       help="image-space Gaussian PSF of the projector, FWHM in mm (default: none)")
    group.add_argument("--bc_randoms_fraction", type=float, default=None,
                       help=f"randoms (+ scatter) as a fraction of trues (default {a['randoms_fraction']}, the paper's)")
    return group


def given_settings(args):
    """The resolver's ``given`` dict from parsed arguments (absent attributes: not given)."""
    return {key: getattr(args, key, None) for key in DEFAULTS}


def noise_class_defaults(args):
    """The ``defaults`` that ``--bc_noise`` sets: ``bc_steps`` of the paper's noise class."""
    return dict(bc_steps=BC_STEPS_BY_NOISE[getattr(args, "bc_noise", None) or "medium"])


def given_acquisition(args):
    """The ``given`` dict of :func:`~.settings.resolve_acquisition` from the ``--bc_*`` flags."""
    return dict(scanner=args.bc_scanner, view_mashing=args.bc_view_mashing,
                psf_fwhm_mm=args.bc_psf_fwhm_mm, randoms_fraction=args.bc_randoms_fraction,
                total_counts=args.bc_counts, drf=args.bc_drf, full_counts=args.bc_full_counts,
                slice_counts=getattr(args, "bc_slice_counts", None))
