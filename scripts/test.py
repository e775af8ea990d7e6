"""
Batch denoising of low-dose PET volumes with a 3D diffusion model, sharded over MPI ranks.

    mpiexec -n 2 python scripts/test.py --base_samples LOW_DOSE --save_dir OUT

``--base_samples`` is a volume file (published ``.npz`` layout: ``arr_0[0]`` is the low-dose
``(X, Y, Z)`` volume in SUV; NIfTI ``.nii``/``.nii.gz``), a DICOM PET series directory, a
directory of volume files or a text list of paths. Model and diffusion flags default to the
checkpoint's JSON sidecar; every sampling flag resolves as flag > the checkpoint's tuning table
> its sidecar > the toolkit's default (``guided_diffusion.sampling.settings``). Per input
``NAME`` the save directory receives ``NAME_denoised.nii.gz`` / ``.npz`` (ensemble mean, SUV,
input grid and affine), with two or more ensemble members ``NAME_uncertainty.nii.gz`` / ``.npz``
(voxel-wise standard deviation), ``NAME.png`` (MIPs and slices), for DICOM input (``--dicom_out``)
``NAME_denoised_dicom/`` (and ``NAME_uncertainty_dicom/``) and ``NAME.json`` (settings, seeds,
timings, checkpoint sha256), written last. Inputs whose JSON exists are skipped unless
``--overwrite``; finished members are kept under ``SAVE_DIR/.partial`` so an interrupted run
resumes where it stopped.

Conditioning modes (``--cond_mode``):
  paired  the published 3D DDPM: the low-dose volume is the model's second input channel;
  bcdpm   an unconditional prior + BC-DPM's bidirectional block (Eq. 10) in the last
          ``--bc_steps`` reverse steps (Gaussian-filter condition and Poisson noise insertion
          through the 3D PET projector); a paired checkpoint trained with ``--cond_dropout``
          serves as the prior with the null condition;
  hybrid  the block on top of the paired model.
Any mode can add Poisson data consistency in the last ``--dc_steps`` steps.
"""

import argparse
import os

import numpy as np

from guided_diffusion import dist_util, logger
from guided_diffusion.checkpoints import load_model_and_diffusion, read_metadata
from guided_diffusion.evaluation.figures import save_volume_panels
from guided_diffusion.pet import volumes
from guided_diffusion.sampling import arguments, settings
from guided_diffusion.sampling.batch import DICOM_OUT, BatchRun
from guided_diffusion.script_util import (
    USER_ERRORS,
    exit_on_user_error,
    add_dict_to_argparser,
    add_runtime_arguments,
    model_and_diffusion_defaults,
    sr_model_and_diffusion_defaults,
    str2bool,
)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DEFAULT_PAIRED = os.path.join(REPO, "checkpoint", "demo_paired.pt")
DEFAULT_PRIOR = os.path.join(REPO, "checkpoint", "demo_prior.pt")
MODEL_FLAGS = list(dict(sr_model_and_diffusion_defaults(), **model_and_diffusion_defaults()))


class InputError(Exception):
    """A problem with the user's input, reported as one line and exit status 2."""


def load_data_for_worker(base_samples, batch_size, class_cond):
    """Yield the low-dose volumes to denoise: the hook users adapt to their own data.

    Every rank iterates over every volume (the ranks share the network evaluations of each
    volume, see ``guided_diffusion.sampling.distributed``), so this loader does not shard;
    replace it to read other formats, but keep what it yields.

    :param base_samples: a file, directory, DICOM series directory or text list of paths.
    :param batch_size, class_cond: unused (the published signature).
    :yield: dicts with ``name`` (output file stem), ``path``, ``low_dose`` (float32
        ``(X, Y, Z)`` SUV) and ``affine`` (4x4, mm).
    """
    del batch_size, class_cond
    for path in volumes.list_inputs(base_samples):
        low_dose, affine = volumes.load_volume(path, index=0)
        if min(low_dose.shape) < 2:
            raise InputError(f"{path}: a 2D image of shape {low_dose.shape}: the 3D model needs an "
                             f"(X, Y, Z) volume with at least 2 voxels along every axis")
        yield dict(name=volumes.stem(path), path=path, low_dose=low_dose, affine=affine)


def create_argparser(metadata=None):
    """The argument parser; model/diffusion defaults come from the checkpoint ``metadata``."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=None,
                        help="checkpoint .pt (default: checkpoint/demo_paired.pt, or "
                             "checkpoint/demo_prior.pt for --cond_mode bcdpm)")
    parser.add_argument("--base_samples", required=True, help="low-dose input(s), see above")
    parser.add_argument("--save_dir", required=True, help="output directory")
    parser.add_argument("--num_samples", type=int, default=0, help="at most this many inputs (0: all)")
    parser.add_argument("--clip_denoised", type=str2bool, default=None, help="clip x0 to the model range (default True)")
    parser.add_argument("--cond_mode", choices=("auto",) + settings.MODES, default="auto",
                        help="auto: paired for a paired checkpoint, bcdpm for an unconditional one")
    parser.add_argument("--use_ddim", type=str2bool, default=None,
                        help="DDIM sampling (default: the checkpoint's recommendation, else for 'ddimN')")
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta (default 0)")
    parser.add_argument("--num_ensemble", type=int, default=None,
                        help="members with distinct seeds: mean, and for >= 2 the voxel-wise std (default: the "
                             "ensemble size the checkpoint's BC-DPM tuning was made for, else 1)")
    parser.add_argument("--save_members", action="store_true", help="also write every member")
    parser.add_argument("--dicom_out", choices=DICOM_OUT, default="auto",
                        help="also write a DICOM PET series (auto: for DICOM input)")
    parser.add_argument("--overwrite", action="store_true", help="redo inputs with outputs")
    add_runtime_arguments(parser, seed_help="fixes all randomness")
    arguments.add_patching_arguments(parser)
    arguments.add_guidance_arguments(parser)
    arguments.add_acquisition_arguments(parser)
    flags = dict(sr_model_and_diffusion_defaults(), **model_and_diffusion_defaults())
    flags.update((metadata or {}).get("flags", {}))
    flags.pop("x0_skip_sigma", None)  # a sampling setting (--x0_skip_sigma above), resolved per input
    add_dict_to_argparser(parser.add_argument_group("model and diffusion (default: the checkpoint's)"), flags)
    parser.set_defaults(timestep_respacing=None, batch_size=None)
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
    return args, metadata


SAMPLING_FLAGS = ("timestep_respacing", "x0_skip_sigma")
"""Diffusion flags that the settings resolver owns (per run or per input), not the model loader."""


def model_overrides(args, metadata, respacing):
    """Model/diffusion flags that differ from the checkpoint's, and the resolved respacing."""
    stored = (metadata or {}).get("flags", {})
    changed = {k: getattr(args, k) for k in MODEL_FLAGS
               if k in stored and k not in SAMPLING_FLAGS and getattr(args, k) != stored[k]}
    return dict(changed, timestep_respacing=respacing)


def check_save_dir(save_dir):
    try:
        os.makedirs(save_dir, exist_ok=True)
        probe = os.path.join(save_dir, f".write_test_{os.getpid()}")
        with open(probe, "w") as handle:
            handle.write("ok")
        os.remove(probe)
    except OSError as error:
        raise InputError(f"{save_dir}: save directory is not writable ({error.strerror})") from None


def main(argv=None):
    args, metadata = parse_args(argv)
    dist_util.setup_dist(threads=args.threads)
    rank, world = dist_util.rank(), dist_util.world_size()
    if rank == 0:
        check_save_dir(args.save_dir)
    logger.configure(dir=args.save_dir, format_strs=["stdout"] if rank == 0 else [])
    device = dist_util.dev()
    precision = settings.resolve_precision(args.precision, args.use_fp16, device)
    defaults = arguments.noise_class_defaults(args)
    try:  # run-level settings first: the respacing builds the diffusion
        mode = settings.resolve_mode(args.cond_mode, metadata, args.model_path) if metadata else "paired"
        members = args.num_ensemble or settings.recommended_members(metadata or {}, mode)
        given = dict(arguments.given_settings(args), members=members)
        run = settings.resolve_settings(given, metadata or {}, mode, defaults=defaults)
        model, diffusion, metadata = load_model_and_diffusion(
            args.model_path, model_overrides(args, metadata, run["timestep_respacing"]), device=device)
        mode = settings.resolve_mode(args.cond_mode, metadata, args.model_path)
        settings.check_settings(run, diffusion.num_timesteps)
    except ValueError as error:
        raise InputError(str(error).splitlines()[0]) from None
    for warning in settings.range_warnings(run, metadata, args.model_path):
        logger.warn(warning)
    logger.log(f"{world} rank(s), device {device}, precision {precision}, mode {mode}, "
               f"{diffusion.num_timesteps} steps ({'DDIM' if run['use_ddim'] else 'ancestral'}), "
               f"flips {run['flips'] or 'none'} ({run.sources['flips']}), "
               f"{members} member(s){'' if args.num_ensemble else ' (the checkpoint default)'}, "
               f"checkpoint {args.model_path}")
    batch = BatchRun(model, diffusion, metadata, mode, args.model_path, args.save_dir, given, defaults,
                     arguments.given_acquisition(args), precision, seed=args.seed,
                     num_ensemble=members, overwrite=args.overwrite,
                     save_members=args.save_members, dicom_out=args.dicom_out, draw=draw_panels,
                     rank=rank, world_size=world)
    for index, item in enumerate(load_data_for_worker(args.base_samples, None, False)):
        if 0 < args.num_samples <= index:
            break
        batch.denoise(item)
    logger.log("sampling complete")
    dist_util.cleanup()


def draw_panels(path, item, mean, std, mode):
    """MIPs and slices of the input, the denoised image and (two or more members) the uncertainty."""
    vmax = float(np.percentile(item["low_dose"], 99.9)) or 1.0
    panels = [("low dose", item["low_dose"], vmax, "gray_r"), ("denoised", mean, vmax, "gray_r")]
    if std is not None:
        panels.append(("std", std, None, "magma"))
    save_volume_panels(path, panels, volumes.voxel_sizes(item["affine"]),
                       title=f"{item['name']} ({mode}, {'ensemble' if std is not None else 'one member'})")


if __name__ == "__main__":
    exit_on_user_error(main, (InputError,) + USER_ERRORS)
