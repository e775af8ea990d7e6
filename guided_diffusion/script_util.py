"""
Flag defaults and factories for models and diffusions (upstream guided-diffusion names),
plus strict checkpoint loading with flag inference from tensor shapes.

Two model paths:

* ``create_model`` (upstream unconditional / class-conditional UNet; ``dims`` 2 or 3).
* ``sr_create_model`` (paired conditioning, ``SuperResModel``): defaults are the
  published 3D PET DDPM (Yu/Gong 2025): 96^2 transaxial patches, 128 channels,
  channel_mult (1, 1, 2, 3, 4), no attention, learned sigma, ``dims=3`` with tensors
  ``(B, C, Z, X, Y)``. For ``dims=3`` it uses the published decoder layout so that the
  published weights load with ``strict=True``.
"""

import argparse
import os
import shlex

import torch as th

from . import gaussian_diffusion as gd
from .respace import RegressionDiffusion, SpacedDiffusion, space_timesteps
from .unet import LAYOUTS, SuperResModel, UNetModel

NUM_CLASSES = 1000

# Default channel multipliers keyed by image size (upstream create_model table).
UPSTREAM_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}
# Published sr_create_model table (large_size); any other size -> SR_FALLBACK_CHANNEL_MULT.
SR_CHANNEL_MULT = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}
SR_FALLBACK_CHANNEL_MULT = (1, 1, 2, 3, 4)


def diffusion_defaults():
    """Defaults for the diffusion process (upstream; ``sigma_small``, as in improved-diffusion:
    sample with the posterior variance instead of beta_t when the variance is not learned; it
    changes sampling only, not the MSE training)."""
    return dict(
        learn_sigma=False,
        sigma_small=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        predict_v=False,
        regression=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
        x0_skip_sigma=0.0,
    )


def model_and_diffusion_defaults():
    """Defaults for the unconditional model path (upstream values; dims=2, 3 channels)."""
    res = dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
        dims=2,
        in_channels=3,
        unet_layout="auto",
    )
    res.update(diffusion_defaults())
    return res


def sr_model_and_diffusion_defaults():
    """
    Defaults for the paired (SuperResModel) path: the published 3D PET DDPM flags
    (``--attention_resolutions 1000 --large_size 96 --small_size 96 --num_channels 128
    --num_head_channels 64 --learn_sigma True --resblock_updown True
    --use_scale_shift_norm True``), dims=3, one image channel (+ one low-dose channel).
    """
    res = dict(
        large_size=96,
        small_size=96,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=64,
        attention_resolutions="1000",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=True,
        use_fp16=False,
        use_new_attention_order=False,
        dims=3,
        in_channels=1,
        unet_layout="auto",
        predict_residual=False,
    )
    res.update(diffusion_defaults())
    res["learn_sigma"] = True
    return res


def parse_channel_mult(channel_mult, size, table, fallback=None):
    """
    Channel multipliers from a flag string.

    :param channel_mult: "" (derive from `size` via `table`) or e.g. "1,1,2,3,4".
    :param fallback: multipliers for sizes missing from `table`; None -> ValueError.
    :return: tuple of multipliers (ints, or floats such as 0.5).
    """
    if channel_mult == "":
        if size in table:
            return table[size]
        if fallback is None:
            raise ValueError(
                f"no default channel_mult for image size {size}; pass --channel_mult "
                f"(e.g. 1,1,2,3,4)"
            )
        return fallback
    try:
        values = [float(v) for v in str(channel_mult).split(",")]
    except ValueError:
        raise ValueError(f"--channel_mult {channel_mult!r}: expected numbers like 1,2,2,4")
    if not values or min(values) <= 0:
        raise ValueError(f"--channel_mult {channel_mult!r}: multipliers must be positive")
    return tuple(int(v) if v.is_integer() else v for v in values)


def parse_attention_resolutions(attention_resolutions, image_size):
    """
    Downsample rates at which to use attention.

    :param attention_resolutions: comma-separated feature-map sizes, e.g. "16,8"
        (upstream convention: rate = image_size // size); "" means no attention.
        Sizes above image_size give rate 0, which never occurs (the published "1000").
    """
    if str(attention_resolutions).strip() == "":
        return ()
    try:
        sizes = [int(res) for res in str(attention_resolutions).split(",")]
    except ValueError:
        raise ValueError(
            f"--attention_resolutions {attention_resolutions!r}: expected integers like 16,8"
        )
    if min(sizes) <= 0:
        raise ValueError(f"--attention_resolutions {attention_resolutions!r} must be > 0")
    return tuple(image_size // size for size in sizes)


def _resolve_layout(unet_layout, paired, dims):
    """"auto" -> published3d for the paired 3D model, upstream otherwise."""
    if unet_layout == "auto":
        return "published3d" if paired and dims == 3 else "upstream"
    if unet_layout not in LAYOUTS:
        raise ValueError(
            f"--unet_layout {unet_layout!r}: expected 'auto' or one of {LAYOUTS}"
        )
    return unet_layout


def create_model_and_diffusion(
    image_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    channel_mult,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    use_new_attention_order,
    dims=2,
    in_channels=3,
    unet_layout="auto",
    predict_v=False,
    regression=False,
    sigma_small=False,
    x0_skip_sigma=0.0,
):
    """Build (UNetModel, SpacedDiffusion) from the model_and_diffusion_defaults() flags."""
    model = create_model(
        image_size,
        num_channels,
        num_res_blocks,
        channel_mult=channel_mult,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
        use_new_attention_order=use_new_attention_order,
        dims=dims,
        in_channels=in_channels,
        unet_layout=unet_layout,
    )
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        sigma_small=sigma_small,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        predict_v=predict_v,
        regression=regression,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
        x0_skip_sigma=x0_skip_sigma,
    )
    return model, diffusion


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
    dims=2,
    in_channels=3,
    unet_layout="auto",
):
    """
    Unconditional (or class-conditional) UNetModel.

    :param in_channels: image channels; the output has ``in_channels`` (eps) or
        ``2 * in_channels`` (eps, variance) channels with learn_sigma.
    :param dims: 2 (images) or 3 (volumes, tensors (B, C, Z, X, Y)).
    """
    return UNetModel(
        image_size=image_size,
        in_channels=in_channels,
        model_channels=num_channels,
        out_channels=in_channels * (2 if learn_sigma else 1),
        num_res_blocks=num_res_blocks,
        attention_resolutions=parse_attention_resolutions(attention_resolutions, image_size),
        dropout=dropout,
        channel_mult=parse_channel_mult(channel_mult, image_size, UPSTREAM_CHANNEL_MULT),
        dims=dims,
        num_classes=(NUM_CLASSES if class_cond else None),
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
        layout=_resolve_layout(unet_layout, paired=False, dims=dims),
    )


def sr_create_model_and_diffusion(
    large_size,
    small_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    use_new_attention_order=False,
    dims=3,
    in_channels=1,
    channel_mult="",
    unet_layout="auto",
    predict_residual=False,
    predict_v=False,
    regression=False,
    sigma_small=False,
    x0_skip_sigma=0.0,
):
    """Build (SuperResModel, SpacedDiffusion) from sr_model_and_diffusion_defaults() flags."""
    model = sr_create_model(
        large_size,
        small_size,
        num_channels,
        num_res_blocks,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
        use_new_attention_order=use_new_attention_order,
        dims=dims,
        in_channels=in_channels,
        channel_mult=channel_mult,
        unet_layout=unet_layout,
        predict_residual=predict_residual,
    )
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        sigma_small=sigma_small,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        predict_v=predict_v,
        regression=regression,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
        x0_skip_sigma=x0_skip_sigma,
    )
    return model, diffusion


def sr_create_model(
    large_size,
    small_size,
    num_channels,
    num_res_blocks,
    learn_sigma,
    class_cond,
    use_checkpoint,
    attention_resolutions,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    use_scale_shift_norm,
    dropout,
    resblock_updown,
    use_fp16,
    use_new_attention_order=False,
    dims=3,
    in_channels=1,
    channel_mult="",
    unet_layout="auto",
    predict_residual=False,
):
    """
    Paired-conditioning SuperResModel.

    :param large_size: nominal transaxial patch size (sets default channel_mult and
        attention rates); small_size is accepted for upstream compatibility and unused
        (paired denoising: low_res has the same shape as x).
    :param in_channels: image channels of x (and of low_res); the network input has
        ``2 * in_channels`` channels, the output ``in_channels`` or ``2 * in_channels``
        (learn_sigma).
    :param predict_residual: the network's first output channels are added to low_res (it
        learns the correction to the low-dose image; see ``SuperResModel``).
    """
    del small_size
    return SuperResModel(
        image_size=large_size,
        in_channels=in_channels,
        model_channels=num_channels,
        out_channels=in_channels * (2 if learn_sigma else 1),
        num_res_blocks=num_res_blocks,
        attention_resolutions=parse_attention_resolutions(attention_resolutions, large_size),
        dropout=dropout,
        channel_mult=parse_channel_mult(
            channel_mult, large_size, SR_CHANNEL_MULT, SR_FALLBACK_CHANNEL_MULT
        ),
        dims=dims,
        num_classes=(NUM_CLASSES if class_cond else None),
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
        layout=_resolve_layout(unet_layout, paired=True, dims=dims),
        predict_residual=predict_residual,
    )


def create_diffusion_from_flags(flags, timestep_respacing=None):
    """The diffusion described by a model's ``flags`` (the keys of :func:`diffusion_defaults`;
    missing ones take the defaults), respaced by ``timestep_respacing`` when given."""
    options = dict(diffusion_defaults())
    options.update({k: flags[k] for k in options if k in flags})
    if timestep_respacing is not None:
        options["timestep_respacing"] = timestep_respacing
    return create_gaussian_diffusion(steps=options.pop("diffusion_steps"), **options)


def create_gaussian_diffusion(
    *,
    steps=1000,
    learn_sigma=False,
    sigma_small=False,
    noise_schedule="linear",
    use_kl=False,
    predict_xstart=False,
    predict_v=False,
    regression=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
    timestep_respacing="",
    x0_skip_sigma=0.0,
):
    """A SpacedDiffusion over `steps` (respaced by `timestep_respacing`), as upstream.

    ``predict_v``: the model predicts v (``ModelMeanType.VELOCITY``); ``regression``: the
    supervised one-step baseline (:class:`~guided_diffusion.respace.RegressionDiffusion`: one
    step, x_0 prediction, ``steps`` and the respacing ignored); ``x0_skip_sigma``: see
    :class:`~guided_diffusion.gaussian_diffusion.GaussianDiffusion`.
    """
    if predict_v and (predict_xstart or regression):
        raise ValueError("predict_v excludes predict_xstart and regression")
    if regression:
        if learn_sigma:
            raise ValueError("regression (the supervised baseline) learns no variance")
        return RegressionDiffusion(betas=gd.get_named_beta_schedule(noise_schedule, 1),
                                   model_mean_type=gd.ModelMeanType.START_X,
                                   model_var_type=gd.ModelVarType.FIXED_SMALL,
                                   loss_type=gd.LossType.MSE, rescale_timesteps=rescale_timesteps)
    betas = gd.get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if not timestep_respacing:
        timestep_respacing = [steps]
    if learn_sigma:
        model_var_type = gd.ModelVarType.LEARNED_RANGE
    elif sigma_small:
        model_var_type = gd.ModelVarType.FIXED_SMALL
    else:
        model_var_type = gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing),
        betas=betas,
        model_mean_type=(
            gd.ModelMeanType.START_X if predict_xstart
            else gd.ModelMeanType.VELOCITY if predict_v else gd.ModelMeanType.EPSILON
        ),
        model_var_type=model_var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
        x0_skip_sigma=x0_skip_sigma,
    )


def add_dict_to_argparser(parser, default_dict):
    """Add ``--key`` (typed like its default; bools parsed by str2bool) per dict entry."""
    for k, v in default_dict.items():
        v_type = type(v)
        if v is None:
            v_type = str
        elif isinstance(v, bool):
            v_type = str2bool
        parser.add_argument(f"--{k}", default=v, type=v_type)


def args_to_dict(args, keys):
    """Pick `keys` from an argparse namespace into a dict."""
    return {k: getattr(args, k) for k in keys}


def str2bool(v):
    """Parse yes/no, true/false, t/f, y/n, 1/0 (any case) as a bool."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r}")


PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")


SAMPLING_PRECISION_HELP = ("network precision (auto: fp16 on CUDA for a use_fp16 checkpoint, bf16 on a "
                           "CPU, else fp32)")


def add_runtime_arguments(parser, seed_help="seed of every random draw", precision=True, device=False,
                          precision_help=SAMPLING_PRECISION_HELP):
    """The argument group every script shares, one default each: ``--seed`` (0), ``--threads``
    (torch CPU threads per process; default: the cores / MPI ranks), ``--precision`` (auto:
    fp16 on CUDA for a ``use_fp16`` checkpoint, bf16 on a CPU, else fp32) and, with ``device``,
    ``--device`` (default: cuda when available, else cpu)."""
    group = parser.add_argument_group("runtime")
    group.add_argument("--seed", type=int, default=0, help=seed_help)
    group.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads per process (default: the cores / MPI ranks)")
    if precision:
        group.add_argument("--precision", choices=PRECISION_CHOICES, default="auto", help=precision_help)
    if device:
        group.add_argument("--device", default=None,
                           help="torch device (default: cuda when available, else cpu)")
    return group


USER_ERRORS = (ValueError, FileNotFoundError, MemoryError)


def exit_on_user_error(main, errors=USER_ERRORS):
    """Run a script's ``main()`` and exit with its status; an error of ``errors`` (a problem with
    the user's input or settings) becomes one line ``error: ...`` on stderr and exit status 2."""
    import sys

    try:
        sys.exit(main())
    except errors as error:
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)


def runtime_device(args):
    """``--device`` as a torch.device (cuda when available without one)."""
    name = getattr(args, "device", None) or ("cuda" if th.cuda.is_available() else "cpu")
    return th.device(name)


def set_threads(threads, ranks=1):
    """``torch.set_num_threads(threads)``, or the cores / ``ranks`` when ``threads`` is None/0."""
    th.set_num_threads(int(threads) if threads else max(1, (os.cpu_count() or 1) // max(1, ranks)))


# ---------------------------------------------------------------------------------
# Checkpoint checks and flag inference from tensor shapes
# ---------------------------------------------------------------------------------

MAX_LISTED = 5


def _submodules(state_dict, prefix):
    """{block index: {sub index: [parameter names below it]}} for keys ``prefix.N.M.*``."""
    blocks = {}
    for key in state_dict:
        parts = key.split(".")
        if parts[0] == prefix and len(parts) >= 4:
            blocks.setdefault(int(parts[1]), {}).setdefault(int(parts[2]), []).append(
                ".".join(parts[3:])
            )
    return blocks


def _has_attention(subs):
    return any(any(n.startswith("qkv.") for n in names) for names in subs.values())


def _shapes(state_dict):
    """{key: shape}; ValueError for anything but a flat mapping of tensors."""
    for key, value in state_dict.items():
        if not th.is_tensor(value):
            raise ValueError(
                f"not a flat state_dict of tensors: key {key!r} holds {type(value).__name__}"
            )
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def _build_on_meta(flags, image_size):
    """Construct the model described by inferred `flags` without allocating memory."""
    flags = dict(flags)
    paired = flags.pop("paired")
    with th.device("meta"):
        if paired:
            return sr_create_model(
                image_size, image_size, flags["num_channels"], flags["num_res_blocks"],
                learn_sigma=flags["learn_sigma"], class_cond=flags["class_cond"],
                use_checkpoint=False, attention_resolutions=flags["attention_resolutions"],
                num_heads=1, num_head_channels=-1, num_heads_upsample=-1,
                use_scale_shift_norm=flags["use_scale_shift_norm"], dropout=0.0,
                resblock_updown=flags["resblock_updown"], use_fp16=False,
                dims=flags["dims"], in_channels=flags["in_channels"],
                channel_mult=flags["channel_mult"], unet_layout=flags["unet_layout"])
        return create_model(
            image_size, flags["num_channels"], flags["num_res_blocks"],
            channel_mult=flags["channel_mult"], learn_sigma=flags["learn_sigma"],
            class_cond=flags["class_cond"],
            attention_resolutions=flags["attention_resolutions"],
            use_scale_shift_norm=flags["use_scale_shift_norm"],
            resblock_updown=flags["resblock_updown"], dims=flags["dims"],
            in_channels=flags["in_channels"], unet_layout=flags["unet_layout"])


def _candidate_flags(state_dict, levels, num_res_blocks, image_size):
    """Flags for a UNet with `levels` levels of `num_res_blocks` blocks, read off shapes."""
    first_conv = state_dict["input_blocks.0.0.weight"]
    model_in, out_ch = first_conv.shape[1], state_dict["out.2.weight"].shape[0]
    num_channels = state_dict["time_embed.0.weight"].shape[1]
    layout = "upstream" if "middle_block.2.in_layers.0.weight" in state_dict else "published3d"
    encoder = _submodules(state_dict, "input_blocks")
    level_first = [1 + level * (num_res_blocks + 1) for level in range(levels)]
    widths = [state_dict[f"input_blocks.{b}.0.in_layers.2.weight"].shape[0] for b in level_first]
    mult = [w / num_channels for w in widths]
    attention_ds = sorted({
        2**level
        for level, first in enumerate(level_first)
        for b in range(first, first + num_res_blocks)
        if _has_attention(encoder.get(b, {}))
    })
    down_block = encoder.get(num_res_blocks + 1, {}) if levels > 1 else {}
    # Parameter counts of the I/O convs tell paired (2c in) from unconditional (c in).
    if out_ch == 2 * model_in:
        paired, in_channels, learn_sigma = False, model_in, True
    elif model_in == 2 * out_ch:
        paired, in_channels, learn_sigma = True, out_ch, False
    else:  # in == out: paired with learned sigma, or unconditional without (ambiguous)
        paired = layout == "published3d"
        in_channels = model_in // 2 if paired else model_in
        learn_sigma = paired
    emb = state_dict["input_blocks.1.0.emb_layers.1.weight"].shape[0]
    return dict(
        paired=paired,
        dims=first_conv.ndim - 2,
        in_channels=in_channels,
        num_channels=num_channels,
        num_res_blocks=num_res_blocks,
        channel_mult=",".join(f"{m:g}" for m in mult),
        learn_sigma=learn_sigma,
        use_scale_shift_norm=emb == 2 * widths[0],
        resblock_updown=any("in_layers" in n for names in down_block.values() for n in names),
        attention_resolutions=",".join(str(image_size // ds) for ds in attention_ds),
        class_cond="label_emb.weight" in state_dict,
        unet_layout=layout,
    )


def infer_flags_from_state_dict(state_dict, image_size=96):
    """
    Infer model flags from a UNet state_dict's key structure and tensor shapes.

    Each candidate split of the decoder into levels x (num_res_blocks + 1) blocks is
    built on the meta device and accepted only if its keys and shapes equal the
    checkpoint's. Attention head counts and the nominal image size do not show in the
    weights: attention_resolutions is expressed relative to `image_size`.

    :return: dict of flags (dims, in_channels, num_channels, num_res_blocks,
        channel_mult, learn_sigma, use_scale_shift_norm, resblock_updown,
        attention_resolutions, class_cond, unet_layout) and ``paired`` (True: use the
        sr_* path, the model input is [x_t, low_res]).
    :raises ValueError: if the state_dict is not a UNet of this family.
    """
    required = ("input_blocks.0.0.weight", "time_embed.0.weight", "out.2.weight",
                "input_blocks.1.0.emb_layers.1.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise ValueError(f"not a guided-diffusion UNet state_dict: no {', '.join(missing)}")
    target = _shapes(state_dict)
    decoder_blocks = max(_submodules(state_dict, "output_blocks"), default=-1) + 1
    for levels in range(1, decoder_blocks + 1):
        if decoder_blocks % levels or decoder_blocks // levels < 2:
            continue
        try:
            flags = _candidate_flags(state_dict, levels, decoder_blocks // levels - 1,
                                     image_size)
            candidate = _build_on_meta(flags, image_size)
        except (KeyError, ValueError, RuntimeError):
            continue
        if _shapes(candidate.state_dict()) == target:
            return flags
    raise ValueError(
        f"could not infer UNet flags: no level/res-block split of the {decoder_blocks} "
        f"decoder blocks reproduces the checkpoint's keys and shapes"
    )


def _format_flags(flags):
    return " ".join(
        f"--{k} {shlex.quote(str(v))}" for k, v in flags.items() if k != "paired"
    )


def describe_state_dict_mismatch(model, state_dict):
    """
    Explain why `state_dict` does not load into `model` with strict=True.

    :return: "" when keys and shapes match exactly; otherwise a multi-line description:
        the first few missing / unexpected keys, shape mismatches, and the flags
        inferred from the checkpoint's shapes.
    """
    expected = _shapes(model.state_dict())
    try:
        found = _shapes(state_dict)
    except ValueError as err:
        return str(err)
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [
        f"{k}: checkpoint {found[k]} vs model {expected[k]}"
        for k in expected
        if k in found and found[k] != expected[k]
    ]
    if not (missing or unexpected or mismatched):
        return ""
    lines = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched)):
        if items:
            shown = ", ".join(items[:MAX_LISTED])
            more = f" (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
            lines.append(f"{len(items)} {title}: {shown}{more}")
    if unexpected and all(k.startswith("module.") for k in unexpected):
        lines.append("hint: keys carry a 'module.' prefix (saved from DDP); strip it")
    try:
        flags = infer_flags_from_state_dict(state_dict)
        path = "sr_* (paired)" if flags["paired"] else "unconditional"
        lines.append(f"the checkpoint fits the {path} model with: {_format_flags(flags)}")
    except ValueError as err:
        lines.append(str(err))
    return "\n".join(lines)


def load_checkpoint_strict(model, state_dict, path):
    """
    Load `state_dict` into `model` requiring identical keys and shapes.

    :param path: the checkpoint file, named in the error message.
    :raises ValueError: naming `path`, the mismatching keys and the flags that fit.
    """
    problem = describe_state_dict_mismatch(model, state_dict)
    if problem:
        raise ValueError(f"checkpoint {path} does not fit the model:\n{problem}")
    model.load_state_dict(state_dict, strict=True)
    return model
