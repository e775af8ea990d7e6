"""
Denoise whole PET volumes with a patch-trained diffusion model.

:class:`VolumeDenoiser` takes a low-dose volume ``(X, Y, Z)`` in SUV on any grid and returns the
denoised volume on the same grid, running the stages of this package in order:

1. the input transforms (:mod:`.transforms`): negatives to 0, resampling to the model's voxel
   size, transaxial padding, SUV -> model space ``(1, 1, Z, X, Y)``;
2. the reverse diffusion on the whole volume: a :class:`~.distributed.PatchedModel` blends
   overlapping patch predictions at every step (seam-free), or, for comparison, every patch
   runs its own chain and the samples are stitched at the end (``stitch="independent"``);
   ``paired`` feeds the low-dose volume as the model's ``low_res`` channel, a
   ``guidance_factory`` adds the per-step hook (:mod:`.guidance`), ``start_t`` starts from the
   diffused low-dose volume instead of pure noise;
3. the inverse transforms back to SUV on the input grid;
4. the post-processing steps (:mod:`.postprocess`) on each member;
5. the ensemble mean and, for two or more members, the voxel-wise standard deviation.

Every ensemble member has its own seed and a ``torch.Generator`` that makes every random draw
(start noise, per-step noise, guidance noise), so a member's result does not depend on the
number of ranks: in seam-free mode each rank samples its box of the volume, exchanging only the
overlap regions of the network outputs with the other ranks, and draws its part of the whole
volume's noise.
"""

import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .. import fp16_util
from ..normalisation import null_condition_like, saturation_suv
from ..pet import volumes
from .distributed import PatchedModel, SlicedNoise, sample_patches_independently, whole_volume_hook
from .patches import PatchGrid
from .postprocess import Member, default_steps
from .transforms import model_input_transforms
from .uncertainty import ensemble_std

STITCH_MODES = ("seamfree", "independent")


@dataclass
class SamplingSettings:
    """How a volume is sampled.

    :param use_ddim: DDIM (``eta``) instead of ancestral sampling.
    :param patch_z: axial slab depth in voxels (model grid); ``None``: the checkpoint's
        training patch depth.
    :param overlap: overlap between neighbouring patches in voxels (Z, X, Y or scalar).
    :param max_patch_voxels: tile the transaxial plane too when a slab exceeds this many voxels.
    :param batch_size: patches per network call.
    :param stitch: ``"seamfree"`` (blend every step) or ``"independent"`` (blend once at the end).
    :param start_t: start the chain at this (respaced) step index from ``q_sample(low_dose)``.
    :param precision: ``"fp32"``, ``"bf16"``, ``"fp16"`` (CUDA) for the network.
    :param progress: tqdm bar for the reverse steps (rank 0).
    :param hot_voxels: where the low-dose input approaches the top of the model's SUV range
        (the normalisation's ``clip``): ``"rescale"`` (a second pass on the input scaled into
        range, hooks included), ``"input"`` (take the input) or
        ``"clip"`` (keep the saturated output); see :mod:`guided_diffusion.sampling.hot_voxels`.
    :param fusion_kappa: fuse each member with the input where it departs from it by more
        than ``fusion_kappa`` times the input's estimated noise variance
        (:func:`guided_diffusion.sampling.fusion.fuse_with_input`); ``None``: off.
    :param null_condition: feed a paired model the null condition (an empty volume) instead of
        the low-dose volume: a checkpoint trained with conditioning dropout
        (``cond_dropout`` in its metadata) then acts as an unconditional prior (BC-DPM).
    :param flips: axes among ``"zxy"`` whose mirror images the network also sees: every
        evaluation is the mean over all ``2 ** len(flips)`` combinations of flips of its inputs,
        each output flipped back (test-time augmentation; ``""``: one evaluation).
    :param std_fwhm_mm: an ensemble's variance is pooled over a Gaussian of this FWHM (mm)
        before its square root is the uncertainty map (:mod:`.uncertainty`; 0: none).
    """

    use_ddim: bool = False
    eta: float = 0.0
    clip_denoised: bool = True
    patch_z: int = None
    overlap: int = 8
    max_patch_voxels: int = None
    batch_size: int = 1
    stitch: str = "seamfree"
    start_t: int = None
    precision: str = "fp32"
    progress: bool = True
    hot_voxels: str = "rescale"
    fusion_kappa: float = None
    null_condition: bool = False
    flips: str = ""
    std_fwhm_mm: float = 0.0


def serves_as_prior(metadata):
    """Whether a checkpoint can be BC-DPM's prior: unconditional, or paired and trained with
    conditioning dropout (it then gets the null condition, see :func:`is_null_conditioned_prior`)."""
    return metadata["cond"] == "none" or bool(metadata.get("cond_dropout"))


def is_null_conditioned_prior(metadata, mode):
    """Whether ``mode`` (``"paired"``, ``"bcdpm"``, ``"hybrid"``) uses this checkpoint as a prior
    fed the null condition: a paired checkpoint in ``bcdpm`` mode."""
    return mode == "bcdpm" and metadata["cond"] == "paired"


def member_network_evaluations(info):
    """Network evaluations of one ensemble member (its ``info`` from :meth:`VolumeDenoiser.denoise`),
    the hot-voxel rescale pass included."""
    return (info["network_evaluations_per_patch"] * info["patches"]
            + info.get("hot_voxels", {}).get("network_evaluations", 0))


def member_seed(seed, name, member):
    """Deterministic 63-bit seed for ensemble member ``member`` of the input called ``name``."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode()) * 7919 + int(member)) % (2**63 - 1)


FLIP_AXES = "zxy"


def flip_combinations(flips):
    """Every subset of the axes named in ``flips`` (letters of :data:`FLIP_AXES`, each at most
    once), as tuples of tensor dimensions of a ``(B, C, Z, X, Y)`` tensor, the empty one first."""
    if set(flips) - set(FLIP_AXES) or len(set(flips)) != len(flips):
        raise ValueError(f"flips must name distinct axes among {FLIP_AXES!r}, got {flips!r}")
    dims = [2 + FLIP_AXES.index(axis) for axis in flips]
    return [tuple(d for i, d in enumerate(dims) if mask >> i & 1) for mask in range(2 ** len(dims))]


class _PrecisionModel:
    """The network under autocast (bf16/fp16) and channels-last 3D; output back in float32.

    A 2D network (``model.dims == 2``) denoises a slab ``(B, C, Z, X, Y)`` slice by slice: its
    axial slices become a batch ``(B * Z, C, X, Y)`` (the slice-wise path of a 2D prior).
    ``flips`` (see :class:`SamplingSettings`) averages the outputs over mirrored inputs."""

    def __init__(self, model, precision, flips=""):
        self.model = model
        self.precision = precision
        self.flip_sets = flip_combinations(flips)
        self.device = next(model.parameters()).device
        if precision != "fp32" and getattr(model, "dims", 2) == 3:
            model.to(memory_format=torch.channels_last_3d)

    def __call__(self, x, t, **kwargs):
        if len(self.flip_sets) == 1:
            return self._evaluate(x, t, **kwargs)
        if x.ndim != 5:
            raise ValueError(f"flips need (B, C, Z, X, Y) inputs, got shape {tuple(x.shape)}")
        total = 0.0
        for dims in self.flip_sets:
            mirrored = {k: v.flip(dims) if torch.is_tensor(v) and v.ndim == 5 else v
                        for k, v in kwargs.items()}
            total = total + self._evaluate(x.flip(dims), t, **mirrored).flip(dims)
        return total / len(self.flip_sets)

    def _evaluate(self, x, t, **kwargs):
        slice_wise = getattr(self.model, "dims", 2) == 2 and x.ndim == 5
        if slice_wise:
            batch, channels, depth = x.shape[:3]
            x = x.transpose(1, 2).reshape(batch * depth, channels, *x.shape[3:])
            t = t.repeat_interleave(depth)
        with torch.no_grad(), fp16_util.autocast(self.device, self.precision):
            out = self.model(x, t, **kwargs).float()
        if slice_wise:
            out = out.reshape(batch, depth, -1, *out.shape[2:]).transpose(1, 2)
        return out


class VolumeDenoiser:
    """Denoise volumes with one model and diffusion (see module docstring).

    :param model: the UNet (``SuperResModel`` for ``paired``), on its device, in eval mode.
    :param diffusion: a (spaced) ``GaussianDiffusion``.
    :param metadata: checkpoint metadata (``normalisation``, ``voxel_mm``, ``patch_size_zxy``,
        ``cond``), see :mod:`guided_diffusion.checkpoints`.
    :param settings: :class:`SamplingSettings`.
    :param guidance_factory: optional ``factory(y0, diffusion, generator, prepared)`` returning
        a sampler ``step_hook`` (:mod:`.guidance`, e.g. BC-DPM's block) for one member; ``y0``
        is the low-dose volume in model space ``(1, 1, Z, X, Y)``. The hot-voxel rescale pass
        calls it on ``y0 / k``: a factory must derive its activity-to-counts scale from ``y0``
        at a fixed count level (as :class:`~.guidance.LowDoseAcquisition` does), so that the
        scaled pass simulates the same acquisition.
    :param post_steps: the post-processing steps (:mod:`.postprocess`); default: from the
        settings' ``hot_voxels`` and ``fusion_kappa``.
    :param estimate: optional one-member :class:`VolumeDenoiser` whose output is an ensemble's
        image (a posterior sampler's posterior-mean estimate); without it the image is the
        members' mean.
    :param rank, world_size: this process's share of the network evaluations.
    """

    def __init__(self, model, diffusion, metadata, settings, *, guidance_factory=None,
                 post_steps=None, estimate=None, rank=0, world_size=1):
        if settings.stitch not in STITCH_MODES:
            raise ValueError(f"stitch must be one of {STITCH_MODES}, got {settings.stitch!r}")
        if settings.stitch == "independent" and guidance_factory is not None:
            raise ValueError("the physics guidance (BC-DPM, data consistency) acts on whole "
                             "volumes: use stitch='seamfree'")
        self.model = model
        self.network = _PrecisionModel(model, settings.precision, settings.flips)
        self.diffusion = diffusion
        self.metadata = metadata
        self.settings = settings
        self.guidance_factory = guidance_factory
        self.estimate = estimate
        self.rank = rank
        self.world_size = world_size
        self.paired = metadata["cond"] == "paired"
        if settings.null_condition and not (self.paired and serves_as_prior(metadata)):
            raise ValueError("null_condition needs a paired checkpoint trained with conditioning "
                             "dropout (cond_dropout > 0 in its metadata)")
        self.normalisation = metadata["normalisation"]
        self.voxel_mm = np.broadcast_to(np.asarray(metadata["voxel_mm"], dtype=float), (3,))
        self.multiple = 2 ** (len(model.channel_mult) - 1)
        self.device = self.network.device
        self.transforms = model_input_transforms(self.normalisation, self.voxel_mm, self.multiple,
                                                 self.device)
        if post_steps is None:
            post_steps = default_steps(settings.hot_voxels,
                                       saturation_suv(self.normalisation),
                                       settings.fusion_kappa)
        self.post_steps = list(post_steps)

    # ------------------------------------------------------------------ grid and space changes

    def prepare(self, suv, affine):
        """Low-dose SUV volume ``(X, Y, Z)`` -> the transforms' record, with the model-space
        tensor ``y0`` ``(1, 1, Z, X', Y')`` (see :mod:`.transforms`)."""
        return self.transforms.forward(suv, affine)

    def finish(self, sample, prepared):
        """Model-space sample ``(1, 1, Z, X', Y')`` -> SUV ``(X, Y, Z)`` on the input grid."""
        return self.transforms.inverse(sample, prepared)

    def grid_for(self, prepared):
        """The patch grid over the padded model-space volume ``(Z, X', Y')``."""
        shape = tuple(prepared["y0"].shape[2:])
        patch_z = self.settings.patch_z or int(self.metadata.get("patch_size_zxy", [96])[0])
        return PatchGrid(shape, (patch_z, None, None), self.settings.overlap,
                         max_patch_voxels=self.settings.max_patch_voxels,
                         transaxial_multiple=self.multiple)

    # ------------------------------------------------------------------ sampling

    def sample(self, prepared, seed):
        """One ensemble member: a model-space sample ``(1, 1, Z, X', Y')``.

        :param seed: the member's seed (see :func:`member_seed`).
        :return: ``(sample, info)`` with the number of network evaluations and seconds.
        """
        settings = self.settings
        y0 = prepared["y0"]
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        grid = self.grid_for(prepared)
        noise = torch.randn(y0.shape, generator=generator).to(self.device)
        start_t = settings.start_t
        if start_t is not None:
            noise = diffused_start(self.diffusion, y0, start_t, noise)
        model_kwargs = {}
        if self.paired:
            model_kwargs["low_res"] = (null_condition_like(y0, self.normalisation)
                                       if settings.null_condition else y0)
        hook = None
        if self.guidance_factory is not None:
            hook = self.guidance_factory(y0, self.diffusion, generator, prepared)
        loop_kwargs = dict(
            noise=noise, clip_denoised=settings.clip_denoised, model_kwargs=model_kwargs,
            progress=settings.progress and self.rank == 0, generator=generator,
            start_t=start_t, step_hook=hook,
        )
        if settings.use_ddim:
            loop_kwargs["eta"] = settings.eta
        steps = self.diffusion.num_timesteps if start_t is None else start_t + 1
        begin = time.perf_counter()
        exchange = {}
        if settings.stitch == "seamfree":
            patched = PatchedModel(self.network, grid, settings.batch_size, self.rank,
                                   self.world_size)
            sample = self._sample_seamfree(patched, loop_kwargs)
            sent, received = patched.decomposition.halo_voxels(self.rank)
            exchange = dict(box_zxy=list(patched.local_shape), halo_voxels_sent_per_step=sent,
                            halo_voxels_received_per_step=received)
        else:
            sample = self._sample_independent(grid, loop_kwargs)
        info = dict(network_evaluations_per_patch=steps * len(self.network.flip_sets), patches=len(grid),
                    seconds=time.perf_counter() - begin, **exchange)
        return sample, info

    def _sample_seamfree(self, patched, loop_kwargs):
        """One trajectory for the whole volume; each rank holds its box of patches and the
        ranks exchange only the overlap regions (see :mod:`guided_diffusion.sampling.distributed`)."""
        noise = loop_kwargs["noise"]
        hook = loop_kwargs["step_hook"]
        loop_kwargs.update(
            noise=patched.local(noise).contiguous(),
            model_kwargs={k: patched.local(v) for k, v in loop_kwargs["model_kwargs"].items()},
            generator=SlicedNoise(loop_kwargs["generator"], noise.shape[:2], patched),
            step_hook=None if hook is None else whole_volume_hook(hook, patched),
        )
        loop = self.diffusion.ddim_sample_loop if self.settings.use_ddim else self.diffusion.p_sample_loop
        return patched.gather(loop(patched, tuple(loop_kwargs["noise"].shape), **loop_kwargs))

    def _sample_independent(self, grid, loop_kwargs):
        """Independent chains per patch, patches split over ranks, stitched once."""
        noise = loop_kwargs.pop("noise")
        loop_kwargs.pop("step_hook")
        start_t = loop_kwargs.pop("start_t")
        generator = loop_kwargs.pop("generator")
        mine = list(range(self.rank, len(grid), self.world_size))
        samples = {}
        for i in mine:
            # one generator per patch, so a patch's chain does not depend on the rank layout
            patch_generator = torch.Generator(device="cpu").manual_seed(
                (generator.initial_seed() * 131 + i) % (2**63 - 1))
            samples.update(sample_patches_independently(
                self.diffusion, self.network, grid, noise, [i], use_ddim=self.settings.use_ddim,
                generator=patch_generator, start_t=start_t, **loop_kwargs))
        if self.world_size > 1:
            shares = [None] * self.world_size
            dist.all_gather_object(shares, {i: s.cpu() for i, s in samples.items()})
            samples = {i: s.to(self.device) for share in shares for i, s in share.items()}
        return grid.stitch([samples[i] for i in range(len(grid))])

    def sample_suv(self, prepared, seed):
        """:meth:`sample` then :meth:`finish`: ``(SUV volume (X, Y, Z), info)``."""
        sample, info = self.sample(prepared, seed)
        return self.finish(sample, prepared), info

    def denoise(self, suv, affine, seeds, on_member=None, skip=None):
        """Run the ensemble on one volume.

        :param suv, affine: low-dose volume ``(X, Y, Z)`` in SUV and its 4x4 affine (mm).
        :param seeds: one seed per ensemble member.
        :param on_member: optional ``callback(member, suv_volume, info)`` after each member
            (used to save finished members, so an interrupted run can resume).
        :param skip: optional ``{member: suv_volume}`` of members already done (not re-run).
        :return: ``(image, std, members, infos)``: SUV volumes ``(X, Y, Z)`` on the input grid;
            ``image`` is the members' mean, or for two or more members with an ``estimate``
            denoiser its output (seeded by the first seed; ``infos["image"]`` says which and
            ``infos["estimate"]`` holds its info); ``std`` is the voxel-wise ensemble standard
            deviation, ``None`` for one member.
        """
        prepared = self.prepare(suv, affine)
        low_dose = np.clip(np.asarray(suv, dtype=np.float32), 0.0, None)
        members, infos = [], []
        for k, seed in enumerate(seeds):
            if skip and k in skip:
                members.append(np.asarray(skip[k], dtype=np.float32))
                infos.append(dict(member=k, seed=int(seed), resumed=True))
                continue
            volume, info = self.sample_suv(prepared, seed)
            member = Member(low_dose=low_dose, affine=affine, seed=seed,
                            denoise=lambda other, seed=seed: self.sample_suv(
                                self.prepare(other, affine), seed))
            for step in self.post_steps:
                volume, info[step.name] = step(volume, member)
            info = dict(info, member=k, seed=int(seed))
            if on_member is not None:
                on_member(k, volume, info)
            members.append(volume)
            infos.append(info)
        stack = np.stack(members)
        std = (ensemble_std(stack, volumes.voxel_sizes(affine), self.settings.std_fwhm_mm)
               if len(members) > 1 else None)
        if self.estimate is not None and len(members) > 1:
            image, _, _, estimate = self.estimate.denoise(suv, affine, seeds[:1])
            source = {"image": "one-member estimate", "estimate": estimate["members"][0]}
        else:
            image, source = stack.mean(axis=0).astype(np.float32), {"image": "members' mean"}
        return image, std, members, dict(members=infos, negative_fraction=prepared["negative_fraction"],
                                         resampled=prepared["resampled"],
                                         model_shape_zxy=list(prepared["y0"].shape[2:]), **source)


def diffused_start(diffusion, y0, start_t, noise):
    """``q_sample(y0, start_t)`` with the given standard normal ``noise``: where a chain that
    starts at (respaced) step ``start_t`` from the diffused low-dose input begins."""
    if not 0 <= start_t < diffusion.num_timesteps:
        raise ValueError(f"start_t={start_t} outside [0, {diffusion.num_timesteps})")
    t = torch.full((y0.shape[0],), start_t, device=y0.device, dtype=torch.long)
    return diffusion.q_sample(y0, t, noise=noise)
