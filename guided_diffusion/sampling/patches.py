"""Patching: a grid of overlapping patches (the splitter) and their weighted blend (the merger).

Shapes here are the *spatial* shapes of model tensors: ``(Z, X, Y)`` for 3D (model layout
``(B, C, Z, X, Y)``) or ``(X, Y)`` for 2D slices; the grid itself works for any number of axes.

Patch placement
    Along each axis of length ``n`` a patch of length ``p`` (clipped to ``n``) is placed
    ``k = ceil((n - p) / (p - overlap)) + 1`` times, with starts spread evenly over
    ``[0, n - p]`` (``round(i * (n - p) / (k - 1))``). The first patch starts at 0 and the last
    ends exactly at the border, so every voxel is covered without padding, and neighbouring
    patches overlap by at least ``overlap`` voxels (the overlaps differ by at most one voxel).
    Patches are numbered in C order over the per-axis starts (first axis slowest).

Blending weights
    Per axis a patch gets a profile that is 1 in its interior and rises as ``sin^2`` (a Hann
    ramp) over the voxels it shares with the previous patch and falls likewise over those it
    shares with the next one; profiles are then divided by their sum over the axis' patches.
    The N-D weight of a patch is the outer product of its axis profiles, so the weights of all
    patches covering a voxel sum to one (to float64 rounding), and a voxel covered by only one
    patch has weight exactly 1, also at the volume border. Weights are float64.

The published UNet needs transaxial sizes that are multiples of 16: build the grid on the
padded volume (:class:`~guided_diffusion.sampling.transforms.PadTransaxial`).
"""

import math
import numbers

import torch

DEFAULT_SLAB_DEPTH = 96
"""Axial patch length of the published 3D model (its test script uses 96-slice slabs)."""



def _per_axis(value, ndim, name):
    """Broadcast a scalar or validate a sequence to one entry per axis."""
    if value is None or isinstance(value, numbers.Integral):
        return (value,) * ndim
    values = tuple(value)
    if len(values) != ndim:
        raise ValueError(f"{name} must have {ndim} entries (one per axis), got {values}")
    return values


def _axis_starts(length, patch, overlap):
    """Evenly spread patch starts covering ``[0, length)``; the last patch ends at ``length``."""
    if patch >= length:
        return [0]
    stride = patch - overlap
    count = math.ceil((length - patch) / stride) + 1
    return [round(i * (length - patch) / (count - 1)) for i in range(count)]


def _hann_ramp(length):
    """``length`` values rising strictly inside (0, 1) as sin^2, float64."""
    j = torch.arange(1, length + 1, dtype=torch.float64)
    return torch.sin(0.5 * math.pi * j / (length + 1)) ** 2


def _axis_profiles(length, patch, starts):
    """Normalised 1D blending profiles, one per start, each of length ``patch`` (float64)."""
    raw = []
    for index, start in enumerate(starts):
        profile = torch.ones(patch, dtype=torch.float64)
        if index > 0:
            shared = starts[index - 1] + patch - start
            profile[:shared] *= _hann_ramp(shared)
        if index < len(starts) - 1:
            shared = start + patch - starts[index + 1]
            profile[patch - shared:] *= _hann_ramp(shared).flip(0)
        raw.append(profile)
    total = torch.zeros(length, dtype=torch.float64)
    for start, profile in zip(starts, raw):
        total[start:start + patch] += profile
    return [profile / total[start:start + patch] for start, profile in zip(starts, raw)]


def _shrink_transaxial(patch_shape, max_patch_voxels, multiple):
    """Reduce the transaxial patch sizes (axes 1..) in steps of ``multiple`` to fit a budget."""
    shape = list(patch_shape)
    while math.prod(shape) > max_patch_voxels:
        axis = max(range(1, len(shape)), key=lambda a: shape[a])
        smaller = (shape[axis] - 1) // multiple * multiple
        if smaller < multiple:
            raise ValueError(
                f"cannot fit patches of axial length {shape[0]} into max_patch_voxels="
                f"{max_patch_voxels} with transaxial sizes that are multiples of {multiple}"
            )
        shape[axis] = smaller
    return tuple(shape)


class PatchGrid:
    """A grid of overlapping patches covering a volume, with blending weights.

    :param volume_shape: spatial shape, ``(Z, X, Y)`` in model layout (any number of axes).
    :param patch_shape: patch length per axis; ``None`` entries mean the whole axis. Default:
        axial slabs of :data:`DEFAULT_SLAB_DEPTH` slices spanning the whole transaxial plane
        (for a 1-axis or 2-axis shape: the whole volume). Lengths above the volume size are
        clipped to it.
    :param overlap: minimum overlap in voxels between neighbouring patches, scalar or per axis;
        must be smaller than the patch length on every axis that needs more than one patch.
    :param max_patch_voxels: optional memory budget in voxels per patch; when a patch exceeds
        it, the transaxial sizes (axes 1..) are reduced in steps of ``transaxial_multiple``, so
        the plane is tiled too. Build the grid on a volume padded to that multiple.
    :param transaxial_multiple: step for the transaxial reduction (the UNet's constraint, 16).
    """

    def __init__(self, volume_shape, patch_shape=None, overlap=0, *, max_patch_voxels=None,
                 transaxial_multiple=16):
        self.volume_shape = tuple(int(n) for n in volume_shape)
        ndim = len(self.volume_shape)
        if ndim == 0 or any(n < 1 for n in self.volume_shape):
            raise ValueError(f"volume_shape must be positive sizes, got {tuple(volume_shape)}")
        if patch_shape is None:
            patch_shape = (DEFAULT_SLAB_DEPTH,) + (None,) * (ndim - 1) if ndim == 3 else None
        requested = _per_axis(patch_shape, ndim, "patch_shape")
        patch = []
        for length, size in zip(self.volume_shape, requested):
            if size is not None and int(size) < 1:
                raise ValueError(f"patch_shape entries must be >= 1, got {requested}")
            patch.append(length if size is None else min(int(size), length))
        if max_patch_voxels is not None:
            if ndim < 2:
                raise ValueError("max_patch_voxels needs transaxial axes (ndim >= 2)")
            patch = _shrink_transaxial(patch, int(max_patch_voxels), int(transaxial_multiple))
        self.patch_shape = tuple(patch)
        overlaps = tuple(int(o) for o in _per_axis(overlap, ndim, "overlap"))
        for length, size, ov in zip(self.volume_shape, self.patch_shape, overlaps):
            if ov < 0 or (size < length and ov >= size):
                raise ValueError(
                    f"overlap {overlaps} must be >= 0 and smaller than the patch "
                    f"{self.patch_shape} on axes with several patches (volume {self.volume_shape})"
                )
        self.overlap = overlaps
        self.axis_starts = [
            _axis_starts(length, size, ov)
            for length, size, ov in zip(self.volume_shape, self.patch_shape, overlaps)
        ]
        self._axis_profiles = [
            _axis_profiles(length, size, starts)
            for length, size, starts in zip(self.volume_shape, self.patch_shape, self.axis_starts)
        ]
        self._corners = [()]
        for starts in self.axis_starts:
            self._corners = [c + (i,) for c in self._corners for i in range(len(starts))]
        self.patches = [
            tuple(
                slice(self.axis_starts[a][i], self.axis_starts[a][i] + self.patch_shape[a])
                for a, i in enumerate(corner)
            )
            for corner in self._corners
        ]

    @property
    def ndim(self):
        return len(self.volume_shape)

    def __len__(self):
        return len(self.patches)

    def __repr__(self):
        counts = "x".join(str(len(s)) for s in self.axis_starts)
        return (f"PatchGrid(volume_shape={self.volume_shape}, patch_shape={self.patch_shape}, "
                f"overlap={self.overlap}, patches={counts})")

    def _check_spatial(self, tensor, what):
        if tuple(tensor.shape[-self.ndim:]) != self.volume_shape or tensor.ndim < self.ndim:
            raise ValueError(
                f"{what} has shape {tuple(tensor.shape)}; its trailing axes must be the grid's "
                f"volume shape {self.volume_shape}"
            )

    def _broadcast_profiles(self, i, device):
        """Patch ``i``'s per-axis profiles shaped to broadcast over ``patch_shape`` (float64)."""
        profiles = []
        for axis, index in enumerate(self._corners[i]):
            shape = [1] * self.ndim
            shape[axis] = self.patch_shape[axis]
            profiles.append(self._axis_profiles[axis][index].to(device).view(shape))
        return profiles

    def weight(self, i, device=None):
        """Blending weight of patch ``i``: float64 tensor of ``patch_shape``."""
        weight = torch.ones(self.patch_shape, dtype=torch.float64, device=device)
        for profile in self._broadcast_profiles(i, device):
            weight = weight * profile
        return weight

    def extract(self, volume, i):
        """Patch ``i`` of ``volume`` (any leading axes; trailing axes = ``volume_shape``), a view."""
        self._check_spatial(volume, "volume")
        return volume[(Ellipsis,) + self.patches[i]]

    def overlap_region(self, i, box):
        """Where patch ``i`` meets ``box`` (one slice per axis, volume coordinates).

        :param box: tuple of slices with explicit start and stop (volume coordinates).
        :return: the intersection as a tuple of slices, or ``None`` when it is empty.
        """
        region = []
        for patch_slice, box_slice in zip(self.patches[i], box):
            start = max(patch_slice.start, box_slice.start)
            stop = min(patch_slice.stop, box_slice.stop)
            if stop <= start:
                return None
            region.append(slice(start, stop))
        return tuple(region)

    def add_weighted(self, result, origin, i, values, region=None):
        """``result[region - origin] += weight_i[region] * values`` in float64.

        :param result: float64 tensor ``(..., *box_shape)`` holding a box of the volume whose
            first voxel is at ``origin`` (volume coordinates, one int per axis).
        :param i: patch index; ``region``: part of patch ``i`` to add (default: all of it).
        :param values: patch ``i``'s output over ``region``, shape ``(..., *region_shape)``.
        """
        region = self.patches[i] if region is None else region
        weighted = values.double()
        for axis, profile in enumerate(self._broadcast_profiles(i, result.device)):
            offset = region[axis].start - self.patches[i][axis].start
            length = region[axis].stop - region[axis].start
            weighted = weighted * profile.narrow(axis, offset, length)
        target = tuple(slice(r.start - o, r.stop - o) for r, o in zip(region, origin))
        result[(Ellipsis,) + target] += weighted

    def stitch(self, patch_outputs, dtype=None):
        """Weighted sum of per-patch tensors into a volume, in patch order.

        :param patch_outputs: one tensor per patch, shape ``(..., *patch_shape)``, all with the
            same leading axes, dtype and device.
        :param dtype: result dtype (default: that of the patches). The sum is accumulated in
            float64, so stitching the patches of a float32 volume returns it bit for bit.
        """
        if len(patch_outputs) != len(self):
            raise ValueError(f"stitch needs {len(self)} patch outputs, got {len(patch_outputs)}")
        first = patch_outputs[0]
        lead = tuple(first.shape[:first.ndim - self.ndim])
        for output in patch_outputs:
            if tuple(output.shape) != lead + self.patch_shape:
                raise ValueError(
                    f"patch output shape {tuple(output.shape)} differs from "
                    f"{lead + self.patch_shape} (leading axes + patch_shape)"
                )
        result = torch.zeros(lead + self.volume_shape, dtype=torch.float64, device=first.device)
        for i, output in enumerate(patch_outputs):
            self.add_weighted(result, (0,) * self.ndim, i, output)
        return result.to(first.dtype if dtype is None else dtype)
