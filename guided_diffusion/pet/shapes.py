"""Smooth solids as approximate signed distance functions (SDF), and their voxelisation.

A shape is a function of world coordinates ``(x, y, z)`` in mm returning the signed distance to
its surface in mm (negative inside), plus an axis-aligned bounding box. The distances are the
usual first-order approximations (exact for spheres, capsules and planes, accurate to a fraction
of a millimetre near the surface of ellipsoids), which is what the partial-volume fractions need.
Coordinates broadcast, so a shape can be evaluated on ``(X, 1, 1) x (1, Y, 1) x (1, 1, Z)`` grid
axes or on flat point lists alike.

:func:`voxel_fraction` turns a shape into the fraction of each voxel it covers: an analytic
ramp ``clip(1/2 - d / h, 0, 1)`` (exact for a plane crossing the voxel along an axis) at the voxel
centre, refined near the surface by averaging ``supersample**3`` sub-voxel ramps.
"""

import numpy as np
from scipy.interpolate import PchipInterpolator

_INF = np.inf


def rotation_matrix(degrees_xyz):
    """Rotation matrix (3, 3) for rotations about x, then y, then z, angles in degrees."""
    ax, ay, az = np.deg2rad(degrees_xyz)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


class Shape:
    """Base class: ``sdf(x, y, z)`` in mm and ``bbox`` = (low (3,), high (3,)) in mm."""

    bbox = (np.full(3, -_INF), np.full(3, _INF))

    def sdf(self, x, y, z):
        raise NotImplementedError


class Ellipsoid(Shape):
    """Ellipsoid with semi-axes ``radii`` (mm) along the columns of ``rotation`` about ``center``."""

    def __init__(self, center, radii, rotation=None):
        self.center = np.asarray(center, dtype=float)
        self.radii = np.asarray(radii, dtype=float)
        self.rotation = np.eye(3) if rotation is None else np.asarray(rotation, dtype=float)
        half = np.sqrt(((self.rotation * self.radii) ** 2).sum(axis=1))
        self.bbox = (self.center - half, self.center + half)

    def sdf(self, x, y, z):
        d = (x - self.center[0], y - self.center[1], z - self.center[2])
        r = self.rotation
        local = [r[0, i] * d[0] + r[1, i] * d[1] + r[2, i] * d[2] for i in range(3)]
        k0 = np.sqrt(sum((c / a) ** 2 for c, a in zip(local, self.radii)))
        k1 = np.sqrt(sum((c / a**2) ** 2 for c, a in zip(local, self.radii)))
        safe = np.maximum(k1, 1e-12)
        return np.where(k1 > 1e-12, k0 * (k0 - 1.0) / safe, -self.radii.min())


class Capsule(Shape):
    """Tapered capsule: segment ``p0 -> p1`` (mm) with radius ``r0 -> r1`` (mm)."""

    def __init__(self, p0, p1, r0, r1=None):
        self.p0 = np.asarray(p0, dtype=float)
        self.p1 = np.asarray(p1, dtype=float)
        self.r0, self.r1 = float(r0), float(r0 if r1 is None else r1)
        rmax = max(self.r0, self.r1)
        self.bbox = (np.minimum(self.p0, self.p1) - rmax, np.maximum(self.p0, self.p1) + rmax)

    def sdf(self, x, y, z):
        axis = self.p1 - self.p0
        rel = (x - self.p0[0], y - self.p0[1], z - self.p0[2])
        t = np.clip((rel[0] * axis[0] + rel[1] * axis[1] + rel[2] * axis[2]) / axis.dot(axis), 0, 1)
        dist = np.sqrt(sum((rel[i] - t * axis[i]) ** 2 for i in range(3)))
        return dist - (self.r0 + t * (self.r1 - self.r0))


class ProfileSolid(Shape):
    """Solid of varying super-elliptic cross-section along z.

    ``z_knots`` (mm, ascending) with per-knot centre ``cx, cy``, semi-axes ``a`` (x) and ``b``
    (y) and super-ellipse exponent ``n`` (2 = ellipse, larger = boxier), interpolated smoothly
    (monotone cubic). With ``capped`` the solid ends in flat caps at the first and last knot,
    otherwise it is an open tube (for shells such as the rib cage).
    """

    def __init__(self, z_knots, cx, cy, a, b, n=2.0, capped=True):
        z_knots = np.asarray(z_knots, dtype=float)
        self.z_range = (z_knots[0], z_knots[-1])
        self.capped = capped
        self._z = np.arange(z_knots[0], z_knots[-1] + 0.5, 0.5)
        values = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (cx, cy, a, b, n)))
        self._tables = [PchipInterpolator(z_knots, v * np.ones_like(z_knots))(self._z) for v in values]
        slope = np.maximum(np.abs(np.gradient(self._tables[2], self._z)),
                           np.abs(np.gradient(self._tables[3], self._z)))
        self._stretch = np.sqrt(1.0 + slope**2)
        cx_t, cy_t, a_t, b_t = self._tables[:4]
        self.bbox = (np.array([(cx_t - a_t).min(), (cy_t - b_t).min(), self.z_range[0]]),
                     np.array([(cx_t + a_t).max(), (cy_t + b_t).max(), self.z_range[1]]))

    def sdf(self, x, y, z):
        zc = np.clip(z, *self.z_range)
        cx, cy, a, b, n = (np.interp(zc, self._z, t) for t in self._tables)
        u = np.abs(x - cx) / a
        w = np.abs(y - cy) / b
        f = (u**n + w**n) ** (1.0 / n)
        grad = np.sqrt((u ** (n - 1) / a) ** 2 + (w ** (n - 1) / b) ** 2) / np.maximum(f, 1e-12) ** (n - 1)
        d = np.where(grad > 1e-12, (f - 1.0) / np.maximum(grad, 1e-12), -np.minimum(a, b))
        d = d / np.interp(zc, self._z, self._stretch)
        if self.capped:
            d = np.maximum(d, np.maximum(self.z_range[0] - z, z - self.z_range[1]))
        return d


class ZBands(Shape):
    """Periodic slabs across z (e.g. ribs, vertebrae): band centres at ``z0 + k * period`` shifted
    by ``tilt * y`` (mm per mm), each ``width`` mm thick. Unbounded: use inside an Intersection."""

    def __init__(self, z0, period, width, tilt=0.0):
        self.z0, self.period, self.width, self.tilt = z0, period, width, tilt

    def sdf(self, x, y, z):
        phase = np.mod(z - self.tilt * y - self.z0 + self.period / 2, self.period) - self.period / 2
        return np.abs(phase) - self.width / 2


class HalfSpace(Shape):
    """Points on the side of a plane opposite to the unit ``normal`` through ``point``."""

    def __init__(self, point, normal):
        self.point = np.asarray(point, dtype=float)
        normal = np.asarray(normal, dtype=float)
        self.normal = normal / np.linalg.norm(normal)

    def sdf(self, x, y, z):
        p, n = self.point, self.normal
        return (x - p[0]) * n[0] + (y - p[1]) * n[1] + (z - p[2]) * n[2]


class Union(Shape):
    """Union of shapes; ``smooth`` (mm) > 0 blends the joints (polynomial smooth minimum)."""

    def __init__(self, shapes, smooth=0.0):
        self.shapes, self.smooth = list(shapes), float(smooth)
        self.bbox = (np.min([s.bbox[0] for s in self.shapes], axis=0),
                     np.max([s.bbox[1] for s in self.shapes], axis=0))

    def sdf(self, x, y, z):
        d = self.shapes[0].sdf(x, y, z)
        for shape in self.shapes[1:]:
            e = shape.sdf(x, y, z)
            if self.smooth > 0:
                h = np.maximum(self.smooth - np.abs(d - e), 0.0) / self.smooth
                d = np.minimum(d, e) - h * h * self.smooth / 4.0
            else:
                d = np.minimum(d, e)
        return d


class Intersection(Shape):
    """Intersection of shapes."""

    def __init__(self, shapes):
        self.shapes = list(shapes)
        self.bbox = (np.max([s.bbox[0] for s in self.shapes], axis=0),
                     np.min([s.bbox[1] for s in self.shapes], axis=0))

    def sdf(self, x, y, z):
        d = self.shapes[0].sdf(x, y, z)
        for shape in self.shapes[1:]:
            d = np.maximum(d, shape.sdf(x, y, z))
        return d


class Offset(Shape):
    """The shape grown by ``delta`` mm (shrunk when negative)."""

    def __init__(self, shape, delta):
        self.shape, self.delta = shape, float(delta)
        grow = max(self.delta, 0.0)
        self.bbox = (shape.bbox[0] - grow, shape.bbox[1] + grow)

    def sdf(self, x, y, z):
        return self.shape.sdf(x, y, z) - self.delta


class Shell(Shape):
    """The inner layer of ``thickness`` mm just under the surface of a shape."""

    def __init__(self, shape, thickness):
        self.shape, self.thickness = shape, float(thickness)
        self.bbox = shape.bbox

    def sdf(self, x, y, z):
        d = self.shape.sdf(x, y, z)
        return np.maximum(d, -(d + self.thickness))


class Perturbed(Shape):
    """The shape with a smooth random surface displacement of up to ``amplitude`` mm made of
    ``n_waves`` plane waves of wavelength ``wavelength_mm`` (random directions and phases)."""

    def __init__(self, shape, amplitude, wavelength_mm, rng, n_waves=3):
        self.shape, self.amplitude = shape, float(amplitude)
        directions = rng.normal(size=(n_waves, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        self.wave_vectors = directions * (2 * np.pi / wavelength_mm)
        self.phases = rng.uniform(0, 2 * np.pi, n_waves)
        self.bbox = (shape.bbox[0] - self.amplitude, shape.bbox[1] + self.amplitude)

    def sdf(self, x, y, z):
        wave = sum(np.sin(k[0] * x + k[1] * y + k[2] * z + phase)
                   for k, phase in zip(self.wave_vectors, self.phases))
        return self.shape.sdf(x, y, z) + self.amplitude * wave / len(self.phases)


class VoxelGrid:
    """Voxel centres of an ``(X, Y, Z)`` grid: ``origin`` (mm, centre of voxel 0) + index * voxel."""

    def __init__(self, shape, voxel_mm, origin_mm):
        self.shape = tuple(int(n) for n in shape)
        self.voxel = np.asarray(voxel_mm, dtype=float)
        self.origin = np.asarray(origin_mm, dtype=float)
        self.axes = [self.origin[i] + self.voxel[i] * np.arange(self.shape[i]) for i in range(3)]

    def affine(self):
        """4x4 voxel-index -> mm matrix."""
        affine = np.diag(np.append(self.voxel, 1.0))
        affine[:3, 3] = self.origin
        return affine

    def box(self, bbox, margin_mm):
        """Index slices of the voxels within ``bbox`` grown by ``margin_mm``; None if empty."""
        slices = []
        for i in range(3):
            lo = np.floor((bbox[0][i] - margin_mm - self.origin[i]) / self.voxel[i]) if np.isfinite(bbox[0][i]) else 0
            hi = np.ceil((bbox[1][i] + margin_mm - self.origin[i]) / self.voxel[i]) + 1 if np.isfinite(bbox[1][i]) else self.shape[i]
            lo, hi = int(max(lo, 0)), int(min(hi, self.shape[i]))
            if hi <= lo:
                return None
            slices.append(slice(lo, hi))
        return tuple(slices)


_CHUNK_POINTS = 1 << 21  # SDF evaluations per block (bounds the temporaries' memory)


def voxel_fraction(shape, grid, supersample=2):
    """Fraction of each voxel inside ``shape``: returns ``(slices, fraction float32)`` over the
    shape's bounding box in ``grid``, or None when the shape misses the grid."""
    diagonal = float(np.linalg.norm(grid.voxel))
    slices = grid.box(shape.bbox, diagonal)
    if slices is None:
        return None
    x, y, z = (grid.axes[i][slices[i]] for i in range(3))
    fraction = np.empty((len(x), len(y), len(z)), np.float32)
    step = max(1, _CHUNK_POINTS // (len(x) * len(y)))
    for k in range(0, len(z), step):
        fraction[..., k:k + step] = _fraction_block(shape, x, y, z[k:k + step], grid.voxel, supersample)
    if not fraction.any():
        return None
    return slices, fraction


def _fraction_block(shape, x, y, z, voxel, supersample):
    h = float(voxel.mean())
    d = np.broadcast_to(shape.sdf(x[:, None, None], y[None, :, None], z[None, None, :]),
                        (len(x), len(y), len(z)))
    fraction = np.clip(0.5 - d / h, 0.0, 1.0)
    if supersample > 1:
        near = np.nonzero(np.abs(d) < 0.75 * float(np.linalg.norm(voxel)))
        steps = (np.arange(supersample) + 0.5) / supersample - 0.5
        offsets = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), -1).reshape(-1, 3) * voxel
        per_block = max(1, _CHUNK_POINTS // len(offsets))
        for start in range(0, near[0].size, per_block):
            i, j, k = (axis[start:start + per_block] for axis in near)
            fine = shape.sdf(x[i][:, None] + offsets[:, 0], y[j][:, None] + offsets[:, 1],
                             z[k][:, None] + offsets[:, 2])
            fraction[i, j, k] = np.clip(0.5 - fine * (supersample / h), 0.0, 1.0).mean(axis=1)
    return fraction


class Outside(Shape):
    """Everything outside ``shape`` (its complement). Unbounded: use inside an Intersection."""

    def __init__(self, shape):
        self.shape = shape

    def sdf(self, x, y, z):
        return -self.shape.sdf(x, y, z)


class RoundedBox(Shape):
    """Box of half-sizes ``half_mm`` (mm) along the columns of ``rotation`` about ``center``,
    its edges and corners rounded with radius ``rounding_mm`` (exact signed distance)."""

    def __init__(self, center, half_mm, rounding_mm, rotation=None):
        self.center = np.asarray(center, dtype=float)
        self.half = np.asarray(half_mm, dtype=float)
        self.rounding = float(min(rounding_mm, self.half.min()))
        self.rotation = np.eye(3) if rotation is None else np.asarray(rotation, dtype=float)
        extent = np.abs(self.rotation) @ self.half
        self.bbox = (self.center - extent, self.center + extent)

    def sdf(self, x, y, z):
        d = (x - self.center[0], y - self.center[1], z - self.center[2])
        r = self.rotation
        q = [np.abs(r[0, i] * d[0] + r[1, i] * d[1] + r[2, i] * d[2]) - (self.half[i] - self.rounding)
             for i in range(3)]
        outside = np.sqrt(sum(np.maximum(c, 0.0) ** 2 for c in q))
        inside = np.minimum(np.maximum(np.maximum(q[0], q[1]), q[2]), 0.0)
        return outside + inside - self.rounding


class Soft(Shape):
    """The shape with a soft edge: its partial-volume ramp ``width_mm`` wide instead of one
    sub-sample (``sample_mm`` = voxel / supersample of the :func:`voxel_fraction` call)."""

    def __init__(self, shape, width_mm, sample_mm):
        self.shape = shape
        self.scale = float(sample_mm) / float(width_mm)
        grow = float(width_mm) / 2
        self.bbox = (shape.bbox[0] - grow, shape.bbox[1] + grow)

    def sdf(self, x, y, z):
        return self.scale * self.shape.sdf(x, y, z)


class Blob(Shape):
    """Thresholded smooth noise: the points where ``1 - (|p - center| / radius)**2 + roughness *
    noise(p)`` is positive, ``noise`` a unit-std :class:`~.fields.LatticeField` clipped to +-1.5
    (so the blob stays within 1.25 radii). Distances are first order (exact for a sphere)."""

    def __init__(self, center, radius_mm, noise, roughness=0.35):
        self.center = np.asarray(center, dtype=float)
        self.radius, self.noise, self.roughness = float(radius_mm), noise, float(roughness)
        self.bbox = (self.center - 1.25 * self.radius, self.center + 1.25 * self.radius)

    def sdf(self, x, y, z):
        rho2 = ((x - self.center[0]) ** 2 + (y - self.center[1]) ** 2 + (z - self.center[2]) ** 2) / self.radius**2
        bump = self.roughness * np.clip(self.noise(x, y, z), -1.5, 1.5)
        return -(1.0 - rho2 + bump) * self.radius / 2


def sample_inside(rng, shape, n, margin_mm=0.0):
    """Up to ``n`` points (m, 3) in mm drawn uniformly inside ``shape`` at least ``margin_mm`` from
    its surface (rejection sampling in its bounding box, which must be finite)."""
    low, high = shape.bbox
    found = []
    for _ in range(20):
        points = rng.uniform(low, high, size=(4 * n + 64, 3))
        found += list(points[shape.sdf(points[:, 0], points[:, 1], points[:, 2]) < -margin_mm])
        if len(found) >= n:
            break
    return np.array(found[:n]).reshape(-1, 3)
