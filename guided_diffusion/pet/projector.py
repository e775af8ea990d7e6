"""Torch PET forward / back projector with an exact adjoint.

Transaxial model: Joseph's method. Each LOR ``x cos(phi) + y sin(phi) = s`` is stepped through
the image along its dominant axis, one sample per voxel row/column, with linear interpolation
along the other axis; each sample is weighted by the step length (mm). The weights of a chunk of
views form a sparse matrix ``A`` (CSR, int32 indices); the back projection uses the explicitly
transposed matrix built from the same entries, so ``<A x, y> = <x, A^T y>`` up to rounding.

Axial model: sinogram planes sit at the scanner's LOR mid-points (or at the image slices in
"2d" mode) and the image is linearly interpolated along z. Oblique LORs ("3d" mode) sample
``z = z_plane + t * tan(theta)`` where ``t`` is the transaxial distance along the LOR from its
mid-point, with the path length scaled by ``1 / cos(theta)``.

Layouts: images ``(X, Y, Z)`` or ``(B, X, Y, Z)`` (Z axial, voxel centres symmetric about the
scanner axis, axially centred at ``axial_offset_mm``); sinograms ``(radial, view, plane)`` or
``(B, radial, view, plane)``; line integrals in (image units) * mm.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import numpy as np
import torch

from . import geometry
from .linear_operator import GaussianPSF, LinearOperator, compose

DEFAULT_CHUNK_NNZ = 1 << 21          # transaxial matrix entries built at once
DEFAULT_GATHER_ELEMENTS = 1 << 22    # (entry, plane) samples processed at once for oblique LORs
DEFAULT_CACHE_BYTES = 1 << 30        # cached transaxial matrices per projector


class _SparseMatmul(torch.autograd.Function):
    """``A @ dense`` whose gradient uses the stored transpose ``AT`` (exact adjoint)."""

    @staticmethod
    def forward(ctx, dense, matrix, transpose):
        ctx.transpose_pair = (transpose, matrix)
        return matrix @ dense

    @staticmethod
    def backward(ctx, grad):
        transpose, matrix = ctx.transpose_pair
        return _SparseMatmul.apply(grad.contiguous(), transpose, matrix), None, None


def _csr(rows, cols, values, n_rows, n_cols):
    """CSR matrix from row-sorted COO entries (int32 indices when they fit)."""
    index_dtype = torch.int32 if max(n_rows, n_cols, values.numel()) < 2 ** 31 - 1 else torch.int64
    counts = torch.bincount(rows, minlength=n_rows)
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.cumsum(counts, 0)
    with warnings.catch_warnings():   # "sparse CSR support is in beta" is not actionable here
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow.to(index_dtype), cols.to(index_dtype), values, (n_rows, n_cols),
                                       check_invariants=False)


class _ViewChunk:
    """Joseph weights of a chunk of views: COO entries, CSR matrix and its transpose."""

    def __init__(self, rows, cols, weights, along_mm, n_rows, n_voxels, keep_entries):
        self.n_rows = n_rows
        self.matrix = _csr(rows, cols, weights, n_rows, n_voxels)
        order = torch.argsort(cols, stable=True)
        self.transpose = _csr(cols[order], rows[order], weights[order], n_voxels, n_rows)
        # COO entries (with the distance along the LOR) are only needed for oblique segments
        entries = (rows, cols, weights, along_mm) if keep_entries else (None,) * 4
        self.rows, self.cols, self.weights, self.along_mm = entries

    @property
    def nbytes(self) -> int:
        tensors = [self.matrix.values(), self.matrix.col_indices(), self.matrix.crow_indices(),
                   self.transpose.values(), self.transpose.col_indices(), self.transpose.crow_indices()]
        if self.rows is not None:
            tensors += [self.rows, self.cols, self.weights, self.along_mm]
        return sum(int(t.numel() * t.element_size()) for t in tensors)


class PETProjector(LinearOperator):
    """Forward projector of one scanner layout for one image grid. Build with ``make_projector``.

    Attributes:
        layout: the ``geometry.SinogramLayout`` (planes restricted to the image's axial extent).
        image_shape: ``(X, Y, Z)``; sinogram_shape: ``(radial, view, plane)``.
        voxel_size_mm: ``(vx, vy, vz)``.
    """

    def __init__(self, layout, image_shape, voxel_size_mm, axial_offset_mm=0.0, device="cpu",
                 dtype=torch.float32, cache_bytes=DEFAULT_CACHE_BYTES, chunk_nnz=DEFAULT_CHUNK_NNZ,
                 gather_elements=DEFAULT_GATHER_ELEMENTS):
        self.layout = layout
        self.scanner = layout.scanner
        self.in_shape = tuple(image_shape)
        self.out_shape = layout.shape
        self.voxel_size_mm = tuple(voxel_size_mm)
        self.axial_offset_mm = float(axial_offset_mm)
        self.device, self.dtype = torch.device(device), dtype
        self.cache_bytes, self.chunk_nnz, self.gather_elements = cache_bytes, chunk_nnz, gather_elements
        self._cache, self._cached_bytes, self._subsets = {}, 0, {}

        nx, ny, nz = self.in_shape
        self.n_voxels = nx * ny
        tensor = dict(device=self.device, dtype=torch.float64)
        self._radial = torch.as_tensor(self.scanner.radial_positions_mm(), **tensor)
        self._angles = torch.as_tensor(self.scanner.view_angles()[list(layout.view_indices)], **tensor)
        steps = max(nx, ny) * 2 * self.scanner.num_radial
        self._views_per_chunk = max(1, min(layout.n_views, chunk_nnz // steps))
        self._slice_z = self.axial_offset_mm + (np.arange(nz) - (nz - 1) / 2) * self.voxel_size_mm[2]
        self._segment_plans = [self._plan_segment(seg) for seg in layout.segments]

    # ----------------------------------------------------------------- set-up
    def _plan_segment(self, segment):
        """Per segment: padded fractional slice index of each plane and the per-bin slope."""
        vz = self.voxel_size_mm[2]
        planes = (np.asarray(segment.plane_z_mm) - self._slice_z[0]) / vz + 1.0  # +1: zero pad slice
        slope = self.layout.axial_slope(segment)
        if self.layout.mode == "2d" or not np.any(slope):
            return {"oblique": False, "axial": self._axial_matrix(planes)}
        return {"oblique": True,
                "planes": torch.as_tensor(planes, device=self.device, dtype=self.dtype),
                "slope": torch.as_tensor(slope, device=self.device, dtype=torch.float64)}

    def _axial_matrix(self, padded_planes):
        """Linear interpolation matrix (plane, slice) of the image at the planes; None = identity."""
        nz = self.in_shape[2]
        if self.layout.mode == "2d":
            return None
        matrix = np.zeros((len(padded_planes), nz + 2))
        lower = np.clip(np.floor(padded_planes).astype(int), 0, nz)
        frac = padded_planes - lower
        rows = np.arange(len(padded_planes))
        matrix[rows, lower] += 1 - frac
        matrix[rows, lower + 1] += frac
        return torch.as_tensor(matrix[:, 1:-1], device=self.device, dtype=self.dtype)

    def _build_chunk(self, start, stop):
        """Joseph entries of views ``start:stop`` (positions in ``layout.view_indices``)."""
        nx, ny, _ = self.in_shape
        vx, vy, _ = self.voxel_size_mm
        n_rad = self.scanner.num_radial
        phi = self._angles[start:stop].view(-1, 1, 1, 1)
        cos, sin = torch.cos(phi), torch.sin(phi)
        steep = cos.abs() >= sin.abs()                      # step along y, interpolate along x

        def pick(if_steep, otherwise):
            return torch.where(steep, torch.tensor(float(if_steep), device=self.device, dtype=torch.float64),
                               torch.tensor(float(otherwise), device=self.device, dtype=torch.float64))

        n_step, n_interp = pick(ny, nx), pick(nx, ny)
        step_mm, interp_mm = pick(vy, vx), pick(vx, vy)
        k = torch.arange(max(nx, ny), device=self.device, dtype=torch.float64).view(1, 1, -1, 1)
        s = self._radial.view(1, -1, 1, 1)
        along_axis = (k - (n_step - 1) / 2) * step_mm
        denominator = torch.where(steep, cos, sin)
        other = (s - along_axis * torch.where(steep, sin, cos)) / denominator
        u = other / interp_mm + (n_interp - 1) / 2
        lower = torch.floor(u)
        frac = u - lower
        tap = torch.arange(2, device=self.device).view(1, 1, 1, 2)
        index = lower.long() + tap
        weight = (step_mm / denominator.abs()) * torch.where(tap == 0, 1 - frac, frac)
        x_mm = torch.where(steep, other, along_axis)
        y_mm = torch.where(steep, along_axis, other)
        along_mm = -x_mm * sin + y_mm * cos                                 # (views, rad, steps, 1)
        kk = k.long()
        n_step, n_interp = n_step.long(), n_interp.long()
        cols = torch.where(steep, index * ny + kk, kk * ny + index)
        valid = (index >= 0) & (index < n_interp) & (kk < n_step) & (weight != 0)
        keep = valid.flatten().nonzero().squeeze(1)                         # row-major (view, rad, step, tap)
        return _ViewChunk(keep // (2 * k.numel()), cols.flatten()[keep], weight.flatten()[keep].to(self.dtype),
                          along_mm.flatten()[keep // 2].to(self.dtype), (stop - start) * n_rad, self.n_voxels,
                          keep_entries=any(plan["oblique"] for plan in self._segment_plans))

    def _chunks(self):
        """Yield (start, stop, chunk) over the views, caching chunks within ``cache_bytes``."""
        for start in range(0, self.layout.n_views, self._views_per_chunk):
            stop = min(start + self._views_per_chunk, self.layout.n_views)
            chunk = self._cache.get(start)
            if chunk is None:
                chunk = self._build_chunk(start, stop)
                if self._cached_bytes + chunk.nbytes <= self.cache_bytes:
                    self._cache[start] = chunk
                    self._cached_bytes += chunk.nbytes
            yield start, stop, chunk

    # ----------------------------------------------------------------- operators
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Line integrals (image units * mm) of ``x`` ``(X, Y, Z)``/``(B, X, Y, Z)``."""
        self._check_input(x, self.in_shape, "forward")
        batched = x.dim() == 4
        x = (x if batched else x[None]).to(self.dtype)
        vol = x.reshape(x.shape[0], self.n_voxels, self.in_shape[2])          # (B, XY, Z)
        pieces = [[] for _ in self._segment_plans]
        for start, stop, chunk in self._chunks():
            for i, plan in enumerate(self._segment_plans):
                project = self._forward_oblique if plan["oblique"] else self._forward_separable
                pieces[i].append(project(vol, chunk, plan, stop - start))
        out = torch.cat([torch.cat(p, dim=2) for p in pieces], dim=3)
        return out if batched else out[0]

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Exact transpose of ``forward``: back projection of ``y`` onto the image grid."""
        self._check_input(y, self.out_shape, "adjoint")
        batched = y.dim() == 4
        y = (y if batched else y[None]).to(self.dtype)
        vol = y.new_zeros(y.shape[0], self.n_voxels, self.in_shape[2])
        slices = self.layout.segment_slices()
        for start, stop, chunk in self._chunks():
            for plan, planes in zip(self._segment_plans, slices):
                part = y[:, :, start:stop, planes]
                back = self._adjoint_oblique if plan["oblique"] else self._adjoint_separable
                vol = vol + back(part, chunk, plan)
        out = vol.reshape((y.shape[0],) + self.in_shape)
        return out if batched else out[0]

    def _forward_separable(self, vol, chunk, plan, n_chunk_views):
        axial = plan["axial"]
        planes = vol if axial is None else vol @ axial.T                    # (B, XY, P)
        batch, _, n_planes = planes.shape
        dense = planes.permute(1, 0, 2).reshape(self.n_voxels, batch * n_planes)
        sino = _SparseMatmul.apply(dense, chunk.matrix, chunk.transpose)    # (views*rad, B*P)
        sino = sino.view(n_chunk_views, -1, batch, n_planes)
        return sino.permute(2, 1, 0, 3)                                     # (B, rad, views, P)

    def _adjoint_separable(self, part, chunk, plan):
        batch, _, n_views, n_planes = part.shape
        dense = part.permute(2, 1, 0, 3).reshape(-1, batch * n_planes)
        back = _SparseMatmul.apply(dense, chunk.transpose, chunk.matrix)    # (XY, B*P)
        back = back.view(self.n_voxels, batch, n_planes).permute(1, 0, 2)
        axial = plan["axial"]
        return back if axial is None else back @ axial

    def _oblique_samples(self, chunk, plan, lo, hi):
        """Flat padded-volume indices and interpolation weights of entries lo:hi at every plane."""
        nz = self.in_shape[2]
        vz = self.voxel_size_mm[2]
        rows = chunk.rows[lo:hi]
        slope = plan["slope"][rows % self.scanner.num_radial]
        offset = (chunk.along_mm[lo:hi].double() * slope / vz).to(self.dtype)
        u = plan["planes"].view(1, -1) + offset.view(-1, 1)                # (E, P), padded slices
        lower = torch.floor(u).clamp(0, nz)
        frac = u - lower
        inside = ((u >= 0) & (u <= nz + 1)).to(self.dtype)
        weight = (chunk.weights[lo:hi] * torch.sqrt(1 + slope ** 2).to(self.dtype)).view(-1, 1) * inside
        flat = chunk.cols[lo:hi].view(-1, 1) * (nz + 2) + lower.long()
        return rows, flat, weight * (1 - frac), weight * frac

    def _entry_blocks(self, chunk, n_planes):
        block = max(1, self.gather_elements // max(1, n_planes))
        for lo in range(0, chunk.rows.numel(), block):
            yield lo, min(lo + block, chunk.rows.numel())

    def _forward_oblique(self, vol, chunk, plan, n_chunk_views):
        batch, n_planes = vol.shape[0], plan["planes"].numel()
        padded = torch.nn.functional.pad(vol, (1, 1)).reshape(batch, -1)   # (B, XY*(Z+2))
        sino = vol.new_zeros(batch, chunk.n_rows, n_planes)
        for lo, hi in self._entry_blocks(chunk, n_planes):
            rows, flat, w0, w1 = self._oblique_samples(chunk, plan, lo, hi)
            values = padded[:, flat] * w0 + padded[:, flat + 1] * w1       # (B, E, P)
            sino = sino.index_add(1, rows, values)
        sino = sino.view(batch, n_chunk_views, -1, n_planes)
        return sino.permute(0, 2, 1, 3)

    def _adjoint_oblique(self, part, chunk, plan):
        batch, n_planes, nz = part.shape[0], part.shape[3], self.in_shape[2]
        rays = part.permute(0, 2, 1, 3).reshape(batch, -1, n_planes)        # (B, views*rad, P)
        padded = part.new_zeros(batch, self.n_voxels * (nz + 2))
        for lo, hi in self._entry_blocks(chunk, n_planes):
            rows, flat, w0, w1 = self._oblique_samples(chunk, plan, lo, hi)
            values = rays[:, rows]
            padded = padded.index_add(1, flat.reshape(-1), (values * w0).reshape(batch, -1))
            padded = padded.index_add(1, (flat + 1).reshape(-1), (values * w1).reshape(batch, -1))
        return padded.view(batch, self.n_voxels, nz + 2)[:, :, 1:-1]

    # ----------------------------------------------------------------- subsets
    def subset(self, index: int, n_subsets: int) -> "PETProjector":
        """Projector over views ``index::n_subsets`` (cached; for OSEM)."""
        if not (isinstance(n_subsets, int) and 1 <= n_subsets <= self.layout.n_views):
            raise ValueError(f"n_subsets must be an integer in [1, {self.layout.n_views}], got {n_subsets!r}")
        if not (isinstance(index, int) and 0 <= index < n_subsets):
            raise ValueError(f"subset index must be in [0, {n_subsets}), got {index!r}")
        if n_subsets == 1:
            return self
        key = (index, n_subsets)
        if key not in self._subsets:
            views = self.layout.view_indices[index::n_subsets]
            self._subsets[key] = PETProjector(
                self.layout.subset_views(views), self.in_shape, self.voxel_size_mm, self.axial_offset_mm,
                self.device, self.dtype, self.cache_bytes // n_subsets, self.chunk_nnz, self.gather_elements)
        return self._subsets[key]


def make_projector(preset, image_shape, voxel_size_mm, *, mode: Optional[str] = None,
                   max_ring_difference: Optional[int] = None, span: int = 1,
                   psf_fwhm_mm=None, device="cpu", dtype=torch.float32,
                   views: Optional[Sequence[int]] = None, axial_offset_mm: float = 0.0,
                   view_mashing: Optional[int] = None, n_radial: Optional[int] = None,
                   memory_budget_bytes: Optional[int] = None, cache_bytes: int = DEFAULT_CACHE_BYTES,
                   ) -> LinearOperator:
    """A PET projector for an image grid in a scanner.

    Args:
        preset: scanner preset name ("quadra", "uexplorer", "ecat921_2d", "demo") or ScannerGeometry.
        image_shape: ``(X, Y, Z)`` voxels; the volume is centred on the scanner axis.
        voxel_size_mm: scalar or ``(vx, vy, vz)``.
        mode: "2d" (a sinogram per slice), "ssrb" (direct planes) or "3d" (oblique segments);
            default: the preset's mode.
        max_ring_difference, span: "3d" only (see ``geometry.make_layout``).
        psf_fwhm_mm: optional image-space Gaussian resolution model (scalar or 3 values, mm);
            the result is then ``projector @ GaussianPSF``.
        device, dtype: where and in which float type the projector works.
        views: optional subset of view indices (sorted) to model.
        axial_offset_mm: axial position of the volume centre relative to the scanner centre.
            With "ssrb"/"3d" only planes whose LOR mid-points fall within the volume's slice
            centres are kept, so a thin volume is a slab with its own sinogram.
        view_mashing, n_radial: override the preset's view mashing / radial trimming.
        memory_budget_bytes: refuse (MemoryError) a sinogram larger than this; default a quarter
            of the available RAM.
        cache_bytes: memory allowed for caching the transaxial system matrices.
    Returns:
        a ``PETProjector`` (or a composition with the PSF) with ``forward``, ``adjoint``, ``T``,
        ``subset``, ``image_shape`` and ``sinogram_shape``.
    """
    scanner = geometry.get_preset(preset)
    overrides = {k: v for k, v in (("view_mashing", view_mashing), ("n_radial", n_radial)) if v is not None}
    if overrides:
        scanner = scanner.with_options(**overrides)
    image_shape = tuple(int(n) for n in image_shape)
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ValueError(f"image_shape must be three positive integers (X, Y, Z), got {image_shape!r}")
    voxel = _voxel_triple(voxel_size_mm)
    mode = scanner.default_mode if mode is None else mode
    _check_fov(scanner, image_shape, voxel, mode, axial_offset_mm)
    slice_z = axial_offset_mm + (np.arange(image_shape[2]) - (image_shape[2] - 1) / 2) * voxel[2]
    if mode == "2d":
        layout = geometry.make_layout(scanner, "2d", plane_z_mm=slice_z)
    else:
        layout = geometry.make_layout(scanner, mode, max_ring_difference=max_ring_difference, span=span)
        layout = layout.restrict_axially(slice_z[0], slice_z[-1])
    if views is not None:
        views = [int(v) for v in views]
        if not views or sorted(set(views)) != views or views[0] < 0 or views[-1] >= scanner.n_views:
            raise ValueError(f"views must be sorted distinct indices in [0, {scanner.n_views}), got {views!r}")
        layout = layout.subset_views(views)
    geometry.check_memory_budget(layout, dtype, 1, memory_budget_bytes)
    projector = PETProjector(layout, image_shape, voxel, axial_offset_mm, device, dtype, cache_bytes)
    if psf_fwhm_mm is None:
        return projector
    return compose(projector, GaussianPSF(image_shape, voxel, psf_fwhm_mm, device=device, dtype=dtype))


def _voxel_triple(voxel_size_mm):
    values = voxel_size_mm if isinstance(voxel_size_mm, (tuple, list)) else (voxel_size_mm,) * 3
    values = tuple(float(v) for v in values)
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"voxel_size_mm must be a positive number or three of them, got {voxel_size_mm!r}")
    return values


def _check_fov(scanner, image_shape, voxel, mode, axial_offset_mm):
    """Reject a volume that does not fit in the scanner's field of view."""
    half_x, half_y = image_shape[0] * voxel[0] / 2, image_shape[1] * voxel[1] / 2
    radial_half = scanner.num_radial * scanner.radial_bin_mm / 2
    if max(half_x, half_y) > radial_half + 1e-6:
        raise ValueError(
            f"volume of {2 * half_x:.1f} x {2 * half_y:.1f} mm is wider than the {2 * radial_half:.1f} mm "
            f"transaxial FOV of scanner {scanner.name!r}; use smaller voxels or crop the volume")
    if math.hypot(half_x, half_y) >= scanner.ring_radius_mm:
        raise ValueError(f"volume corners lie outside the detector ring of scanner {scanner.name!r}")
    if mode != "2d":
        half_z = image_shape[2] * voxel[2] / 2
        if abs(axial_offset_mm) + half_z > scanner.axial_fov_mm / 2 + 1e-6:
            raise ValueError(
                f"volume spanning {2 * half_z:.1f} mm at axial offset {axial_offset_mm:.1f} mm exceeds the "
                f"{scanner.axial_fov_mm:.1f} mm axial FOV of scanner {scanner.name!r}; project it slab by slab")


def geometric_projector(operator: LinearOperator) -> PETProjector:
    """The ``PETProjector`` inside ``operator`` (itself, or the one in a composition)."""
    if isinstance(operator, PETProjector):
        return operator
    found = operator.find(PETProjector) if hasattr(operator, "find") else None
    if found is None:
        raise TypeError(f"expected a PET projector (from make_projector), got {type(operator).__name__}")
    return found
