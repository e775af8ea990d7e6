"""
Batch denoising of low-dose PET volumes with a 3D diffusion model, sharded over MPI ranks.

    mpiexec -n 2 python scripts/test.py --base_samples LOW_DOSE --save_dir OUT

``--base_samples`` is a volume file (published ``.npz`` layout: ``arr_0[0]`` is the low-dose
``(X, Y, Z)`` volume in SUV; NIfTI ``.nii``/``.nii.gz``), a DICOM PET series directory, a
directory of volume files or a text list of paths. Model and diffusion flags default to the
checkpoint's JSON sidecar; flags given on the command line override them. Per input ``NAME``
the save directory receives ``NAME_denoised.nii.gz`` / ``.npz`` (ensemble mean, SUV, input grid
and affine), ``NAME_uncertainty.nii.gz`` / ``.npz`` (voxel-wise ensemble standard deviation),
``NAME.png`` (MIPs and slices) and ``NAME.json`` (settings, seeds, timings, checkpoint sha256),
written last. Inputs whose JSON exists are skipped unless ``--overwrite``; finished ensemble
members are kept under ``SAVE_DIR/.partial`` so an interrupted run resumes where it stopped.

Conditioning modes (``--cond_mode``):
  paired  the published 3D DDPM: the low-dose volume is the model's second input channel;
  bcdpm   an unconditional prior + BC-DPM's bidirectional block (Eq. 10) in the last
          ``--bc_steps`` reverse steps (Gaussian-filter condition and Poisson noise insertion
          through the 3D PET projector); a paired checkpoint trained with ``--cond_dropout``
          serves as the prior with the null condition;
  hybrid  the block on top of the paired model.
Any mode can add Poisson data consistency in the last ``--dc_steps`` steps (EM updates of the
clean-image estimate towards the low-dose data, see ``guided_diffusion.sampling.data_consistency``).
"""

import argparse
import dataclasses
import json
import os
import sys
import time


import numpy as np
import torch.distributed as dist

from guided_diffusion import dist_util, logger
from guided_diffusion.checkpoints import load_model_and_diffusion, read_metadata
from guided_diffusion.sampling.denoiser import (
    SamplingSettings,
    VolumeDenoiser,
    is_null_conditioned_prior,
    member_seed,
    serves_as_prior,
)
from guided_diffusion.fp16_util import resolve_precision
from guided_diffusion.sampling.hot_voxels import DEFAULT_HOT_MODE, HOT_MODES
from guided_diffusion.pet import dataset_manifest, volumes
from guided_diffusion.sampling import guidance as conditioning
from guided_diffusion.sampling.data_consistency import DataConsistencyFactory
from guided_diffusion.evaluation.figures import save_volume_panels
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    model_and_diffusion_defaults,
    sr_model_and_diffusion_defaults,
    str2bool,
)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DEFAULT_PAIRED = os.path.join(REPO, "checkpoint", "demo_paired.pt")
DEFAULT_PRIOR = os.path.join(REPO, "checkpoint", "demo_prior.pt")
#: BC-DPM paper: l = 5 / 10 / 15 reverse steps for light / medium / heavy noise.
BC_STEPS_BY_NOISE = {"light": 5, "medium": 10, "heavy": 15}


class InputError(Exception):
    """A problem with the user's input, reported as one line and exit status 2."""


def load_data_for_worker(base_samples, batch_size, class_cond):
    """Yield the low-dose volumes to denoise: the hook users adapt to their own data.

    Every rank iterates over every volume (the ranks share the network evaluations of each
    volume, see ``guided_diffusion.sampling.denoiser``), so this loader does not shard; replace it to read
    other formats, but keep what it yields.

    :param base_samples: a file, directory, DICOM series directory or text list of paths.
    :param batch_size: unused here (patches are batched by the denoiser); kept for the
        published signature.
    :param class_cond: unused (class-conditional models are not used for PET).
    :yield: dicts with ``name`` (output file stem), ``path``, ``low_dose`` (float32
        ``(X, Y, Z)`` SUV) and ``affine`` (4x4, mm).
    """
    del batch_size, class_cond
    for path in volumes.list_inputs(base_samples):
        low_dose, affine = volumes.load_volume(path, index=0)
        yield dict(name=_stem(path), path=path, low_dose=low_dose, affine=affine)


def _stem(path):
    name = os.path.basename(os.path.normpath(path))
    for suffix in (".nii.gz", ".nii", ".npz"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def create_argparser(metadata=None, argv=None):
    """The argument parser; model/diffusion defaults come from the checkpoint ``metadata``."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=None,
                        help="checkpoint .pt (default: checkpoint/demo_paired.pt, or "
                             "checkpoint/demo_prior.pt for --cond_mode bcdpm)")
    parser.add_argument("--base_samples", required=True, help="low-dose input(s), see above")
    parser.add_argument("--save_dir", required=True, help="output directory")
    parser.add_argument("--num_samples", type=int, default=0,
                        help="process at most this many inputs (0: all)")
    parser.add_argument("--batch_size", type=int, default=1, help="patches per network call")
    parser.add_argument("--clip_denoised", type=str2bool, default=True)
    parser.add_argument("--seed", type=int, default=0, help="fixes all randomness")
    parser.add_argument("--cond_mode", choices=("auto", "paired", "bcdpm", "hybrid"), default="auto",
                        help="auto: paired for a paired checkpoint, bcdpm for an unconditional one")
    parser.add_argument("--use_ddim", type=str2bool, default=None,
                        help="DDIM sampling (default: the checkpoint's recommendation)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    parser.add_argument("--num_ensemble", type=int, default=1,
                        help="members with distinct seeds; outputs mean and voxel-wise std")
    parser.add_argument("--save_members", action="store_true", help="also write every member")
    parser.add_argument("--patch_z", type=int, default=None,
                        help="axial slab depth in model voxels (default: the checkpoint's "
                             "recommendation, else its training patch depth)")
    parser.add_argument("--patch_overlap", type=int, default=8, help="patch overlap in voxels")
    parser.add_argument("--max_patch_voxels", type=int, default=None,
                        help="also tile the transaxial plane when a slab is larger than this")
    parser.add_argument("--stitch", choices=("seamfree", "independent"), default="seamfree",
                        help="blend overlapping patches at every step, or stitch independent "
                             "chains at the end (the published code's behaviour)")
    parser.add_argument("--bc_steps", type=int, default=None,
                        help="BC-DPM: condition the last l reverse steps (default: the prior's "
                             "tuning table, else its sidecar, else --bc_noise; 0 samples the "
                             "prior alone)")
    parser.add_argument("--bc_noise", choices=tuple(BC_STEPS_BY_NOISE), default="medium",
                        help="BC-DPM paper defaults l = 5 / 10 / 15 for light / medium / heavy noise")
    parser.add_argument("--bc_lambda", type=float, default=None,
                        help="BC-DPM balance lambda (default: the prior's tuning table, row "
                             "nearest to the input's measured noise level; without one 0.2)")
    parser.add_argument("--bc_sigma_mm", type=float, default=None,
                        help="BC-DPM Gaussian-filter condition: sigma in mm (default: as "
                             "--bc_lambda; without a table 4)")
    parser.add_argument("--bc_scanner", default="quadra", help="scanner preset of the projector")
    parser.add_argument("--bc_view_mashing", type=int, default=None,
                        help="view mashing of the projector (default: the preset's; "
                             "make_dataset.py's demo data: ecat921_2d with 2)")
    parser.add_argument("--bc_psf_fwhm_mm", type=float, default=None,
                        help="image-space Gaussian PSF of the projector, FWHM in mm (default: "
                             "none; make_dataset.py's demo data: 4.5)")
    parser.add_argument("--bc_counts", type=float, default=None,
                        help="total counts of the low-dose acquisition (default: the input's "
                             "entry in its make_dataset.py subject manifest, else --bc_drf)")
    parser.add_argument("--bc_drf", type=float, default=None,
                        help="dose reduction factor, with --bc_full_counts")
    parser.add_argument("--bc_full_counts", type=float, default=None,
                        help="total counts of a full-dose acquisition of this volume")
    parser.add_argument("--bc_randoms_fraction", type=float, default=0.2,
                        help="randoms as a fraction of trues (paper: 0.2)")
    parser.add_argument("--bc_recon_iters", type=int, default=2, help="OSEM iterations of P^+")
    parser.add_argument("--bc_recon_subsets", type=int, default=8, help="OSEM subsets of P^+")
    parser.add_argument("--bc_start", type=str2bool, nargs="?", const=True, default=False,
                        help="start the reverse process at step l from the diffused low-dose "
                             "volume instead of pure noise (skips the T-l unconditioned steps; "
                             "default: the checkpoint's recommendation)")
    parser.add_argument("--dc_steps", type=int, default=0,
                        help="Poisson data consistency: EM-update the x0 estimate towards the "
                             "low-dose data in the last DC_STEPS reverse steps (any mode; uses the "
                             "--bc_* scanner and count level; 0: off)")
    parser.add_argument("--dc_iters", type=int, default=1, help="EM iterations per active step")
    parser.add_argument("--dc_subsets", type=int, default=1, help="EM view subsets")
    parser.add_argument("--hot_voxels", choices=HOT_MODES, default=None,
                        help="voxels near and above the model's SUV range (the checkpoint's "
                             "normalisation clip): 'rescale' denoises the input scaled into range "
                             "a second time (volumes with hot voxels only), 'input' takes them "
                             "from the input, 'clip' keeps the saturated output (default: BC-DPM "
                             f"the prior's tuning table, else {DEFAULT_HOT_MODE})")
    parser.add_argument("--fusion_kappa", type=float, default=0.0,
                        help="fuse the output with the input where they differ by more than "
                             "FUSION_KAPPA times the input's estimated noise variance (restores "
                             "contrast the model smooths away at low DRF; 0: off; default: the "
                             "checkpoint's recommendation)")
    parser.add_argument("--overwrite", action="store_true", help="redo inputs with outputs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per rank")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="network precision (auto: --use_fp16, bf16 on CPU)")
    flags = dict(sr_model_and_diffusion_defaults(), **model_and_diffusion_defaults())
    if metadata is not None:
        flags.update(metadata["flags"])
    add_dict_to_argparser(parser, flags)
    sampling = (metadata or {}).get("sampling", {})
    parser.set_defaults(**{k: v for k, v in sampling.items()
                           if k in ("timestep_respacing", "use_ddim", "bc_start",
                                    "patch_z", "patch_overlap", "fusion_kappa")})
    return parser


def parse_args(argv=None):
    """Parse twice: first for --model_path/--cond_mode, then with the checkpoint's defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model_path", default=None)
    pre.add_argument("--cond_mode", default="auto")
    known, _ = pre.parse_known_args(argv)
    model_path = known.model_path or (DEFAULT_PRIOR if known.cond_mode == "bcdpm" else DEFAULT_PAIRED)
    if not os.path.exists(model_path):
        raise InputError(f"{model_path}: checkpoint not found")
    metadata = read_metadata(model_path)
    args = create_argparser(metadata).parse_args(argv)
    args.model_path = model_path
    if args.use_ddim is None:
        args.use_ddim = bool(args.timestep_respacing.startswith("ddim"))
    return args, metadata


def overrides_from_args(args, metadata):
    """Flags given explicitly on the command line (or differing from the checkpoint's)."""
    names = list(dict(sr_model_and_diffusion_defaults(), **model_and_diffusion_defaults()))
    stored = (metadata or {}).get("flags", {})
    return {k: getattr(args, k) for k in names if k in stored and getattr(args, k) != stored[k]}


def _check_save_dir(save_dir):
    try:
        os.makedirs(save_dir, exist_ok=True)
        probe = os.path.join(save_dir, f".write_test_{os.getpid()}")
        with open(probe, "w") as handle:
            handle.write("ok")
        os.remove(probe)
    except OSError as error:
        raise InputError(f"{save_dir}: save directory is not writable ({error.strerror})") from None


def resolve_cond_mode(args, metadata):
    cond = metadata["cond"]
    mode = args.cond_mode
    if mode == "auto":
        mode = "paired" if cond == "paired" else "bcdpm"
    if mode in ("paired", "hybrid") and cond != "paired":
        raise InputError(f"{args.model_path}: --cond_mode {mode} needs a paired checkpoint; "
                         f"this one is unconditional (use --cond_mode bcdpm)")
    if mode == "bcdpm" and not serves_as_prior(metadata):
        raise InputError(f"{args.model_path}: --cond_mode bcdpm needs an unconditional prior or a "
                         f"paired checkpoint trained with --cond_dropout; this one is paired only "
                         f"(use --cond_mode hybrid)")
    return mode


def acquisition_counts(args, item):
    """Total low-dose counts for BC-DPM's noise insertion: ``--bc_counts``, the input's entry
    (``counts``) in its make_dataset.py subject manifest ``DIR/sNNNN/manifest.json``, or
    ``--bc_full_counts / --bc_drf``."""
    if args.bc_counts is not None:
        return float(args.bc_counts), "--bc_counts"
    description = dataset_manifest.describe_file(item["path"]) if os.path.isfile(item["path"]) else None
    if description is not None and description["counts"] is not None:
        return float(description["counts"]), dataset_manifest.subject_manifest_path(item["path"])
    if args.bc_drf is not None and args.bc_full_counts is not None:
        return float(args.bc_full_counts) / float(args.bc_drf), "--bc_full_counts / --bc_drf"
    raise InputError(f"{item['path']}: BC-DPM needs the low-dose count level: give --bc_counts, or "
                     f"--bc_full_counts with --bc_drf, or a make_dataset.py subject manifest "
                     f"listing the file's counts")


def conditioner_factory(args, mode, item, metadata):
    """The per-member sampler hook factory for ``item``: BC-DPM's block (``bcdpm``/``hybrid``)
    and/or Poisson data consistency (``--dc_steps``), both on the ``--bc_*`` acquisition model.
    Returns ``(factory or None, provenance)``: where the count level came from and BC-DPM's
    l, lambda, sigma and hot-voxel mode for this input (:func:`conditioning.resolve_bc_settings`)."""
    use_bc = mode in ("bcdpm", "hybrid")
    if not use_bc and not args.dc_steps:
        return None, dict(counts_source=None, bcdpm=None)
    counts, counts_source = acquisition_counts(args, item)
    bc_settings, bc_report = conditioning.resolve_bc_settings(
        dict(bc_lambda=args.bc_lambda, bc_sigma_mm=args.bc_sigma_mm, bc_steps=args.bc_steps,
             hot_voxels=args.hot_voxels),
        metadata.get("sampling", {}).get("bc_tuning"), item["low_dose"],
        dict(bc_steps=args.default_bc_steps))
    acquisition = dict(
        scanner=args.bc_scanner, total_counts=counts, randoms_fraction=args.bc_randoms_fraction,
        normalisation=metadata["normalisation"], voxel_mm=metadata["voxel_mm"],
        view_mashing=args.bc_view_mashing, psf_fwhm_mm=args.bc_psf_fwhm_mm)
    bc = conditioning.BCDPMFactory(
        num_steps_l=bc_settings["bc_steps"], lam=bc_settings["bc_lambda"],
        sigma_mm=bc_settings["bc_sigma_mm"],
        recon_iters=args.bc_recon_iters, recon_subsets=args.bc_recon_subsets,
        **acquisition) if use_bc else None
    dc = DataConsistencyFactory(
        num_steps=args.dc_steps, iters=args.dc_iters, subsets=args.dc_subsets,
        use_ddim=args.use_ddim, **acquisition) if args.dc_steps else None
    return conditioning.chain_factories([bc, dc]), dict(counts_source=counts_source,
                                                        bcdpm=bc_report if use_bc else None)


def output_paths(save_dir, name):
    base = os.path.join(save_dir, name)
    return dict(
        denoised_nii=base + "_denoised.nii.gz", denoised_npz=base + "_denoised.npz",
        uncertainty_nii=base + "_uncertainty.nii.gz", uncertainty_npz=base + "_uncertainty.npz",
        members_npz=base + "_members.npz", png=base + ".png", json=base + ".json",
    )


def _write_json(path, content):
    volumes.atomic_write_bytes(path, json.dumps(content, indent=2, sort_keys=True, default=float) + "\n")


class MemberStore:
    """Finished ensemble members of one input under ``SAVE_DIR/.partial/NAME`` (rank 0 writes)."""

    def __init__(self, save_dir, name, signature):
        self.directory = os.path.join(save_dir, ".partial", name)
        self.signature = signature

    def _path(self, member):
        return os.path.join(self.directory, f"member{member:03d}_{self.signature}.npz")

    def load(self, members):
        done = {}
        for k in range(members):
            if os.path.exists(self._path(k)):
                done[k], _ = volumes.load_volume(self._path(k))
        return done

    def save(self, member, volume, affine):
        os.makedirs(self.directory, exist_ok=True)
        volumes.save_npz(self._path(member), volume, affine=affine)

    def clear(self):
        if os.path.isdir(self.directory):
            for entry in os.listdir(self.directory):
                os.remove(os.path.join(self.directory, entry))
            os.rmdir(self.directory)


def describe_post_processing(info):
    """``"; hot voxels ...; fusion ..."`` for a member's log line."""
    text = ""
    hot = info.get("hot_voxels", {})
    if hot.get("mode") == "rescale":
        text += f"; hot voxels from a second pass on the input / {hot['factor']:.2f}"
    fusion = info.get("fusion")
    if fusion is not None:
        if fusion["noise_index"] is None:
            text += "; fusion skipped (too little tissue to measure the noise)"
        else:
            text += (f"; fusion: noise index {fusion['noise_index']:.4f} SUV, mean input weight "
                     f"{fusion['mean_weight']:.2f}")
    return text


def run_signature(args):
    """Short hash of the settings that change a member's result (resume only reuses members
    made with the same settings)."""
    import hashlib

    keys = ("model_path", "seed", "cond_mode", "timestep_respacing", "use_ddim", "eta", "patch_z",
            "patch_overlap", "max_patch_voxels", "stitch", "bc_steps", "bc_lambda", "bc_sigma_mm",
            "bc_scanner", "bc_view_mashing", "bc_psf_fwhm_mm", "bc_counts", "bc_start", "precision",
            "batch_size", "dc_steps", "dc_iters", "dc_subsets", "hot_voxels",
            "fusion_kappa", "default_bc_steps")
    text = json.dumps({k: getattr(args, k) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def main(argv=None):
    args, metadata = parse_args(argv)
    dist_util.setup_dist(threads=args.threads)
    rank, world = dist_util.rank(), dist_util.world_size()
    if rank == 0:
        _check_save_dir(args.save_dir)
    logger.configure(dir=args.save_dir, format_strs=["stdout"] if rank == 0 else [])

    device = dist_util.dev()
    precision = resolve_precision(args.use_fp16, device,
                                  None if args.precision == "auto" else args.precision)
    if args.precision == "auto" and device.type == "cpu":
        precision = "bf16"
    args.precision = precision
    try:
        model, diffusion, metadata = load_model_and_diffusion(
            args.model_path, overrides_from_args(args, metadata), device=device)
    except ValueError as error:
        raise InputError(str(error).splitlines()[0] + " (run with the checkpoint's flags)") from None
    mode = resolve_cond_mode(args, metadata)
    args.cond_mode = mode
    trained_t = metadata.get("sampling", {}).get("trained_max_t")
    if trained_t and not args.bc_start:
        logger.warn(f"{args.model_path} was trained only for t < {trained_t}: sampling from pure "
                    f"noise leaves its training range (use --bc_start)")
    # l: --bc_steps, else the prior's tuning table per input, else its sidecar, else --bc_noise
    args.default_bc_steps = int(metadata.get("sampling", {}).get("bc_steps")
                                or BC_STEPS_BY_NOISE[args.bc_noise])
    if mode in ("bcdpm", "hybrid") or args.bc_start:
        try:
            conditioning.check_bc_steps(args.default_bc_steps if args.bc_steps is None
                                        else args.bc_steps, diffusion.num_timesteps, args.bc_start)
        except ValueError as error:
            raise InputError(f"--bc_steps: {error}") from None
    if not 0 <= args.dc_steps <= diffusion.num_timesteps or args.dc_iters < 1 or args.dc_subsets < 1:
        raise InputError(f"--dc_steps {args.dc_steps} must lie in [0, {diffusion.num_timesteps}] "
                         f"and --dc_iters / --dc_subsets be >= 1")
    if args.fusion_kappa < 0:
        raise InputError(f"--fusion_kappa must be >= 0 (0: off), got {args.fusion_kappa}")
    settings = SamplingSettings(
        use_ddim=args.use_ddim, eta=args.eta, clip_denoised=args.clip_denoised,
        patch_z=args.patch_z, overlap=args.patch_overlap, max_patch_voxels=args.max_patch_voxels,
        batch_size=args.batch_size, stitch=args.stitch,
        start_t=None, precision=precision,
        hot_voxels=args.hot_voxels or DEFAULT_HOT_MODE, fusion_kappa=args.fusion_kappa or None,
        null_condition=is_null_conditioned_prior(metadata, mode),
    )
    logger.log(f"{world} rank(s), device {device}, precision {precision}, mode {mode}, "
               f"{diffusion.num_timesteps} steps ({'DDIM' if args.use_ddim else 'ancestral'}), "
               f"checkpoint {args.model_path}")

    items = load_data_for_worker(args.base_samples, args.batch_size, False)
    signature = run_signature(args)
    for index, item in enumerate(items):
        if 0 < args.num_samples <= index:
            break
        paths = output_paths(args.save_dir, item["name"])
        if os.path.exists(paths["json"]) and not args.overwrite:
            logger.log(f"{item['name']}: outputs exist, skipped (--overwrite to redo)")
            continue
        if (item["low_dose"] < 0).any():
            logger.log(f"{item['name']}: {(item['low_dose'] < 0).mean():.2%} negative voxels "
                       f"clipped to 0")
        factory, provenance = conditioner_factory(args, mode, item, metadata)
        bc_steps = args.default_bc_steps if args.bc_steps is None else args.bc_steps
        hot_mode = settings.hot_voxels
        if provenance["bcdpm"] is not None:
            bc = provenance["bcdpm"]
            bc_steps, hot_mode = bc["bc_steps"], bc["hot_voxels"]
            logger.log(f"{item['name']}: BC-DPM l {bc_steps} ({bc['bc_steps_source']}), lambda "
                       f"{bc['bc_lambda']:g} ({bc['bc_lambda_source']}), sigma {bc['bc_sigma_mm']:g} mm "
                       f"({bc['bc_sigma_mm_source']}), hot voxels {hot_mode} ({bc['hot_voxels_source']})"
                       + (f", noise index {bc['noise_index']:.4f} SUV" if bc["noise_index"] else ""))
            try:
                conditioning.check_bc_steps(bc_steps, diffusion.num_timesteps, args.bc_start)
            except ValueError as error:
                raise InputError(f"{item['path']}: {error} ({bc['bc_steps_source']})") from None
        item_settings = dataclasses.replace(settings, start_t=bc_steps - 1 if args.bc_start else None,
                                            hot_voxels=hot_mode)
        denoiser = VolumeDenoiser(model, diffusion, metadata, item_settings,
                                  conditioner_factory=factory, rank=rank, world_size=world)
        seeds = [member_seed(args.seed, item["name"], k) for k in range(args.num_ensemble)]
        store = MemberStore(args.save_dir, item["name"], signature)
        done = store.load(args.num_ensemble) if not args.overwrite else {}
        if world > 1:
            shared = [done]
            dist.broadcast_object_list(shared, src=0)
            done = shared[0]
        if done:
            logger.log(f"{item['name']}: resuming, members {sorted(done)} already done")

        def keep_member(k, volume, info, item=item, store=store):
            if rank == 0:
                store.save(k, volume, item["affine"])
            logger.log(f"{item['name']}: member {k} done in {info['seconds']:.1f} s"
                       f"{describe_post_processing(info)}")

        begin = time.perf_counter()
        mean, std, members, info = denoiser.denoise(item["low_dose"], item["affine"], seeds,
                                                    on_member=keep_member, skip=done)
        seconds = time.perf_counter() - begin
        if rank == 0:
            write_outputs(args, item, paths, mean, std, members, dict(
                info, seconds=seconds, seeds=seeds, cond_mode=mode, world_size=world,
                checkpoint=dict(path=args.model_path, sha256=metadata["sha256"]),
                flags=metadata["flags"], **provenance,
                settings={k: v for k, v in vars(args).items() if not k.startswith("_")},
            ))
            store.clear()
        dist_util.barrier()
        logger.log(f"{item['name']}: done in {seconds:.1f} s -> {paths['denoised_nii']}")
    logger.log("sampling complete")


def write_outputs(args, item, paths, mean, std, members, report):
    """Write NIfTI, npz, PNG, then the JSON (last: it marks the input as finished)."""
    affine = item["affine"]
    volumes.save_nifti(paths["denoised_nii"], mean, affine)
    volumes.save_nifti(paths["uncertainty_nii"], std, affine)
    volumes.save_npz(paths["denoised_npz"], mean, affine=affine)
    volumes.save_npz(paths["uncertainty_npz"], std, affine=affine)
    if args.save_members:
        volumes.save_stack(paths["members_npz"], np.stack(members), affine)
    vmax = float(np.percentile(item["low_dose"], 99.9)) or 1.0
    save_volume_panels(paths["png"], [
        ("low dose", item["low_dose"], vmax, "gray_r"),
        ("denoised", mean, vmax, "gray_r"),
        ("uncertainty (std)", std, None, "magma"),
    ], volumes.voxel_sizes(affine), title=f"{item['name']} ({report['cond_mode']}, "
                                          f"{len(members)} member(s))")
    _write_json(paths["json"], dict(report, input=item["path"], outputs=paths))


if __name__ == "__main__":
    try:
        main()
    except (InputError, ValueError, FileNotFoundError, MemoryError) as error:
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
