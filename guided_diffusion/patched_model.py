"""
Run a patch-sized network on whole volumes.

:class:`PatchedModel` wraps a model with the guided-diffusion signature ``model(x, t, **kwargs)``
so that the sampler runs on the whole volume ``(N, C, *volume_shape)`` (model layout, e.g.
``(1, 1, Z, X, Y)``): at every reverse step the volume is cut into the patches of a
:class:`~guided_diffusion.pet.patches.PatchGrid`, the network runs on groups of patches, and
the outputs (all channels: eps and the learned variance values) are blended with the grid's
weights into one whole-volume output. The volume follows a single trajectory, so there are no
seams: overlapping predictions are averaged at every step, not once at the end.

:func:`sample_independent_patches` is the comparison mode: every patch runs its own reverse
diffusion and the finished samples are stitched once (seams can appear where the independent
trajectories disagree).

Work split and communication
    Patch groups are fixed by ``batch_size`` alone (group ``g`` = patches
    ``[g * batch_size, (g + 1) * batch_size)``); rank ``r`` of ``world_size`` computes groups
    ``r, r + world_size, ...``. The per-patch outputs of all ranks are then exchanged and every
    rank blends all patches in patch order, so the result is bit-identical for every
    ``world_size`` (the network always sees the same batches, and the float64 sum runs in the
    same order). Halos are *not* implemented: full patch outputs are exchanged. Per step and per
    rank, about ``len(grid) * N * C_out * prod(patch_shape) * bytes`` are received (with the
    default gather, each rank's share is zero-padded to the largest share); with 2 output
    channels in float32 that is 8 bytes per patch voxel. Every rank must call the wrapper with
    the same ``x``, ``t`` and kwargs (same seeds), as the sampler does when all ranks run it.
"""

import torch
import torch.distributed as dist


def _is_spatial(value, grid):
    return (
        torch.is_tensor(value)
        and value.ndim == grid.ndim + 2
        and tuple(value.shape[2:]) == grid.volume_shape
    )


def _patch_batch(grid, volume, indices):
    """Patches ``indices`` of a ``(N, C, *volume_shape)`` tensor, concatenated on the batch axis."""
    return torch.cat([grid.extract(volume, i) for i in indices], dim=0)


def _split_model_kwargs(grid, model_kwargs, indices, batch):
    """Model kwargs for a group of patches.

    Spatial tensors (``(N, C', *volume_shape)``, e.g. ``low_res``) are cut like ``x``; other
    tensors whose first axis is the batch ``N`` (e.g. class labels) are repeated once per patch;
    anything else is passed unchanged.
    """
    split = {}
    for key, value in model_kwargs.items():
        if _is_spatial(value, grid):
            split[key] = _patch_batch(grid, value, indices)
        elif torch.is_tensor(value) and value.ndim >= 1 and value.shape[0] == batch:
            split[key] = value.repeat(len(indices), *([1] * (value.ndim - 1)))
        else:
            split[key] = value
    return split


class PatchedModel:
    """Callable with the model signature that blends patch-wise predictions seam-free.

    :param model: network ``model(x, t, **kwargs)`` accepting patches ``(n, C, *patch_shape)``.
    :param grid: :class:`~guided_diffusion.pet.patches.PatchGrid` over the volume's spatial shape.
    :param batch_size: patches per network call (fixes the groups; see module docstring).
    :param rank: this process's rank; ``world_size``: number of ranks sharing the work.
    :param gather_fn: ``gather_fn(local) -> iterable of dicts``, where ``local`` maps patch index
        to output ``(N, C_out, *patch_shape)`` for this rank and the result holds every rank's
        dict. Default when ``world_size > 1``: :func:`torch.distributed.all_gather` on an
        initialised process group (tensors on ``x``'s device, cast to ``x.dtype``).
    """

    def __init__(self, model, grid, batch_size=1, rank=0, world_size=1, gather_fn=None):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if int(world_size) > 1 and gather_fn is None and not (
            dist.is_available() and dist.is_initialized()
        ):
            raise ValueError(
                "world_size > 1 needs a gather_fn or an initialised torch.distributed group "
                "(call dist_util.setup_dist() first)"
            )
        self.model = model
        self.grid = grid
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.gather_fn = gather_fn
        indices = list(range(len(grid)))
        self.groups = [indices[g:g + self.batch_size] for g in range(0, len(indices), self.batch_size)]

    def patches_of_rank(self, rank):
        """Patch indices computed by ``rank``, in increasing order."""
        return [i for group in self.groups[rank::self.world_size] for i in group]

    def compute_local(self, x, t, **model_kwargs):
        """This rank's share: ``{patch_index: output (N, C_out, *patch_shape)}``."""
        if not _is_spatial(x, self.grid):
            raise ValueError(
                f"x has shape {tuple(x.shape)}; expected (N, C, *{self.grid.volume_shape})"
            )
        batch = x.shape[0]
        local = {}
        for group in self.groups[self.rank::self.world_size]:
            out = self.model(
                _patch_batch(self.grid, x, group),
                t.repeat(len(group)),
                **_split_model_kwargs(self.grid, model_kwargs, group, batch),
            )
            for k, patch_index in enumerate(group):
                local[patch_index] = out[k * batch:(k + 1) * batch]
        return local

    def blend(self, outputs):
        """Blend ``{patch_index: output}`` covering every patch into ``(N, C_out, *volume_shape)``."""
        missing = set(range(len(self.grid))) - set(outputs)
        if missing:
            raise ValueError(f"patch outputs missing for patches {sorted(missing)}")
        return self.grid.stitch([outputs[i] for i in range(len(self.grid))])

    def __call__(self, x, t, **model_kwargs):
        local = self.compute_local(x, t, **model_kwargs)
        if self.world_size == 1:
            return self.blend(local)
        shares = self.gather_fn(local) if self.gather_fn is not None else self._all_gather(local, x)
        merged = {}
        for share in shares:
            for patch_index, output in share.items():
                if patch_index in merged:
                    raise ValueError(f"gather_fn returned patch {patch_index} more than once")
                merged[patch_index] = output.to(x.device)
        return self.blend(merged)

    def _all_gather(self, local, x):
        """Exchange every rank's patch outputs with ``torch.distributed.all_gather``."""
        some_output = next(iter(local.values()), None)
        channels = torch.tensor([0 if some_output is None else some_output.shape[1]], device=x.device)
        dist.all_reduce(channels, op=dist.ReduceOp.MAX)  # ranks without patches learn C_out
        item_shape = (x.shape[0], int(channels.item())) + self.grid.patch_shape
        shares = [self.patches_of_rank(r) for r in range(self.world_size)]
        capacity = max(len(share) for share in shares)
        send = torch.zeros((capacity,) + item_shape, dtype=x.dtype, device=x.device)
        for k, patch_index in enumerate(shares[self.rank]):
            send[k] = local[patch_index]
        received = [torch.empty_like(send) for _ in range(self.world_size)]
        dist.all_gather(received, send)
        return [
            {patch_index: received[r][k] for k, patch_index in enumerate(share)}
            for r, share in enumerate(shares)
        ]


def sample_patches_independently(diffusion, model, grid, noise, indices, *, model_kwargs=None,
                                 use_ddim=False, **sample_kwargs):
    """Comparison mode: one reverse diffusion per patch, for the patches ``indices``.

    :param diffusion: a ``GaussianDiffusion`` (or ``SpacedDiffusion``); its ``p_sample_loop``
        (or ``ddim_sample_loop`` with ``use_ddim``) runs on each patch in turn.
    :param model: the patch-sized network.
    :param grid: the :class:`~guided_diffusion.pet.patches.PatchGrid`.
    :param noise: whole-volume start noise ``(N, C, *volume_shape)``; patch ``i`` starts from
        its cut-out, so the two modes can be compared from the same ``x_T``.
    :param indices: the patches to sample (e.g. one rank's share).
    :param model_kwargs: whole-volume kwargs, cut per patch like :class:`PatchedModel` does.
    :param sample_kwargs: passed to the sampling loop (``clip_denoised``, ``progress``,
        ``generator``, ...). A ``step_hook`` that acts on whole volumes does not fit this mode.
    :return: ``{patch_index: sample (N, C, *patch_shape)}``; stitch them with ``grid.stitch``.
    """
    if not _is_spatial(noise, grid):
        raise ValueError(
            f"noise has shape {tuple(noise.shape)}; expected (N, C, *{grid.volume_shape})"
        )
    loop = diffusion.ddim_sample_loop if use_ddim else diffusion.p_sample_loop
    samples = {}
    for i in indices:
        patch_noise = grid.extract(noise, i).contiguous()
        samples[i] = loop(
            model,
            tuple(patch_noise.shape),
            noise=patch_noise,
            model_kwargs=_split_model_kwargs(grid, model_kwargs or {}, [i], noise.shape[0]),
            **sample_kwargs,
        )
    return samples


def sample_independent_patches(diffusion, model, grid, noise, **kwargs):
    """All patches of :func:`sample_patches_independently`, stitched once at the end (seams can
    appear where the independent trajectories disagree). Returns ``(N, C, *volume_shape)``."""
    samples = sample_patches_independently(diffusion, model, grid, noise, range(len(grid)), **kwargs)
    return grid.stitch([samples[i] for i in range(len(grid))])
