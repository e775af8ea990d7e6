"""Procedural brain and dead-leaves anatomies: the scenes :func:`~.phantoms.make_phantom` paints.

A :class:`Scene` says what to paint, in world mm (DICOM LPS: x towards the patient's left, y
posterior, z towards the head; arrays ``(X, Y, Z)`` with Z running feet -> head): the body
envelope (its partial-volume fraction bounds everything inside it), the tissue layers in painting
order (later layers cover earlier ones), the texture fields, the lesions and the parameters drawn
for the subject.

``brain`` (:func:`brain_scene`): a head of scalp, skull and CSF around a folded cerebral cortex:
a grey-matter ribbon ``cortex_mm`` thick that lines the outer surface, the interhemispheric
fissure and every sulcus, over white matter. Sulci are thin CSF clefts that run radially inwards
along the zero lines of a smooth random field on the sphere (primary and shallower secondary
sulci), so the ribbon follows a folded pial surface; the cerebellum has finer, parallel folia.
Deep grey nuclei, ventricles, brainstem and cord, cervical spine and salivary glands complete it.

``dead_leaves`` (:func:`dead_leaves_scene`): a generic random-structure class: hundreds of
occluding shapes (ellipsoids, rounded boxes, noise blobs, thin tubes) with power-law radii, with
log-normal SUVs (some cold), sharp or soft edges and multi-scale textures, in an ellipsoidal body.
"""

import dataclasses
from typing import NamedTuple

import numpy as np

from .fields import LatticeField, SphereTable, mix_fields, noise_field, sphere_directions, zero_line_distance
from .shapes import (Blob, Capsule, Ellipsoid, HalfSpace, Intersection, Offset, Outside, Perturbed,
                     RoundedBox, Shape, Shell, Soft, Union, ZBands, rotation_matrix, sample_inside)
from .tracers import ATTENUATION_PER_MM


class Layer(NamedTuple):
    """One painted solid: label ``organ`` (a name of ``phantoms.ORGAN_LABELS``) over ``shape``,
    with its SUV, attenuation (1/mm) and relative texture amplitude (None: the organ's entry of
    the subject's uptake, of ``ATTENUATION_PER_MM`` and of ``phantoms.TEXTURE_AMPLITUDE``),
    the texture being the scene's field named ``field``."""

    organ: str
    shape: Shape
    suv: float = None
    mu: float = None
    texture: float = None
    field: str = "organ"


@dataclasses.dataclass
class Scene:
    """What to paint: ``envelope`` (Shape), ``layers`` (list of :class:`Layer`), ``fields`` (name
    -> unit-std float32 texture (X, Y, Z)), ``lesions`` (list of (site, Ellipsoid, SUV); None
    when they are drawn from the painted labels) and ``params`` (drawn parameters, mm)."""

    envelope: Shape
    layers: list
    fields: dict
    lesions: list = None
    params: dict = dataclasses.field(default_factory=dict)


def clear_of(center, radius_mm, others, gap_mm):
    """Whether a ball of ``radius_mm`` at ``center`` keeps ``gap_mm`` from every Ellipsoid of
    ``others`` (each taken as the ball of its largest radius)."""
    return all(np.linalg.norm(center - other.center) >= radius_mm + other.radii.max() + gap_mm
               for other in others)


def _log_uniform(rng, low, high):
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _ellipsoid_lesion(rng, center, diameter_mm):
    """A lesion ellipsoid of about ``diameter_mm`` at ``center``, random axes and orientation."""
    radii = diameter_mm / 2 * np.exp(rng.normal(0, 0.12, 3))
    return Ellipsoid(center, radii, rotation_matrix(rng.uniform(0, 180, 3)))


def _place_lesions(rng, region, specs, gap_mm):
    """(site, Ellipsoid, SUV) for each (site, diameter mm, SUV) of ``specs`` centred inside
    ``region`` half a radius from its surface, skipping those that would touch an earlier one."""
    placed = []
    for site, diameter, suv in specs:
        center = sample_inside(rng, region, 1, margin_mm=diameter / 4)
        if len(center) == 0:
            continue
        shape = _ellipsoid_lesion(rng, center[0], diameter)
        if clear_of(shape.center, shape.radii.max(), [p[1] for p in placed], gap_mm):
            placed.append((site, shape, suv))
    return placed


# ----------------------------------------------------------------------------------------------
# Brain
# ----------------------------------------------------------------------------------------------

HEAD_FOV_MM = (200.0, 240.0, 200.0)  # (X lateral, Y antero-posterior, Z axial)

CORTEX_MM = (2.5, 4.5)  # grey-matter ribbon thickness, drawn per subject
GYRAL_WAVELENGTH_MM = (12.0, 18.0)  # mean sulcus to sulcus spacing along the surface
SULCAL_DEPTH_MM = (8.0, 15.0)  # the deepest sulci; depth varies over the surface
SULCAL_GAP_MM = (0.8, 1.8)  # CSF width of a sulcus
CEREBRUM_RADII_MM = (67.0, 83.0, 57.0)
HEMISPHERE_OFFSET = 0.45  # the sulci of a hemisphere radiate from this far out (x its lateral radius)
FOLIA_SPACING_MM, FOLIA_GAP_MM = 8.0, 0.6  # cerebellar fissures
BRAIN_TEXTURE_MM = ((30.0, 8.0, 3.0), (1.0, 0.6, 0.4))  # texture scales and their weights
_SPHERE_ROWS = 180  # polar rows of the direction tables (1 degree steps)


class FoldedSolid(Shape):
    """``solid`` cut by sulcal clefts ``gap_mm`` wide: sheets through ``center`` along the zero
    lines of direction fields, from the solid's surface down to their depth, and no closer to
    the centre than ``min_radius_mm`` (where the zero lines would crowd). ``table`` (a
    :class:`~.fields.SphereTable`) holds two rows per family of clefts: the signed angular
    distance (radians) to the nearest zero line, and the depth (mm). The distance to a cleft is
    that to a box: tangential distance beside it, distance to its floor below it. ``parts`` is
    one (centre, table), or two split by ``plane`` = (point, unit normal): points behind the
    plane take the first (one centre per hemisphere, so the clefts meet the medial surfaces
    square rather than as rays from the middle)."""

    def __init__(self, solid, parts, gap_mm, min_radius_mm=0.0, plane=None):
        self.solid, self.gap, self.min_radius = solid, float(gap_mm), float(min_radius_mm)
        self.parts = [(np.asarray(c, dtype=float), table) for c, table in parts]
        self.plane = None if plane is None else tuple(np.asarray(v, dtype=float) for v in plane)
        self.bbox = solid.bbox

    def sdf(self, x, y, z):
        solid = self.solid.sdf(x, y, z)
        shape = solid.shape
        if self.plane is None:
            side = np.zeros(shape, dtype=np.intp)
        else:
            point, normal = self.plane
            side = ((x - point[0]) * normal[0] + (y - point[1]) * normal[1] + (z - point[2]) * normal[2] >= 0)
            side = np.broadcast_to(side, shape).astype(np.intp)
        centers = np.array([c for c, _ in self.parts])[side]  # (..., 3)
        dx, dy, dz = (np.broadcast_to(v, shape) - centers[..., i] for i, v in enumerate((x, y, z)))
        r = np.maximum(np.sqrt(dx * dx + dy * dy + dz * dz), 1e-6)
        rows = np.empty((len(self.parts[0][1].values),) + shape)
        for i, (_, table) in enumerate(self.parts):
            mine = side == i
            rows[:, mine] = table(dx[mine] / r[mine], dy[mine] / r[mine], dz[mine] / r[mine])
        d = solid
        for angle, depth in zip(rows[0::2], rows[1::2]):
            beside = np.abs(angle) * r - self.gap / 2
            below = np.maximum(-solid - depth, self.min_radius - r)
            cleft = (np.sqrt(np.maximum(beside, 0.0) ** 2 + np.maximum(below, 0.0) ** 2)
                     + np.minimum(np.maximum(beside, below), 0.0))
            d = np.maximum(d, -cleft)
        return d


def _sulcal_fields(rng, low_mm, high_mm, wavelength_mm):
    """The fields (world mm) whose zero lines on the brain surface are the sulci: deep ones and
    shallower ones, ``wavelength_mm`` / 0.6 and / 0.4 apart, so that a line along the surface
    crosses a sulcus every ``wavelength_mm``; and a smooth field that modulates the depths."""
    return (LatticeField(rng, low_mm, high_mm, wavelength_mm / 0.6 / 2.2),
            LatticeField(rng, low_mm, high_mm, wavelength_mm / 0.4 / 2.2), LatticeField(rng, low_mm, high_mm, 45.0))


def _hemisphere_reach(hemisphere, origin, point, normal):
    """Distance (mm) from ``origin`` along unit vectors (..., 3) to the surface of the
    ``hemisphere`` ellipsoid or to the midline plane (``point``, ``normal``), whichever is nearer."""
    rotation, radii = hemisphere.rotation, hemisphere.radii
    q = (rotation.T @ (origin - hemisphere.center)) / radii
    across = float(normal @ (point - origin))

    def reach(u):
        a = (u @ rotation) / radii
        aa, aq = (a * a).sum(-1), (a * q).sum(-1)
        to_ellipsoid = (-aq + np.sqrt(aq * aq - aa * (q @ q - 1.0))) / aa
        towards = u @ normal * np.sign(across)
        to_plane = np.where(towards > 1e-6, abs(across) / np.maximum(towards, 1e-6), np.inf)
        return np.minimum(to_ellipsoid, to_plane)

    return reach


def _sulci(fields, origin, reach, depth_mm):
    """SphereTable rows of one hemisphere's sulci seen from ``origin``: the fields are read where
    each direction meets the hemisphere's surface (``reach``), so the sulci are spaced in mm on
    the surface; deep sulci up to ``depth_mm`` (0.4 - 1 x over the surface), shallow ones half."""
    def on_surface(field):
        return lambda u: field(*np.moveaxis(origin + reach(u)[..., None] * u, -1, 0))

    deep, shallow, modulation = (on_surface(field) for field in fields)
    depth = depth_mm * np.clip(0.75 + 0.25 * modulation(sphere_directions(_SPHERE_ROWS)[0]), 0.4, 1.0)
    return SphereTable([zero_line_distance(deep, _SPHERE_ROWS), depth,
                        zero_line_distance(shallow, _SPHERE_ROWS), 0.5 * depth])


def _folia(rng, radius_mm, spacing_mm, depth_mm):
    """SphereTable rows of the cerebellar folia: parallel transverse fissures (zero lines of
    ``sin(k psi + noise)``, psi the angle about the x axis) about ``spacing_mm`` apart on a
    sphere of ``radius_mm``."""
    k = max(4, int(round(2 * np.pi * radius_mm / spacing_mm)))
    noise = LatticeField(rng, (-radius_mm - 5,) * 3, (radius_mm + 5,) * 3, 1.5 * radius_mm)

    def folia(u):
        return np.sin(k * np.arctan2(u[..., 2], u[..., 1])
                      + 1.2 * noise(radius_mm * u[..., 0], radius_mm * u[..., 1], radius_mm * u[..., 2]))

    angle = zero_line_distance(folia, _SPHERE_ROWS)
    return SphereTable([angle, np.full_like(angle, depth_mm)])


class _Frame:
    """Brain-centred canonical mm (x left, y posterior, z up) mapped to world mm with the
    subject's per-axis scale and head orientation; ellipsoids get a random jitter."""

    def __init__(self, rng, center, scale, rotation):
        self.rng, self.center, self.scale, self.rotation = rng, center, scale, rotation

    def point(self, local):
        return self.center + self.rotation @ (np.asarray(local, dtype=float) * self.scale)

    def ellipsoid(self, local, radii, jitter_mm=1.0, size_sd=0.06, angle_sd=4.0):
        center = self.point(local) + self.rng.normal(0, jitter_mm, 3)
        radii = np.asarray(radii, dtype=float) * self.scale * np.exp(self.rng.normal(0, size_sd, 3))
        return Ellipsoid(center, radii, self.rotation @ rotation_matrix(self.rng.normal(0, angle_sd, 3)))

    def capsule(self, p0, p1, r0, r1=None):
        s = float(np.mean(self.scale))
        return Capsule(self.point(p0), self.point(p1), r0 * s, (r0 if r1 is None else r1) * s)

    def pair(self, make, points, *args):
        """``make(*points, *args)`` (ellipsoid or capsule) on both sides: the x of ``points``
        (canonical points) mirrored."""
        return [make(*[np.multiply(q, (side, 1, 1)) for q in points], *args) for side in (-1, 1)]


def _cortices(f, p, radii):
    """The folded cerebral and cerebellar grey matter (FoldedSolid), the unfolded hemispheres and
    the ellipsoids of the cranium, in the brain frame ``f`` with the parameters ``p``."""
    rng, R = f.rng, CEREBRUM_RADII_MM
    main = f.ellipsoid((0, 0, 0), R, jitter_mm=0.0, size_sd=0.0, angle_sd=0.0)
    temporal = f.pair(f.ellipsoid, [(0.66 * R[0], -0.15 * R[1], -0.5 * R[2])], (24.0, 38.0, 24.0))
    cerebellum = f.ellipsoid((0, 0.6 * R[1], -0.95 * R[2]), (50.0, 29.0, 23.0))
    bridge = f.ellipsoid((0, 0.05 * R[1], -0.38 * R[2]), (23.0, 37.0, 34.0), jitter_mm=0.5)  # callosum, diencephalon
    normal = f.rotation[:, 0]
    gap = rng.uniform(1.5, 3.0)
    fissure = Intersection([Perturbed(Intersection([HalfSpace(f.center + normal * gap / 2, normal),
                                                    HalfSpace(f.center - normal * gap / 2, -normal)]),
                                      1.5, 45.0, rng),
                            Outside(bridge)])
    hemispheres = Intersection([Union([main] + temporal, smooth=6.0), Outside(Offset(cerebellum, 2.0)),
                                Outside(fissure)])
    sulcal = _sulcal_fields(rng, f.center - radii.max() - 10, f.center + radii.max() + 10, p["gyral_wavelength_mm"])
    parts = []
    for side in (-1, 1):  # right, then left hemisphere
        origin = f.center + side * HEMISPHERE_OFFSET * radii[0] * normal
        parts.append((origin, _sulci(sulcal, origin, _hemisphere_reach(main, origin, f.center, normal),
                                     p["sulcal_depth_mm"])))
    cortex = FoldedSolid(hemispheres, parts, p["sulcal_gap_mm"], 15.0, plane=(f.center, normal))
    folia = _folia(rng, float(cerebellum.radii.mean()), FOLIA_SPACING_MM, rng.uniform(6.0, 10.0))
    cerebellar_cortex = FoldedSolid(cerebellum, [(cerebellum.center, folia)], FOLIA_GAP_MM)
    return cortex, cerebellar_cortex, hemispheres, [main, cerebellum] + temporal


def _deep_structures(f, ventricle_scale):
    """Layers of the deep grey nuclei, the ventricles, brainstem and cord, in the brain frame."""
    R, v = CEREBRUM_RADII_MM, ventricle_scale
    nuclei = (f.pair(f.ellipsoid, [(0.16 * R[0], 0.1 * R[1], -0.1 * R[2])], (10.0, 15.0, 9.0))  # thalami
              + f.pair(f.ellipsoid, [(0.19 * R[0], -0.22 * R[1], 0.08 * R[2])], (6.0, 10.0, 9.0))  # caudate heads
              + f.pair(f.capsule, [(0.21 * R[0], -0.1 * R[1], 0.2 * R[2]), (0.26 * R[0], 0.25 * R[1], 0.22 * R[2])],
                       3.5, 2.5)  # caudate bodies
              + f.pair(f.ellipsoid, [(0.37 * R[0], -0.05 * R[1], -0.05 * R[2])], (6.0, 14.0, 10.0)))  # putamina
    ventricles = (f.pair(f.capsule, [(0.12 * R[0], -0.28 * R[1], 0.1 * R[2]), (0.16 * R[0], 0.22 * R[1], 0.18 * R[2])],
                         4.5 * v, 5.0 * v)  # frontal horns and bodies
                  + f.pair(f.capsule, [(0.16 * R[0], 0.22 * R[1], 0.18 * R[2]), (0.3 * R[0], 0.55 * R[1], 0.02 * R[2])],
                           4.0 * v, 2.0 * v)  # occipital horns
                  + f.pair(f.capsule, [(0.3 * R[0], 0.3 * R[1], 0.0), (0.48 * R[0], -0.12 * R[1], -0.42 * R[2])],
                           2.5 * v, 1.5 * v)  # temporal horns
                  + [f.ellipsoid((0, 0.08 * R[1], -0.12 * R[2]), (1.2 + 1.2 * v, 13.0, 8.0), jitter_mm=0.5)])
    return ([Layer("brain_gm", s) for s in nuclei] + [Layer("csf", s) for s in ventricles]
            + [Layer("brainstem", f.capsule((0, 0.12 * R[1], -0.35 * R[2]), (0, 0.28 * R[1], -1.1 * R[2]), 12.0, 9.0)),
               Layer("brainstem", f.capsule((0, 0.28 * R[1], -1.1 * R[2]), (0, 0.36 * R[1], -3.5 * R[2]), 6.0, 5.0)),
               Layer("csf", f.ellipsoid((0, 0.42 * R[1], -0.78 * R[2]), (5.0, 3.5, 6.0), jitter_mm=0.5))])


def brain_scene(grid, tracer, uptake, anatomy_rng, texture_rng, lesion_rng):
    """The head of one subject on ``grid`` (the vertex just below the top slice, centred
    transaxially): layers, textures, lesions and its drawn parameters (``cortex_mm`` = the
    grey-matter ribbon thickness, sulcal depth, gyral wavelength, ... in mm)."""
    rng = anatomy_rng
    fov = np.array(grid.shape) * grid.voxel
    p = {"cortex_mm": rng.uniform(*CORTEX_MM), "gyral_wavelength_mm": rng.uniform(*GYRAL_WAVELENGTH_MM),
         "sulcal_depth_mm": rng.uniform(*SULCAL_DEPTH_MM), "sulcal_gap_mm": rng.uniform(*SULCAL_GAP_MM),
         "csf_mm": rng.uniform(1.5, 4.0), "skull_mm": rng.uniform(5.0, 8.0), "scalp_mm": rng.uniform(4.0, 7.0),
         "ventricle_scale": rng.uniform(0.7, 1.5)}
    p["cerebellar_cortex_mm"] = 0.6 * p["cortex_mm"]
    scale = np.clip(np.exp(rng.normal(0, 0.05)), 0.9, 1.1) * np.exp(rng.normal(0, 0.03, 3))
    radii = np.array(CEREBRUM_RADII_MM) * scale
    top = grid.origin[2] + fov[2] - grid.voxel[2] / 2 - rng.uniform(3.0, 12.0)
    above = p["csf_mm"] + p["skull_mm"] + p["scalp_mm"]
    f = _Frame(rng, np.array([*rng.normal(0, 3.0, 2), top - above - radii[2]]), scale,
               rotation_matrix(rng.normal(0, 3.0, 3)))
    cortex, cerebellar_cortex, hemispheres, cranium = _cortices(f, p, radii)

    R = CEREBRUM_RADII_MM
    cavity = Offset(Union(cranium, smooth=10.0), p["csf_mm"])
    skull = Shell(Offset(cavity, p["skull_mm"]), p["skull_mm"])
    face = f.ellipsoid((0, -0.62 * R[1], -1.05 * R[2]), (52.0, 41.0, 48.0), jitter_mm=2.0)
    neck = f.capsule((0, 0.18 * R[1], -1.0 * R[2]), (0, 0.22 * R[1], -3.5 * R[2]), 52.0, 50.0)
    head = Union([Offset(cavity, p["skull_mm"] + p["scalp_mm"]), face, neck], smooth=15.0)
    period = rng.uniform(15.0, 18.0)
    vertebrae = Intersection([f.capsule((0, 0.05 * R[1], -1.5 * R[2]), (0, 0.08 * R[1], -3.5 * R[2]), 9.0),
                              ZBands(rng.uniform(0, period), period, 0.8 * period)])
    layers = [Layer("fat", head), Layer("muscle", Offset(head, -rng.uniform(2.0, 4.0)))]
    layers += [Layer("salivary", s) for s in
               f.pair(f.ellipsoid, [(0.62 * R[0], -0.05 * R[1], -1.25 * R[2])], (10.0, 15.0, 17.0))  # parotids
               + f.pair(f.ellipsoid, [(0.35 * R[0], -0.55 * R[1], -1.55 * R[2])], (8.0, 10.0, 7.0))]  # submandibular
    layers += [Layer("spine", vertebrae), Layer("bone", skull), Layer("csf", cavity),
               Layer("brain_gm", cortex), Layer("brain_wm", Offset(cortex, -p["cortex_mm"])),
               Layer("cerebellum", cerebellar_cortex),
               Layer("brain_wm", Offset(cerebellar_cortex, -p["cerebellar_cortex_mm"]))]
    layers += _deep_structures(f, p["ventricle_scale"])

    scales, weights = BRAIN_TEXTURE_MM
    fields = {"organ": mix_fields([noise_field(texture_rng, grid, max(c, 2 * grid.voxel.max())) for c in scales],
                                  weights)}
    specs = []
    for _ in range(int(lesion_rng.integers(1, 5))):
        if lesion_rng.random() < 0.6:  # metastasis
            specs.append(("brain", _log_uniform(lesion_rng, 4.0, 20.0), _log_uniform(lesion_rng, *tracer.lesion_suv)))
        else:  # hypometabolic region
            specs.append(("brain_cold", _log_uniform(lesion_rng, 8.0, 25.0),
                          lesion_rng.uniform(0.3, 0.7) * uptake["brain_wm"]))
    lesions = _place_lesions(lesion_rng, hemispheres, specs, 2 * grid.voxel.max())
    return Scene(head, layers, fields, lesions, {k: float(val) for k, val in p.items()})


# ----------------------------------------------------------------------------------------------
# Dead leaves
# ----------------------------------------------------------------------------------------------

DEAD_LEAVES_FOV_MM = (300.0, 300.0, 200.0)
LEAF_RADIUS_MM = (2.0, 60.0)
LEAF_EXPONENT = 2.0  # radius density ~ r**-LEAF_EXPONENT: many small shapes, few large ones
LEAF_COUNT = (400, 800)
LEAF_KINDS = ("ellipsoid", "box", "blob", "tube")
LEAF_KIND_P = (0.35, 0.25, 0.2, 0.2)
LEAF_TISSUES = ("muscle", "fat", "bone", "lung")  # attenuation classes of the shapes
LEAF_TISSUE_P = (0.8, 0.05, 0.08, 0.07)
LEAF_COLD_P = 0.12
LEAF_SUV_RANGE = (0.3, 20.0)
LEAF_SUV_SPREAD = 0.9  # log-normal sigma around the tracer's "structure" median
LEAF_SOFT_P = 0.3
LEAF_SOFT_EDGE_MM = (2.0, 8.0)
LEAF_TEXTURE_MM = (4.0, 12.0, 40.0)
LEAF_TEXTURES = 4  # texture fields the shapes choose from
LEAF_TEXTURE_MAX = 0.2


def power_law_radii(rng, n, low, high, exponent):
    """``n`` radii in ``low .. high`` with density ~ r**-exponent (inverse-CDF draws)."""
    a = 1.0 - exponent
    return (low**a + rng.random(n) * (high**a - low**a)) ** (1.0 / a)


def _leaf(rng, kind, center, radius):
    """One dead-leaves shape of size ~``radius`` mm at ``center``."""
    rotation = rotation_matrix(rng.uniform(0, 360, 3))
    if kind == "ellipsoid":
        return Ellipsoid(center, radius * np.exp(rng.normal(0, 0.35, 3)), rotation)
    if kind == "box":
        half = 0.8 * radius * np.exp(rng.normal(0, 0.3, 3))
        return RoundedBox(center, half, rng.uniform(0.1, 0.5) * half.min(), rotation)
    if kind == "blob":
        return Blob(center, radius, LatticeField(rng, center - 1.25 * radius, center + 1.25 * radius, radius / 2))
    thickness = min(radius, rng.uniform(1.0, 3.5))  # a thin tube wandering ~2-4 radii
    points, direction = [np.asarray(center, dtype=float)], rng.normal(size=3)
    for _ in range(int(rng.integers(2, 5))):
        direction = direction / np.linalg.norm(direction) + rng.normal(0, 0.5, 3)
        points.append(points[-1] + radius * rng.uniform(0.8, 1.5) * direction / np.linalg.norm(direction))
    return Union([Capsule(a, b, thickness) for a, b in zip(points[:-1], points[1:])])


def dead_leaves_scene(grid, tracer, uptake, anatomy_rng, texture_rng, lesion_rng, sample_mm):
    """Random occluding shapes in an ellipsoidal body filling most of ``grid``; ``sample_mm`` is
    the partial-volume sub-sample (voxel / supersample) the soft edges are scaled to."""
    rng = anatomy_rng
    fov = np.array(grid.shape) * grid.voxel
    center = grid.origin + (np.array(grid.shape) - 1) / 2 * grid.voxel
    core = Ellipsoid(center, fov / 2 * rng.uniform(0.78, 0.92, 3), rotation_matrix(rng.normal(0, 5, 3)))
    body = Perturbed(core, 4.0, rng.uniform(60, 100), rng)
    layers = [Layer("fat", body), Layer("muscle", Offset(body, -rng.uniform(4.0, 10.0)))]

    n = int(rng.integers(*LEAF_COUNT))
    radii = power_law_radii(rng, n, *LEAF_RADIUS_MM, LEAF_EXPONENT)
    centers = sample_inside(rng, core, n)
    kinds = rng.choice(len(LEAF_KINDS), size=n, p=LEAF_KIND_P)
    tissues = rng.choice(len(LEAF_TISSUES), size=n, p=LEAF_TISSUE_P)
    suvs = np.clip(uptake["structure"] * np.exp(rng.normal(0, LEAF_SUV_SPREAD, n)), *LEAF_SUV_RANGE)
    suvs[rng.random(n) < LEAF_COLD_P] = 0.0
    for i in range(len(centers)):
        shape = _leaf(rng, LEAF_KINDS[kinds[i]], centers[i], radii[i])
        if rng.random() < LEAF_SOFT_P:
            shape = Soft(shape, rng.uniform(*LEAF_SOFT_EDGE_MM), sample_mm)
        layers.append(Layer("structure", shape, float(suvs[i]), ATTENUATION_PER_MM[LEAF_TISSUES[tissues[i]]],
                            rng.uniform(0, LEAF_TEXTURE_MAX), f"leaf{rng.integers(LEAF_TEXTURES)}"))

    scales = [max(c, 2 * grid.voxel.max()) for c in LEAF_TEXTURE_MM]
    base = [noise_field(texture_rng, grid, c) for c in scales]
    fields = {"organ": mix_fields(base, (0.3, 0.5, 1.0))}
    fields.update({f"leaf{k}": mix_fields(base, texture_rng.uniform(0.1, 1.0, 3)) for k in range(LEAF_TEXTURES)})

    specs = [("structure", _log_uniform(lesion_rng, 4.0, 30.0), _log_uniform(lesion_rng, *tracer.lesion_suv))
             for _ in range(int(lesion_rng.integers(1, 7)))]
    lesions = _place_lesions(lesion_rng, Offset(core, -10.0), specs, 2 * grid.voxel.max())
    params = {"n_shapes": len(centers), "radius_range_mm": list(LEAF_RADIUS_MM), "exponent": LEAF_EXPONENT,
              "shape_kind": [LEAF_KINDS[k] for k in kinds[:len(centers)]],
              "shape_radius_mm": [float(r) for r in radii[:len(centers)]],
              "shape_suv": [float(s) for s in suvs[:len(centers)]]}
    return Scene(body, layers, fields, lesions, params)
