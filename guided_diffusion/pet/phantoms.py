"""Procedural whole-body PET phantoms: activity (SUV), attenuation (1/mm at 511 keV), labels.

A subject is built from smooth solids (see the shape section below) placed in a canonical adult
anatomy, measured in mm down from the vertex, and randomised per seed: height, width and depth
of the body, fat layer, bladder filling, every organ's position, size, orientation and surface,
the organ SUVs (tracer table with per-subject spread) and the lesions. Volumes are voxelised with
partial-volume fractions, so edges are smooth rather than blocky, and carry a mild low-frequency
texture inside organs.

World coordinates follow DICOM LPS: x towards the patient's left, y towards posterior, z towards
the head; arrays are ``(X, Y, Z)`` with Z running feet -> head. The phantom covers the vertex
down to the thighs (a whole-body PET field of view, ~1 m) unless ``fov_mm`` says otherwise.
"""

import dataclasses

import numpy as np
from scipy import ndimage
from scipy.interpolate import PchipInterpolator

from .tracers import ATTENUATION_PER_MM, LESION_ATTENUATION_PER_MM, get_tracer

# ----------------------------------------------------------------------------------------------
# Shapes: smooth solids as approximate signed distance functions (SDF), and their voxelisation.
#
# A shape is a function of world coordinates ``(x, y, z)`` in mm returning the signed distance to
# its surface in mm (negative inside), plus an axis-aligned bounding box. The distances are the
# usual first-order approximations (exact for spheres, capsules and planes, accurate to a fraction
# of a millimetre near the surface of ellipsoids), which is what the partial-volume fractions need.
# Coordinates broadcast, so a shape can be evaluated on ``(X, 1, 1) x (1, Y, 1) x (1, 1, Z)`` grid
# axes or on flat point lists alike.
#
# :func:`voxel_fraction` turns a shape into the fraction of each voxel it covers: an analytic
# ramp ``clip(1/2 - d / h, 0, 1)`` (exact for a plane crossing the voxel along an axis) at the voxel
# centre, refined near the surface by averaging ``supersample**3`` sub-voxel ramps.
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# Anatomy, tracers and the phantom
# ----------------------------------------------------------------------------------------------

ORGAN_NAMES = (
    "background", "fat", "muscle", "bone", "spine", "brain_gm", "brain_wm", "cerebellum",
    "salivary", "lung", "myocardium", "blood_pool", "liver", "spleen", "stomach", "bowel",
    "kidney_cortex", "kidney_medulla", "bladder",
)
ORGAN_LABELS = {name: index for index, name in enumerate(ORGAN_NAMES)}

DEFAULT_VOXEL_MM = 1.65
DEMO_VOXEL_MM = 3.3
DEFAULT_FOV_MM = (528.0, 330.0, 1000.0)  # (X lateral, Y antero-posterior, Z axial)

# Relative amplitude (std) of the smooth multiplicative texture inside each organ.
TEXTURE_AMPLITUDE = {
    "fat": 0.10, "muscle": 0.08, "bone": 0.10, "spine": 0.08, "lung": 0.10, "stomach": 0.15,
    "blood_pool": 0.02, "myocardium": 0.08, "bladder": 0.0, "bowel": 0.35,
}
DEFAULT_TEXTURE_AMPLITUDE = 0.05
TEXTURE_CORRELATION_MM = 30.0
BOWEL_TEXTURE_CORRELATION_MM = 10.0

LESION_MAX_DIAMETER_MM = {"lung": 30.0, "liver": 30.0, "bone": 20.0, "lymph_node": 25.0}
LESION_MIN_DIAMETER_MM = 4.0
LESION_HOSTS = {"lung": ("lung",), "liver": ("liver",), "bone": ("spine",)}


@dataclasses.dataclass
class Phantom:
    """One procedural subject. Arrays are ``(X, Y, Z)``.

    activity: float32 SUV (g/mL); mu: float32 attenuation at 511 keV in 1/mm;
    organ_labels: int16 ids of :data:`ORGAN_LABELS`; lesion_labels: int16, 0 = none, k = lesion k;
    lesions: one dict per lesion (id, organ, host, center_mm, radii_mm, suv = uptake painted,
    mean_suv = true mean activity inside its label, n_voxels, volume_ml);
    affine: 4x4 voxel index -> mm; voxel_mm: (3,) mm; uptake: organ -> SUV drawn for this subject.
    """

    activity: np.ndarray
    mu: np.ndarray
    organ_labels: np.ndarray
    lesion_labels: np.ndarray
    lesions: list
    affine: np.ndarray
    voxel_mm: tuple
    tracer: str
    seed: int
    uptake: dict


class _Subject:
    """Canonical adult anatomy (mm: x lateral, y posterior, d down from the vertex) mapped into
    the world with this subject's scales, offsets and per-organ random jitter."""

    def __init__(self, rng, fov_mm, z_top, arms):
        self.rng = rng
        half_x, half_y = fov_mm[0] / 2, fov_mm[1] / 2
        self.arms = arms
        widest = 232.0 if arms else 168.0
        self.sw = float(np.clip(rng.uniform(0.86, 1.1), 0.8, max(0.8, (half_x - 8) / widest)))
        self.belly = float(rng.uniform(0.0, 25.0))
        deepest = 117.0 + self.belly
        self.sap = float(np.clip(self.sw * rng.uniform(0.92, 1.12), 0.8, max(0.8, (half_y - 10) / deepest)))
        self.sh = float(rng.uniform(0.92, 1.06))
        self.fat_mm = float(rng.uniform(5.0, 12.0) + 0.5 * self.belly)
        self.x0, self.y0 = rng.normal(0.0, 4.0, 2)
        self.z_top = z_top

    def point(self, x, y, d):
        """World mm of a canonical point."""
        return np.array([self.x0 + x * self.sw, self.y0 + y * self.sap, self.z_top - d * self.sh])

    def radii(self, rx, ry, rz):
        return np.array([rx * self.sw, ry * self.sap, rz * self.sh])

    def organ(self, center, radii, degrees=(0, 0, 0), jitter_mm=4.0, size_sd=0.08,
              angle_sd=6.0, surface_mm=0.0):
        """A randomised ellipsoid around a canonical centre/radii/orientation."""
        rng = self.rng
        c = self.point(*center) + rng.normal(0, jitter_mm, 3)
        r = self.radii(*radii) * np.exp(rng.normal(0, size_sd, 3))
        rot = rotation_matrix(np.asarray(degrees, dtype=float) + rng.normal(0, angle_sd, 3))
        shape = Ellipsoid(c, r, rot)
        if surface_mm > 0:
            shape = Perturbed(shape, surface_mm, rng.uniform(40, 90), rng)
        return shape

    def capsule(self, p0, p1, r0, r1=None):
        r_scale = np.sqrt(self.sw * self.sap)
        return Capsule(self.point(*p0), self.point(*p1), r0 * r_scale, (r0 if r1 is None else r1) * r_scale)

    def profile(self, d, cx, cy, a, b, n=2.0, capped=True):
        """ProfileSolid from canonical knots listed head -> feet."""
        d = np.asarray(d, dtype=float)
        order = np.argsort(self.z_top - d * self.sh)
        arrays = [np.broadcast_to(np.asarray(v, dtype=float), d.shape)[order] for v in (cx, cy, a, b, n)]
        return ProfileSolid((self.z_top - d * self.sh)[order], self.x0 + arrays[0] * self.sw,
                            self.y0 + arrays[1] * self.sap, arrays[2] * self.sw, arrays[3] * self.sap,
                            arrays[4], capped=capped)


def _body(s):
    """Outer body surface, the head ellipsoid and the arm axes (for the arm bones)."""
    belly = s.belly * np.array([0, 0, 0, 0, 0, 0, 0.3, 0.9, 1.0, 0.7, 0.3, 0, 0])
    d = [190, 250, 275, 300, 330, 400, 480, 560, 640, 720, 790, 850, 905]
    torso = s.profile(
        d, cx=0.0,
        cy=np.array([10, 15, 12, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0]) - belly / 2,
        a=np.array([50, 52, 80, 135, 150, 150, 145, 140, 138, 150, 160, 162, 150]) + belly / 3,
        b=np.array([52, 55, 70, 90, 100, 108, 112, 112, 112, 110, 108, 100, 90]) + belly / 2,
        n=[2.0, 2.0, 2.1, 2.2, 2.3, 2.3, 2.3, 2.4, 2.4, 2.5, 2.6, 2.6, 2.6])
    head = s.organ((0, 0, 115), (72, 92, 112), jitter_mm=1.0, size_sd=0.04, angle_sd=2.0)
    parts = [head, torso]
    for side in (-1, 1):
        parts.append(s.capsule((side * 85, 5, 830), (side * 95, 10, 1400), 80, 55))
    body = Union(parts, smooth=25.0)
    arm_axes = []
    if s.arms:
        arm_parts = []
        for side in (-1, 1):
            shoulder, elbow, wrist = (side * 190, 5, 335), (side * 198, 10, 600), (side * 203, 0, 850)
            arm_parts += [s.capsule(shoulder, elbow, 45, 35), s.capsule(elbow, wrist, 35, 26),
                          s.organ((side * 205, -5, 930), (16, 40, 75), jitter_mm=2.0, size_sd=0.05)]
            arm_axes += [(shoulder, elbow), (elbow, wrist)]
        body = Union([body] + arm_parts, smooth=12.0)
    return body, head, arm_axes


def _skeleton(s, arm_axes):
    """(organ, shape) layers of the bones."""
    rng = s.rng
    spine_d = [180, 260, 330, 450, 560, 650, 740, 790]
    spine_cy = np.array([20, 35, 70, 78, 70, 55, 50, 60])
    spine_r = np.array([12, 13, 15, 17, 20, 22, 24, 24])
    period = rng.uniform(25, 29) * s.sh
    bands = ZBands(rng.uniform(0, period), period, 0.8 * period)
    bodies = Intersection([s.profile(spine_d, 0.0, spine_cy, spine_r, 0.85 * spine_r), bands])
    processes = Intersection([s.profile(spine_d[1:-1], 0.0, spine_cy[1:-1] + spine_r[1:-1] + 14, 6, 14), bands])
    rib_d = [318, 400, 500, 600]
    rib_cage = s.profile(rib_d, 0.0, 0.0, [118, 136, 136, 128], [86, 96, 100, 96], n=2.2, capped=False)
    rib_period = rng.uniform(23, 27) * s.sh
    ribs = Intersection([Shell(rib_cage, 7.0),
                         ZBands(rng.uniform(0, rib_period), rib_period, 9.0, tilt=-0.35),
                         s.profile([rib_d[0], rib_d[-1]], 0.0, 0.0, 300, 300)])
    layers = [("bone", processes), ("spine", bodies),
              ("spine", s.organ((0, 75, 800), (42, 18, 50), degrees=(30, 0, 0), jitter_mm=2.0)),
              ("bone", ribs),
              ("bone", s.organ((0, -100, 440), (14, 7, 75), jitter_mm=2.0, size_sd=0.05))]
    for side in (-1, 1):
        layers += [
            ("bone", s.organ((side * 90, 40, 745), (55, 8, 50), degrees=(0, 0, side * 35), jitter_mm=2.0)),
            ("bone", s.capsule((side * 15, -60, 892), (side * 80, 5, 862), 9)),
            ("bone", s.organ((side * 88, 5, 858), (23, 23, 23), jitter_mm=1.5, size_sd=0.04)),
            ("bone", s.capsule((side * 88, 5, 858), (side * 110, 10, 900), 14)),
            ("bone", s.capsule((side * 110, 10, 900), (side * 100, 15, 1400), 14)),
            ("bone", s.capsule((side * 20, -70, 305), (side * 125, -20, 300), 8)),
        ]
    layers += [("bone", s.capsule(p0, p1, 11, 9)) for p0, p1 in arm_axes]
    return layers


def _brain(s, head):
    """Brain, cerebellum and skull placed inside the head ellipsoid, plus the salivary glands."""
    def inner(offset_xyz, scale_xyz, size_sd):
        offset = np.array(offset_xyz) * [s.sw, s.sap, s.sh]
        radii = head.radii * np.array(scale_xyz) * np.exp(s.rng.normal(0, size_sd, 3))
        return Ellipsoid(head.center + offset, radii, head.rotation)

    brain = inner((0, 0, 25), (57 / 72, 77 / 92, 68 / 112), 0.02)
    cerebellum = inner((0, 45, -35), (46 / 72, 27 / 92, 22 / 112), 0.04)
    skull = Shell(Union([Ellipsoid(brain.center, brain.radii + 8, brain.rotation),
                         Ellipsoid(cerebellum.center, cerebellum.radii + 8, cerebellum.rotation)],
                        smooth=15.0), 7.0)
    white = Perturbed(Offset(brain, -s.rng.uniform(8.0, 10.0)), 2.5, 18.0, s.rng, n_waves=6)
    layers = [("bone", skull), ("brain_gm", brain), ("brain_wm", white), ("cerebellum", cerebellum)]
    for side in (-1, 1):
        layers += [("brain_gm", s.organ((side * 17, 0, 100), (10, 18, 11), jitter_mm=1.0)),
                   ("salivary", s.organ((side * 42, 5, 180), (12, 18, 20), jitter_mm=2.0)),
                   ("salivary", s.organ((side * 25, -35, 200), (10, 11, 9), jitter_mm=2.0))]
    return layers


def _thorax_abdomen(s):
    rng = s.rng
    lv = s.organ((38, -38, 485), (36, 32, 46), degrees=(20, 0, -30), jitter_mm=3.0, size_sd=0.06)
    liver = Intersection([s.organ((-45, -5, 565), (85, 85, 78), degrees=(0, 0, 15), surface_mm=4.0),
                          HalfSpace(s.point(30, 0, 600), (0.75, 0, -0.66))])
    bladder_r = rng.uniform(22, 42)
    aorta_d = [385, 450, 550, 650, 740]
    layers = [
        ("lung", s.organ((-72, 8, 430), (55, 75, 125), surface_mm=3.0)),
        ("lung", s.organ((75, 8, 435), (52, 75, 120), surface_mm=3.0)),
        ("bowel", s.organ((0, -25, 725), (115, 70, 85), surface_mm=6.0)),
        ("liver", liver),
        ("spleen", s.organ((92, 45, 550), (28, 52, 50), degrees=(0, 0, -35), surface_mm=2.0)),
        ("stomach", s.organ((50, -40, 550), (45, 32, 58), degrees=(0, 20, 0), surface_mm=3.0)),
    ]
    for side, d in ((1, 635), (-1, 650)):
        kidney = s.organ((side * 68, 58, d), (28, 24, 55), degrees=(0, side * 15, side * 25), size_sd=0.06)
        layers += [("kidney_cortex", kidney), ("kidney_medulla", Offset(kidney, -rng.uniform(7, 9)))]
    layers += [
        ("bladder", s.organ((0, -30, 840), (bladder_r, 0.85 * bladder_r, 0.8 * bladder_r), size_sd=0.05)),
        ("blood_pool", s.organ((20, -35, 470), (55, 45, 58), degrees=(20, 0, -30), size_sd=0.06)),
        ("myocardium", lv),
        ("blood_pool", Offset(lv, -rng.uniform(9, 12))),
        ("blood_pool", s.profile(aorta_d, [12, 18, 12, 5, 0], [35, 38, 35, 15, 5], [13, 12, 11, 10, 9],
                                 [13, 12, 11, 10, 9])),
        ("blood_pool", s.capsule((5, -25, 410), (12, 35, 385), 13)),
        ("blood_pool", s.capsule((5, -30, 455), (5, -25, 410), 14)),
    ]
    return layers


# Canonical lymph-node stations (x, y, d): cervical, supraclavicular, axillary, mediastinal,
# hilar, para-aortic, iliac, inguinal.
_NODE_STATIONS = [(35, 0, 250), (60, -20, 300), (130, 20, 360), (0, -10, 410), (15, 0, 440),
                  (40, 15, 445), (25, 20, 680), (55, 0, 790), (85, -55, 880)]


def _smooth_field(rng, grid, correlation_mm):
    """Zero-mean, unit-std random field with ~``correlation_mm`` correlation length (X, Y, Z)."""
    step = correlation_mm / 2.0
    coarse_shape = [int(np.ceil(n * v / step)) + 3 for n, v in zip(grid.shape, grid.voxel)]
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape), 1.0, mode="wrap")
    coords = [(np.arange(n) * v) / step + 1.0 for n, v in zip(grid.shape, grid.voxel)]
    field = ndimage.map_coordinates(coarse, np.meshgrid(*coords, indexing="ij", sparse=False), order=1)
    field -= field.mean()
    return (field / max(field.std(), 1e-12)).astype(np.float32)


def _paint(volumes, fraction_box, envelope, suv_value, mu_value, label):
    """Blend one layer into (activity, mu, labels) with its partial-volume fraction.

    activity and mu hold tissue means per unit of body fraction (``envelope``), so a layer
    covering the fraction ``f`` of a voxel replaces the part ``f / envelope`` of its tissue;
    labels take the layer where it covers at least half the voxel.
    """
    activity, mu, labels = volumes
    slices, f = fraction_box
    body = envelope[slices]
    share = np.divide(f, body, out=np.zeros_like(f), where=body > 0)
    activity[slices] += share * (suv_value - activity[slices])
    mu[slices] += share * (mu_value - mu[slices])
    labels[slices][f >= 0.5] = label


def _fraction_in_body(shape, grid, supersample, envelope):
    """``voxel_fraction`` of a shape, limited to the body's own fraction ``envelope``."""
    box = voxel_fraction(shape, grid, supersample)
    if box is None:
        return None
    slices, fraction = box
    return slices, np.minimum(fraction, envelope[slices])


def phantom_grid(shape=None, voxel_mm=DEFAULT_VOXEL_MM, fov_mm=None):
    """The VoxelGrid of a phantom: ``shape`` (X, Y, Z) or ``fov_mm`` (default the whole-body FOV)
    at ``voxel_mm``, centred transaxially, z = 0 at the centre of the bottom slice."""
    voxel = np.broadcast_to(np.asarray(voxel_mm, dtype=float), (3,)).copy()
    if np.any(voxel <= 0):
        raise ValueError(f"voxel_mm must be positive, got {voxel_mm}")
    if shape is None:
        fov = np.asarray(DEFAULT_FOV_MM if fov_mm is None else fov_mm, dtype=float)
        if fov.shape != (3,) or np.any(fov <= 0):
            raise ValueError(f"fov_mm must be three positive lengths in mm, got {fov_mm}")
        shape = np.maximum(np.round(fov / voxel).astype(int), 1)
    elif fov_mm is not None:
        raise ValueError("give either shape or fov_mm, not both")
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive sizes (X, Y, Z), got {shape}")
    origin = np.array([-(shape[0] - 1) / 2 * voxel[0], -(shape[1] - 1) / 2 * voxel[1], 0.0])
    return VoxelGrid(shape, voxel, origin)


def _draw_lesions(rng, tracer, grid, labels, subject):
    """Lesion ellipsoids: (site, host label name, Ellipsoid, SUV) placed in their host organs."""
    n_lesions = int(rng.integers(1, 7))
    sites = list(tracer.lesion_sites)
    weights = np.array([tracer.lesion_sites[k] for k in sites], dtype=float)
    placed = []
    for _ in range(n_lesions):
        site = sites[rng.choice(len(sites), p=weights / weights.sum())]
        diameter = np.exp(rng.uniform(np.log(LESION_MIN_DIAMETER_MM), np.log(LESION_MAX_DIAMETER_MM[site])))
        radii = diameter / 2 * np.exp(rng.normal(0, 0.1, 3))
        if site == "lymph_node":
            station = _NODE_STATIONS[rng.integers(len(_NODE_STATIONS))]
            side = rng.choice([-1, 1])
            center = subject.point(side * station[0], station[1], station[2]) + rng.normal(0, 6, 3)
        else:
            candidates = np.flatnonzero(np.isin(labels, [ORGAN_LABELS[h] for h in LESION_HOSTS[site]]))
            if candidates.size == 0:
                continue
            index = np.unravel_index(candidates[rng.integers(candidates.size)], labels.shape)
            center = np.array([grid.axes[i][index[i]] for i in range(3)])
        if any(np.linalg.norm(center - other.center) < radii.max() + other.radii.max() + 2 * grid.voxel.max()
               for _, _, other, _ in placed):
            continue
        index = tuple(int(np.clip(np.round((center[i] - grid.origin[i]) / grid.voxel[i]), 0, grid.shape[i] - 1))
                      for i in range(3))
        host = ORGAN_NAMES[labels[index]]
        suv = float(np.exp(rng.uniform(*np.log(tracer.lesion_suv))))
        shape = Ellipsoid(center, radii, rotation_matrix(rng.uniform(0, 180, 3)))
        placed.append((site, host, shape, suv))
    return placed


def make_phantom(seed, shape=None, voxel_mm=DEFAULT_VOXEL_MM, tracer="FDG", fov_mm=None,
                 arms=True, supersample=2):
    """Build a procedural whole-body subject.

    seed: int, fixes everything (anatomy, uptake, lesions); the anatomy does not depend on the
        tracer, so one seed gives the same body under every tracer.
    shape: (X, Y, Z) voxels, or None to derive it from ``fov_mm`` (default :data:`DEFAULT_FOV_MM`).
    voxel_mm: scalar or (3,) voxel size in mm (default 1.65; the CPU demo uses 3.3).
    tracer: a name in :data:`guided_diffusion.pet.tracers.TRACERS` (FDG, PSMA, DOTATATE, FAPI).
    arms: arms down along the body (True) or outside the field of view (False).
    supersample: sub-samples per axis used for partial-volume fractions near surfaces.
    The vertex sits just below the top slice; the grid is centred transaxially.
    """
    tracer = get_tracer(tracer)
    if int(supersample) < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    grid = phantom_grid(shape, voxel_mm, fov_mm)
    anatomy_seq, uptake_seq, texture_seq, lesion_seq = np.random.SeedSequence(int(seed)).spawn(4)
    anatomy_rng = np.random.default_rng(anatomy_seq)
    fov = np.array(grid.shape) * grid.voxel
    z_top = grid.origin[2] + fov[2] - grid.voxel[2] / 2 - anatomy_rng.uniform(5.0, 25.0)
    subject = _Subject(anatomy_rng, fov, z_top, arms)

    body, head, arm_axes = _body(subject)
    layers = [("fat", body), ("muscle", Offset(body, -subject.fat_mm))]
    layers += _thorax_abdomen(subject) + _brain(subject, head) + _skeleton(subject, arm_axes)

    uptake = tracer.draw_uptake(np.random.default_rng(uptake_seq))
    texture_rng = np.random.default_rng(texture_seq)
    texture = _smooth_field(texture_rng, grid, TEXTURE_CORRELATION_MM)
    bowel_texture = _smooth_field(texture_rng, grid, BOWEL_TEXTURE_CORRELATION_MM)

    activity = np.zeros(grid.shape, np.float32)
    mu = np.zeros(grid.shape, np.float32)
    labels = np.zeros(grid.shape, np.int16)
    envelope = np.zeros(grid.shape, np.float32)  # the body's fraction: nothing inside exceeds it
    body_box = voxel_fraction(body, grid, int(supersample))
    if body_box is None:
        raise ValueError(f"the field of view {tuple(fov)} mm misses the body")
    envelope[body_box[0]] = body_box[1]
    for organ, organ_shape in layers:
        box = _fraction_in_body(organ_shape, grid, int(supersample), envelope)
        if box is None:
            continue
        field = bowel_texture if organ == "bowel" else texture
        amplitude = TEXTURE_AMPLITUDE.get(organ, DEFAULT_TEXTURE_AMPLITUDE)
        value = np.maximum(uptake[organ] * (1.0 + amplitude * field[box[0]]), 0.0)
        _paint((activity, mu, labels), box, envelope, value, ATTENUATION_PER_MM[organ], ORGAN_LABELS[organ])

    lesion_labels = np.zeros(grid.shape, np.int16)
    lesions = []
    placed = _draw_lesions(np.random.default_rng(lesion_seq), tracer, grid, labels, subject)
    for site, host, lesion_shape, suv in placed:
        box = _fraction_in_body(lesion_shape, grid, 2 * int(supersample), envelope)  # small: finer
        if box is None:
            continue
        lesion_id = len(lesions) + 1
        slices, f = box
        _paint((activity, mu, lesion_labels), box, envelope, suv, LESION_ATTENUATION_PER_MM, lesion_id)
        if not (f >= 0.5).any():  # smaller than a voxel: label the voxel it covers most
            lesion_labels[slices][np.unravel_index(np.argmax(f), f.shape)] = lesion_id
        lesions.append({"id": lesion_id, "organ": site, "host": host,
                        "center_mm": [float(c) for c in lesion_shape.center],
                        "radii_mm": [float(r) for r in lesion_shape.radii], "suv": suv})
    activity *= envelope  # tissue means -> voxel values (air holds neither activity nor mu)
    mu *= envelope
    voxel_ml = float(np.prod(grid.voxel)) / 1000.0
    for lesion in lesions:
        inside = lesion_labels == lesion["id"]
        lesion["n_voxels"] = int(inside.sum())
        lesion["volume_ml"] = lesion["n_voxels"] * voxel_ml
        lesion["mean_suv"] = float(activity[inside].mean())

    return Phantom(activity=activity, mu=mu, organ_labels=labels, lesion_labels=lesion_labels,
                   lesions=lesions, affine=grid.affine(), voxel_mm=tuple(float(v) for v in grid.voxel),
                   tracer=tracer.name, seed=int(seed), uptake=uptake)
