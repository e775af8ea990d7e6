"""
Run a patch-sized network on whole volumes, with the volume split into per-rank boxes.

:class:`PatchedModel` wraps a model with the guided-diffusion signature ``model(x, t, **kwargs)``
so that the sampler runs on a volume ``(N, C, *volume_shape)`` (model layout, e.g.
``(1, 1, Z, X, Y)``) cut into the patches of a :class:`~guided_diffusion.sampling.patches.PatchGrid`:
at every reverse step the network runs on groups of patches and the outputs (all channels: eps
and the learned variance values) are blended with the grid's weights. The volume follows a
single trajectory, so there are no seams: overlapping predictions are averaged at every step,
not once at the end.

Domain decomposition and halo exchange
    Patch groups are fixed by ``batch_size`` alone (group ``g`` = patches
    ``[g * batch_size, (g + 1) * batch_size)``), and rank ``r`` of ``world_size`` owns a
    contiguous block of groups. Its *box* is the bounding box of its patches; the sampler on
    that rank holds only the box (``x`` of shape ``(N, C, *local_shape)``; :meth:`local` cuts it
    from a whole-volume tensor). After its own network calls, a rank sends to every other rank
    the parts of its patch outputs that fall inside that rank's box (the overlap regions, or
    halos) and receives the parts of the other ranks' patches inside its own box; it then
    blends every patch that meets its box, in patch order, in float64. With axial slabs, a
    rank exchanges with its two neighbours only about ``overlap`` slices per neighbour and per
    step, instead of whole patches. The reverse-diffusion update is voxel-wise, so voxels
    that two boxes share are computed identically on both ranks and need no exchange; the
    per-step noise comes from :class:`SlicedNoise` (the whole volume's noise, this rank's
    part). Results are therefore bit-identical for every ``world_size``: the network sees the
    same batches and every voxel's blend sums the same patches in the same order.
    Operations on the whole volume (BC-DPM's block, data consistency) gather it with
    :meth:`PatchedModel.gather` only at the steps where they act (:func:`whole_volume_hook`).

:func:`sample_independent_patches` is the comparison mode: every patch runs its own reverse
diffusion and the finished samples are stitched once (seams can appear where the independent
trajectories disagree).
"""

import torch
import torch.distributed as dist


def _is_spatial(value, shape):
    return torch.is_tensor(value) and value.ndim == len(shape) + 2 and tuple(value.shape[2:]) == shape


def _shifted(box, origin):
    """``box`` (volume coordinates) relative to ``origin``."""
    return tuple(slice(s.start - o, s.stop - o) for s, o in zip(box, origin))


def _patch_batch(volume, patch_slices):
    """The patches ``patch_slices`` of a ``(N, C, *shape)`` tensor, concatenated on the batch axis."""
    return torch.cat([volume[(Ellipsis,) + s] for s in patch_slices], dim=0)


def _split_model_kwargs(model_kwargs, shape, patch_slices, batch):
    """Model kwargs for a group of patches.

    Spatial tensors (``(N, C', *shape)``, e.g. ``low_res``) are cut like ``x``; other tensors
    whose first axis is the batch ``N`` (e.g. class labels) are repeated once per patch;
    anything else is passed unchanged.
    """
    split = {}
    for key, value in model_kwargs.items():
        if _is_spatial(value, shape):
            split[key] = _patch_batch(value, patch_slices)
        elif torch.is_tensor(value) and value.ndim >= 1 and value.shape[0] == batch:
            split[key] = value.repeat(len(patch_slices), *([1] * (value.ndim - 1)))
        else:
            split[key] = value
    return split


class BoxDecomposition:
    """Which patches, box and halos belong to each rank (pure bookkeeping, no communication).

    :param grid: the :class:`~guided_diffusion.sampling.patches.PatchGrid`.
    :param batch_size: patches per network call; group ``g`` = patches
        ``[g * batch_size, (g + 1) * batch_size)``, and each rank owns a contiguous block of
        groups, the first ranks the larger blocks (ranks beyond the number of groups own none and
        get an empty box).
    :param world_size: number of ranks.
    """

    def __init__(self, grid, batch_size, world_size):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(world_size) < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.grid = grid
        self.world_size = int(world_size)
        indices = list(range(len(grid)))
        groups = [indices[g:g + int(batch_size)] for g in range(0, len(indices), int(batch_size))]
        bounds = [-(-r * len(groups) // self.world_size) for r in range(self.world_size + 1)]
        self.groups_of_rank = [groups[bounds[r]:bounds[r + 1]] for r in range(self.world_size)]
        self.boxes = [self._bounding_box(r) for r in range(self.world_size)]

    def patches_of_rank(self, rank):
        """Patch indices computed by ``rank``, in increasing order."""
        return [i for group in self.groups_of_rank[rank] for i in group]

    def _bounding_box(self, rank):
        """Smallest box holding ``rank``'s patches (an empty box for a rank without patches)."""
        patches = [self.grid.patches[i] for i in self.patches_of_rank(rank)]
        if not patches:
            return tuple(slice(0, 0) for _ in self.grid.volume_shape)
        return tuple(slice(min(p[a].start for p in patches), max(p[a].stop for p in patches))
                     for a in range(self.grid.ndim))

    def covering(self, rank):
        """Patches that meet ``rank``'s box, in patch order (the ones its blend sums)."""
        box = self.boxes[rank]
        return [i for i in range(len(self.grid)) if self.grid.overlap_region(i, box) is not None]

    def _pieces(self, patches, box):
        pieces = [(i, self.grid.overlap_region(i, box)) for i in patches]
        return [(i, region) for i, region in pieces if region is not None]

    def sends(self, rank):
        """``{other_rank: [(patch, region), ...]}``: parts of ``rank``'s patches inside the
        other ranks' boxes (regions in volume coordinates, patches in increasing order)."""
        plan = {other: self._pieces(self.patches_of_rank(rank), self.boxes[other])
                for other in range(self.world_size) if other != rank}
        return {other: pieces for other, pieces in plan.items() if pieces}

    def receives(self, rank):
        """``{other_rank: [(patch, region), ...]}``: parts of the other ranks' patches inside
        ``rank``'s box."""
        plan = {other: self._pieces(self.patches_of_rank(other), self.boxes[rank])
                for other in range(self.world_size) if other != rank}
        return {other: pieces for other, pieces in plan.items() if pieces}

    def halo_voxels(self, rank):
        """Voxels (per batch item and channel) ``rank`` sends and receives per network call."""
        def count(plan):
            return sum(torch.Size([s.stop - s.start for s in region]).numel()
                       for pieces in plan.values() for _, region in pieces)
        return count(self.sends(rank)), count(self.receives(rank))


class PatchedModel:
    """Callable with the model signature that blends patch-wise predictions seam-free on this
    rank's box (see the module docstring).

    :param model: network ``model(x, t, **kwargs)`` accepting patches ``(n, C, *patch_shape)``.
    :param grid: :class:`~guided_diffusion.sampling.patches.PatchGrid` over the volume's spatial shape.
    :param batch_size: patches per network call (fixes the groups, see :class:`BoxDecomposition`).
    :param rank: this process's rank; ``world_size``: number of ranks sharing the volume. With
        ``world_size > 1`` an initialised :mod:`torch.distributed` group is needed, and every
        rank must call the wrapper at the same steps (as the sampler does when all ranks run it).
    """

    def __init__(self, model, grid, batch_size=1, rank=0, world_size=1):
        if not 0 <= int(rank) < int(world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if int(world_size) > 1 and not (dist.is_available() and dist.is_initialized()):
            raise ValueError("world_size > 1 needs an initialised torch.distributed group "
                             "(call dist_util.setup_dist() first)")
        self.model = model
        self.grid = grid
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.decomposition = BoxDecomposition(grid, batch_size, world_size)
        self.groups = self.decomposition.groups_of_rank[self.rank]
        self.box = self.decomposition.boxes[self.rank]
        self.origin = tuple(s.start for s in self.box)
        self.local_shape = tuple(s.stop - s.start for s in self.box)
        self.covering = self.decomposition.covering(self.rank)
        self.sends = self.decomposition.sends(self.rank)
        self.receives = self.decomposition.receives(self.rank)
        self._out_channels = None

    # ------------------------------------------------------------------ whole volume <-> box

    def local(self, volume):
        """This rank's box of a whole-volume tensor ``(..., *volume_shape)`` (a view)."""
        return volume[(Ellipsis,) + self.box]

    def gather(self, local):
        """Whole volume ``(..., *volume_shape)`` from every rank's box ``(..., *local_shape)``,
        on every rank (voxels shared by two boxes hold equal values on both)."""
        if self.world_size == 1:
            return local
        lead = tuple(local.shape[:local.ndim - self.grid.ndim])
        boxes = self.decomposition.boxes
        sizes = [torch.Size(lead + tuple(s.stop - s.start for s in box)).numel() for box in boxes]
        send = torch.zeros(max(sizes), dtype=local.dtype, device=local.device)
        send[:local.numel()] = local.reshape(-1)
        received = [torch.empty_like(send) for _ in range(self.world_size)]
        dist.all_gather(received, send)
        volume = torch.zeros(lead + self.grid.volume_shape, dtype=local.dtype, device=local.device)
        for box, size, flat in zip(boxes, sizes, received):
            if size:
                shape = lead + tuple(s.stop - s.start for s in box)
                volume[(Ellipsis,) + box] = flat[:size].view(shape)
        return volume

    # ------------------------------------------------------------------ the model call

    def compute_local(self, x, t, **model_kwargs):
        """This rank's share: ``{patch_index: output (N, C_out, *patch_shape)}``; ``x`` and the
        spatial kwargs are this rank's box ``(N, C, *local_shape)``."""
        if not _is_spatial(x, self.local_shape):
            raise ValueError(f"x has shape {tuple(x.shape)}; expected (N, C, *{self.local_shape}) "
                             f"(rank {self.rank}'s box of the volume {self.grid.volume_shape})")
        batch = x.shape[0]
        local = {}
        for group in self.groups:
            slices = [_shifted(self.grid.patches[i], self.origin) for i in group]
            out = self.model(_patch_batch(x, slices), t.repeat(len(group)),
                             **_split_model_kwargs(model_kwargs, self.local_shape, slices, batch))
            for k, patch_index in enumerate(group):
                local[patch_index] = out[k * batch:(k + 1) * batch]
        return local

    def __call__(self, x, t, **model_kwargs):
        """Blended output ``(N, C_out, *local_shape)`` for this rank's box ``x``
        ``(N, C, *local_shape)`` (spatial kwargs such as ``low_res`` cut the same way)."""
        local = self.compute_local(x, t, **model_kwargs)
        received = self._exchange_halos(local, x) if self.world_size > 1 else {}
        lead = (x.shape[0], self._channels(local, x))
        result = torch.zeros(lead + self.local_shape, dtype=torch.float64, device=x.device)
        for i in self.covering:  # patch order, as in PatchGrid.stitch
            if i in local:  # own patches lie inside the box
                self.grid.add_weighted(result, self.origin, i, local[i])
            else:
                region, values = received[i]
                self.grid.add_weighted(result, self.origin, i, values, region)
        return result.to(x.dtype)

    def _crop(self, output, i, region):
        """The part ``region`` (volume coordinates) of patch ``i``'s output."""
        return output[(Ellipsis,) + _shifted(region, [s.start for s in self.grid.patches[i]])]

    def _channels(self, local, x):
        """Output channels of the network (learned once; ranks without patches ask the others)."""
        if self._out_channels is None:
            some_output = next(iter(local.values()), None)
            channels = torch.tensor([0 if some_output is None else some_output.shape[1]],
                                    device=x.device)
            if self.world_size > 1:
                dist.all_reduce(channels, op=dist.ReduceOp.MAX)
            self._out_channels = int(channels.item())
        return self._out_channels

    def _exchange_halos(self, local, x):
        """Send the overlap regions of this rank's patch outputs, receive the other ranks';
        returns ``{patch: (region, values (N, C_out, *region_shape))}`` of the received pieces."""
        lead = (x.shape[0], self._channels(local, x))
        requests, inbox = [], []
        for other, plan in self.receives.items():
            shapes = [lead + tuple(s.stop - s.start for s in region) for _, region in plan]
            buffer = torch.empty(sum(torch.Size(s).numel() for s in shapes), dtype=x.dtype,
                                 device=x.device)
            requests.append(dist.irecv(buffer, src=other))
            inbox.append((plan, shapes, buffer))
        outbox = []  # keeps the send buffers alive until the sends complete
        for other, plan in self.sends.items():
            parts = [self._crop(local[i], i, region).reshape(-1) for i, region in plan]
            outbox.append(torch.cat(parts).to(x.dtype).contiguous())
            requests.append(dist.isend(outbox[-1], dst=other))
        for request in requests:
            request.wait()
        received = {}
        for plan, shapes, buffer in inbox:
            offset = 0
            for (i, region), shape in zip(plan, shapes):
                size = torch.Size(shape).numel()
                received[i] = (region, buffer[offset:offset + size].view(shape))
                offset += size
        return received


class SlicedNoise:
    """Noise source for a sampler that holds one box of the volume.

    Every draw makes the whole volume's standard normal noise from ``generator`` and returns the
    box's part, so every rank consumes the random stream exactly as a single process sampling
    the whole volume would (pass it as the sampling loop's ``generator``).

    :param generator: ``torch.Generator`` (drawn on its own device).
    :param lead_shape: the leading axes ``(N, C)`` of the sampled tensor.
    :param patched: the :class:`PatchedModel` whose ``grid.volume_shape`` and ``box`` apply.
    """

    def __init__(self, generator, lead_shape, patched):
        self.generator = generator
        self.full_shape = tuple(lead_shape) + patched.grid.volume_shape
        self.local_shape = tuple(lead_shape) + patched.local_shape
        self.patched = patched

    def randn(self, shape, device, dtype):
        if tuple(shape) != self.local_shape:
            raise ValueError(f"noise of shape {tuple(shape)} requested; this rank samples "
                             f"{self.local_shape}")
        full = torch.randn(self.full_shape, generator=self.generator, device=self.generator.device,
                           dtype=dtype)
        return self.patched.local(full).to(device)


def whole_volume_hook(hook, patched):
    """Run a sampler ``step_hook`` that acts on the whole volume inside a box-wise sampler.

    At the steps where ``hook.active(t)`` is true (every step if the hook has no ``active``),
    the sample and ``out["pred_xstart"]`` are gathered from all ranks with
    :meth:`PatchedModel.gather`, the hook runs on the whole volume (identically on every rank),
    and this rank's box of its result is returned. ``model_kwargs`` reach the hook as the
    rank's box.
    """
    def local_hook(x_prev, t, out, model_kwargs):
        active = getattr(hook, "active", None)
        if active is not None and not active(t):
            return None
        whole_out = dict(out, pred_xstart=patched.gather(out["pred_xstart"]))
        replaced = hook(patched.gather(x_prev), t, whole_out, model_kwargs)
        return None if replaced is None else patched.local(replaced).contiguous()

    return local_hook


def sample_patches_independently(diffusion, model, grid, noise, indices, *, model_kwargs=None,
                                 use_ddim=False, **sample_kwargs):
    """Comparison mode: one reverse diffusion per patch, for the patches ``indices``.

    :param diffusion: a ``GaussianDiffusion`` (or ``SpacedDiffusion``); its ``p_sample_loop``
        (or ``ddim_sample_loop`` with ``use_ddim``) runs on each patch in turn.
    :param model: the patch-sized network.
    :param grid: the :class:`~guided_diffusion.sampling.patches.PatchGrid`.
    :param noise: whole-volume start noise ``(N, C, *volume_shape)``; patch ``i`` starts from
        its cut-out, so the two modes can be compared from the same ``x_T``.
    :param indices: the patches to sample (e.g. one rank's share).
    :param model_kwargs: whole-volume kwargs, cut per patch like :class:`PatchedModel` does.
    :param sample_kwargs: passed to the sampling loop (``clip_denoised``, ``progress``,
        ``generator``, ...). A ``step_hook`` that acts on whole volumes does not fit this mode.
    :return: ``{patch_index: sample (N, C, *patch_shape)}``; stitch them with ``grid.stitch``.
    """
    if not _is_spatial(noise, grid.volume_shape):
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
            model_kwargs=_split_model_kwargs(model_kwargs or {}, grid.volume_shape,
                                             [grid.patches[i]], noise.shape[0]),
            **sample_kwargs,
        )
    return samples


def sample_independent_patches(diffusion, model, grid, noise, **kwargs):
    """All patches of :func:`sample_patches_independently`, stitched once at the end (seams can
    appear where the independent trajectories disagree). Returns ``(N, C, *volume_shape)``."""
    samples = sample_patches_independently(diffusion, model, grid, noise, range(len(grid)), **kwargs)
    return grid.stitch([samples[i] for i in range(len(grid))])
