"""Random fields for the procedural phantoms: textures on a voxel grid, smooth random functions
of position, and functions of direction tabulated on the unit sphere.

Grids are :class:`~.shapes.VoxelGrid` objects (arrays ``(X, Y, Z)``); positions are world mm.
Every field is zero-mean and unit-std (over the grid, the lattice or the table) unless said
otherwise, so a caller scales it by the relative amplitude it wants.
"""

import numpy as np
from scipy import ndimage


def smooth_field(rng, grid, correlation_mm):
    """Zero-mean, unit-std random field with ~``correlation_mm`` correlation length (X, Y, Z)."""
    step = correlation_mm / 2.0
    coarse_shape = [int(np.ceil(n * v / step)) + 3 for n, v in zip(grid.shape, grid.voxel)]
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape), 1.0, mode="wrap")
    coords = [(np.arange(n) * v) / step + 1.0 for n, v in zip(grid.shape, grid.voxel)]
    field = ndimage.map_coordinates(coarse, np.meshgrid(*coords, indexing="ij", sparse=False), order=1)
    field -= field.mean()
    return (field / max(field.std(), 1e-12)).astype(np.float32)


def noise_field(rng, grid, correlation_mm):
    """Like :func:`smooth_field` at any scale: white noise filtered by a Gaussian of sigma
    ``correlation_mm / 2`` on the grid itself for fine scales (up to two voxels), the coarse
    lattice of :func:`smooth_field` for larger ones."""
    sigma = correlation_mm / 2.0 / grid.voxel
    if sigma.max() > 2.0:
        return smooth_field(rng, grid, correlation_mm)
    field = ndimage.gaussian_filter(rng.standard_normal(grid.shape, dtype=np.float32), sigma, mode="wrap")
    field -= field.mean()
    return field / max(float(field.std()), 1e-12)


def mix_fields(fields, weights):
    """Weighted sum of independent unit-std fields, rescaled to unit std (float32)."""
    total = sum(np.float32(w) * f for f, w in zip(fields, weights))
    return (total / np.float32(np.sqrt(sum(w * w for w in weights)))).astype(np.float32)


class LatticeField:
    """A smooth random function of position: unit-std Gaussian-filtered noise on a lattice over
    the box ``low_mm .. high_mm`` (sigma ``correlation_mm / 2``, lattice step a third of the
    correlation), read by cubic interpolation (periodic outside the box). Its zero level set has
    a spacing of about 2.2 correlation lengths along a line."""

    def __init__(self, rng, low_mm, high_mm, correlation_mm):
        self.step = correlation_mm / 3.0
        self.low = np.asarray(low_mm, dtype=float)
        shape = np.maximum(np.ceil((np.asarray(high_mm, dtype=float) - self.low) / self.step).astype(int) + 1, 8)
        lattice = ndimage.gaussian_filter(rng.standard_normal(tuple(shape)), 1.5, mode="wrap")
        lattice = (lattice - lattice.mean()) / max(lattice.std(), 1e-12)
        self.coefficients = ndimage.spline_filter(lattice, order=3, mode="grid-wrap")

    def __call__(self, x, y, z):
        x, y, z = np.broadcast_arrays(x, y, z)
        coords = [(c.ravel() - self.low[i]) / self.step for i, c in enumerate((x, y, z))]
        values = ndimage.map_coordinates(self.coefficients, coords, order=3, mode="grid-wrap", prefilter=False)
        return values.reshape(x.shape)


def sphere_directions(n_theta):
    """Unit vectors (n_theta, 2 * n_theta, 3) at the cell centres of a polar angle x azimuth
    grid of ``180 / n_theta`` degree steps, with their unit tangents along theta and phi."""
    theta = (np.arange(n_theta) + 0.5) * np.pi / n_theta
    phi = np.arange(2 * n_theta) * np.pi / n_theta
    t, p = np.meshgrid(theta, phi, indexing="ij")
    u = np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], -1)
    e_theta = np.stack([np.cos(t) * np.cos(p), np.cos(t) * np.sin(p), -np.sin(t)], -1)
    e_phi = np.stack([-np.sin(p), np.cos(p), np.zeros_like(p)], -1)
    return u, e_theta, e_phi


def zero_line_distance(function, n_theta, step_rad=1e-3):
    """Signed angular distance (radians) from each direction of :func:`sphere_directions` to the
    nearest zero line of ``function`` (unit vectors (..., 3) -> values): ``f / |tangential
    gradient of f|``, the first-order estimate, with the gradient by central differences."""
    u, e_theta, e_phi = sphere_directions(n_theta)

    def at(v):
        v = v / np.linalg.norm(v, axis=-1, keepdims=True)
        return function(v)

    d_theta = (at(u + step_rad * e_theta) - at(u - step_rad * e_theta)) / (2 * step_rad)
    d_phi = (at(u + step_rad * e_phi) - at(u - step_rad * e_phi)) / (2 * step_rad)
    return at(u) / np.maximum(np.hypot(d_theta, d_phi), 1e-6)


class SphereTable:
    """Functions of direction tabulated on the grid of :func:`sphere_directions`: ``values``
    (k, n_theta, 2 * n_theta); calling it with unit-vector components returns (k, ...) by
    bilinear interpolation (periodic in azimuth, clamped at the poles)."""

    def __init__(self, values):
        values = np.asarray(values, dtype=float)
        self.n_theta = values.shape[1]
        self.values = np.concatenate([values, values[:, :, :1]], axis=2).reshape(len(values), -1)

    def __call__(self, ux, uy, uz):
        n = self.n_theta
        ti = np.clip(np.arccos(np.clip(uz, -1.0, 1.0)) * (n / np.pi) - 0.5, 0.0, n - 1.0)
        tj = np.mod(np.arctan2(uy, ux), 2 * np.pi) * (n / np.pi)
        i0 = np.minimum(ti.astype(np.intp), n - 2)
        j0 = np.minimum(tj.astype(np.intp), 2 * n - 1)
        wi, wj = ti - i0, tj - j0
        row = 2 * n + 1
        base = i0 * row + j0
        v = self.values
        return ((v[:, base] * (1 - wj) + v[:, base + 1] * wj) * (1 - wi)
                + (v[:, base + row] * (1 - wj) + v[:, base + row + 1] * wj) * wi)
