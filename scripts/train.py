"""
Train a 3D diffusion model on PET volume patches.

  --cond paired  the published 3D DDPM: SuperResModel conditioned on the low-dose patch
                 (``sr_model_and_diffusion_defaults``), trained on low/full-dose pairs.
  --cond none    an unconditional prior p(x) for BC-DPM (``model_and_diffusion_defaults``
                 with dims=3, in_channels=1), trained on full-dose volumes only.
  --cond paired --cond_dropout P
                 one model for both: the low-dose channel is replaced by the null condition
                 (an empty volume) in a fraction P of the patches, so the checkpoint also
                 serves as BC-DPM's prior (``scripts/test.py --cond_mode bcdpm`` feeds it the
                 null condition).
  --dims 2       a 2D model on single slices: give --patch_size 1 X Y; batches are (B, 1, X, Y)
                 (the 2D prior of the BC-DPM paper's protocol, see scripts/bcdpm_protocol.py).

Launch with ``python scripts/train.py ...`` or ``mpiexec -n N python scripts/train.py ...``
(data-parallel: each rank reads its share of the files; gradients are averaged by DDP).
Checkpoints (``modelNNNNNN.pt``, ``ema_RATE_NNNNNN.pt``, ``optNNNNNN.pt``, ``stateNNNNNN.pt``)
and ``modelNNNNNN.json`` (flags, normalisation, voxel size, training data) go to --log_dir,
with ``progress.csv`` and ``loss_curve.png`` (``--val_dir``: also ``val_psnr`` on held-out
patches, see ``guided_diffusion.evaluation.validation``). Rerunning with the same --log_dir resumes from
its latest checkpoint exactly. --image_size / --large_size / --small_size 0 (default) mean
the patch's X size.
Data layout: see ``guided_diffusion.image_datasets``.
"""

import argparse

import torch as th


from guided_diffusion import dist_util, logger
from guided_diffusion.checkpoints import warm_start
from guided_diffusion.image_datasets import (
    OrderedVolumePatchDataset,
    list_volume_sources,
    load_data,
    manifest_voxel_mm,
    resolve_normalisation,
)
from guided_diffusion.normalisation import SQRT_NORMALISATION, TRANSFORMS
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    add_runtime_arguments,
    args_to_dict,
    create_diffusion_from_flags,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
    str2bool,
)
from guided_diffusion.train_util import TrainLoop, data_record, seed_rank_streams
from guided_diffusion.evaluation.validation import PatchValidator

PUBLISHED_VOXEL_MM = 1.65


def model_defaults(cond):
    """Model and diffusion flag defaults for ``cond`` ("paired" or "none")."""
    if cond == "paired":
        defaults = sr_model_and_diffusion_defaults()
        defaults.update(large_size=0, small_size=0)
    else:
        defaults = model_and_diffusion_defaults()
        defaults.update(dims=3, in_channels=1, image_size=0)
    return defaults


def create_argparser(argv=None):
    """The parser; its model flags and their defaults depend on ``--cond`` in ``argv``."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--cond", choices=("paired", "none"), default="paired")
    cond = pre.parse_known_args(argv)[0].cond

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cond", choices=("paired", "none"), default="paired",
                        help="paired: condition on low-dose patches; none: unconditional prior")
    parser.add_argument("--data_dir", required=True, help="directory of .npz / NIfTI volumes")
    parser.add_argument("--log_dir", required=True, help="checkpoints, logs, progress.csv")
    parser.add_argument("--patch_size", type=int, nargs=3, default=[96, 96, 96],
                        metavar=("Z", "X", "Y"), help="training patch size in voxels")
    parser.add_argument("--voxel_mm", type=float, default=None,
                        help="voxel size of the data in mm (default: data_dir/manifest.json, "
                             f"else {PUBLISHED_VOXEL_MM})")
    parser.add_argument("--normalisation", choices=TRANSFORMS, default="linear",
                        help="model-space transform of SUV (guided_diffusion.normalisation): sqrt "
                             "(variance-stabilising, no clip, --scale_suv SUV at the range top) or "
                             "linear (clipped at --clip_suv, divided by --scale_suv)")
    parser.add_argument("--clip_suv", type=float, default=16.0, help="linear: SUV clipping level")
    parser.add_argument("--scale_suv", type=float, default=None,
                        help="SUV at the top of the model range (default: 100 for sqrt, 16 for linear)")
    parser.add_argument("--knee_suv", type=float, default=SQRT_NORMALISATION["knee"],
                        help="sqrt: SUV below which the transform is about linear")
    parser.add_argument("--intensity_jitter", type=float, default=0.0,
                        help="random SUV scaling U(1-j, 1+j), same for low and full dose")
    parser.add_argument("--cond_dropout", type=float, default=0.0,
                        help="paired: fraction of patches trained with the null condition "
                             "(one model for paired sampling and as BC-DPM's prior)")
    parser.add_argument("--random_flip", type=str2bool, default=True,
                        help="random left-right (X) flips")
    parser.add_argument("--init_from", default=None,
                        help="start from these weights (same architecture; e.g. the U-Net baseline "
                             "for a paired diffusion model, see checkpoints.warm_start); a resumed "
                             "run ignores it")
    parser.add_argument("--max_steps", type=int, default=0, help="stop after this step (0: never)")
    parser.add_argument("--grad_clip", type=float, default=0.0, help="max gradient norm (0: off)")
    parser.add_argument("--val_dir", default=None,
                        help="held-out volumes for periodic validation PSNR (val.txt lists of a "
                             "make_dataset.py directory, else every volume in it)")
    parser.add_argument("--val_interval", type=int, default=0,
                        help="validate every N steps (0: at every --save_interval)")
    parser.add_argument("--val_patches", type=int, default=4, help="validation patches")
    parser.add_argument("--val_respacing", default="ddim10", help="validation sampler steps")
    parser.add_argument("--val_start_fraction", type=float, default=0.3,
                        help="unconditional models: start validation sampling from the diffused "
                             "full-dose patch at this fraction of the steps")
    add_runtime_arguments(parser, seed_help="seed of the initial weights, the patches and the noise",
                          precision_help="auto: follow --use_fp16 (fp16 on CUDA, bf16 elsewhere), else fp32")
    defaults = dict(
        schedule_sampler="uniform",
        lr=1e-4,
        weight_decay=0.01,
        lr_anneal_steps=0,
        batch_size=1,
        microbatch=-1,
        ema_rate="0.9999",
        ema_warmup=True,
        log_interval=10,
        save_interval=10000,
        resume_checkpoint="",
        fp16_scale_growth=1e-3,
    )
    defaults.update(model_defaults(cond))
    add_dict_to_argparser(parser, defaults)
    return parser


def normalisation_from_flags(args):
    """The ``--normalisation`` / ``--clip_suv`` / ``--scale_suv`` / ``--knee_suv`` dict."""
    if args.normalisation == "linear":
        norm = dict(transform="linear", clip=args.clip_suv, scale=args.scale_suv or args.clip_suv)
    else:
        norm = dict(SQRT_NORMALISATION, knee=args.knee_suv)
        if args.scale_suv:
            norm["scale"] = args.scale_suv
    return norm


def read_voxel_mm(data_dir, flag):
    """Voxel size: the flag, else ``voxel_mm`` / ``voxel_size_mm`` of data_dir/manifest.json."""
    voxel_mm = flag if flag is not None else manifest_voxel_mm(data_dir)
    if voxel_mm is None:
        logger.warn(f"voxel size unknown (no --voxel_mm, no manifest): assuming {PUBLISHED_VOXEL_MM} mm")
        return PUBLISHED_VOXEL_MM
    return voxel_mm


def make_validator(args, sources, paired, normalisation, flags):
    """The periodic validation callback: ``--val_patches`` fixed patches of the ``--val_dir``
    volumes ``sources`` (one per volume in turn, no flips or intensity jitter)."""
    dataset = OrderedVolumePatchDataset(sources, args.patch_size, paired=paired, random_flip=False,
                                        normalisation=normalisation, seed=args.seed + 1,
                                        dims=args.dims)
    return PatchValidator(
        [dataset[k] for k in range(args.val_patches)],
        create_diffusion_from_flags(flags, args.val_respacing),
        normalisation=normalisation, interval=args.val_interval or args.save_interval,
        use_ddim=args.val_respacing.startswith("ddim"), start_fraction=args.val_start_fraction,
        seed=args.seed)


def main(argv=None):
    args = create_argparser(argv).parse_args(argv)
    paired = args.cond == "paired"
    for size_flag in ("large_size", "small_size") if paired else ("image_size",):
        if getattr(args, size_flag) == 0:
            setattr(args, size_flag, args.patch_size[1])

    if args.cond_dropout and not paired:
        raise SystemExit("--cond_dropout needs --cond paired (it drops the low-dose condition)")
    num_files = len(list_volume_sources(args.data_dir, paired))  # fail early on bad data

    dist_util.setup_dist(threads=args.threads)
    logger.configure(dir=args.log_dir)

    th.manual_seed(args.seed)  # same initial weights everywhere (rank 0's are broadcast)
    flag_names = model_defaults(args.cond).keys()
    flags = args_to_dict(args, flag_names)
    create = sr_create_model_and_diffusion if paired else create_model_and_diffusion
    logger.log(f"creating {'paired' if paired else 'unconditional'} model and diffusion...")
    model, diffusion = create(**flags)
    model.to(dist_util.dev())
    logger.log(f"{sum(p.numel() for p in model.parameters())} parameters")
    init_record = warm_start(model, args.init_from, args.cond) if args.init_from else None

    seed_rank_streams(args.seed)

    normalisation = resolve_normalisation(normalisation_from_flags(args))
    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        patch_size=args.patch_size,
        paired=paired,
        random_flip=args.random_flip,
        intensity_jitter=args.intensity_jitter,
        normalisation=normalisation,
        seed=args.seed,
        dims=args.dims,
        cond_dropout=args.cond_dropout,
    )
    metadata = dict(
        flags=flags,
        cond=args.cond,
        cond_dropout=args.cond_dropout,
        normalisation=normalisation,
        voxel_mm=read_voxel_mm(args.data_dir, args.voxel_mm),
        patch_size_zxy=list(args.patch_size),
        tensor_layout="(B, C, X, Y)" if args.dims == 2 else "(B, C, Z, X, Y)",
        training_data=data_record(args.data_dir, num_files),
        training=dict(
            lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
            world_size=dist_util.world_size(), ema_rate=args.ema_rate, ema_warmup=args.ema_warmup, seed=args.seed,
            precision=args.precision, grad_clip=args.grad_clip,
            schedule_sampler=args.schedule_sampler, lr_anneal_steps=args.lr_anneal_steps,
            init_from=init_record,
        ),
    )

    callback = None
    if args.val_dir:
        sources = list_volume_sources(args.val_dir, paired, split="val")
        callback = make_validator(args, sources, paired, normalisation, flags)
        metadata["training"]["validation"] = dict(
            data_record(args.val_dir, len(sources), split="val"), patches=args.val_patches,
            respacing=args.val_respacing, interval=callback.interval)

    logger.log("training...")
    TrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        batch_size=args.batch_size,
        microbatch=args.microbatch,
        lr=args.lr,
        ema_rate=args.ema_rate,
        ema_warmup=args.ema_warmup,
        log_interval=args.log_interval,
        save_interval=args.save_interval,
        resume_checkpoint=args.resume_checkpoint,
        use_fp16=args.use_fp16,
        fp16_scale_growth=args.fp16_scale_growth,
        schedule_sampler=create_named_schedule_sampler(args.schedule_sampler, diffusion),
        weight_decay=args.weight_decay,
        lr_anneal_steps=args.lr_anneal_steps,
        precision=None if args.precision == "auto" else args.precision,
        grad_clip=args.grad_clip,
        max_steps=args.max_steps,
        metadata=metadata,
        save_dir=args.log_dir,
        callback=callback,
    ).run_loop()
    logger.log("training done")
    dist_util.cleanup()


if __name__ == "__main__":
    main()
