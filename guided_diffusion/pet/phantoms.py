"""Procedural PET phantoms: activity (SUV), attenuation (1/mm at 511 keV), labels.

Three anatomies (:data:`ANATOMIES`), all built from the smooth solids of :mod:`.shapes`, voxelised
with partial-volume fractions (edges are smooth rather than blocky) and randomised per seed:

``whole_body``: a subject placed in a canonical adult anatomy, measured in mm down from the
vertex, and randomised per seed: height, width and depth of the body, fat layer, bladder filling,
every organ's position, size, orientation and surface, the organ SUVs (tracer table with
per-subject spread) and the lesions, with a mild low-frequency texture inside organs. With
``detail`` it adds finer organ textures, vessels (blood-pool uptake), normal lymph nodes, small
cysts and heterogeneous large lesions (necrotic core, hot rim, internal texture).

``brain`` and ``dead_leaves``: a head with a folded cortex and a generic random-structure class
(:mod:`.anatomy`); their large lesions are heterogeneous too.

World coordinates follow DICOM LPS: x towards the patient's left, y towards posterior, z towards
the head; arrays are ``(X, Y, Z)`` with Z running feet -> head. The whole body covers the vertex
down to the thighs (a whole-body PET field of view, ~1 m) unless ``fov_mm`` says otherwise.
"""

import copy
import dataclasses

import numpy as np

from .anatomy import (DEAD_LEAVES_FOV_MM, HEAD_FOV_MM, Layer, Scene, brain_scene, clear_of,
                      dead_leaves_scene)
from .fields import mix_fields, noise_field, smooth_field
from .shapes import (Capsule, Ellipsoid, HalfSpace, Intersection, Offset, Perturbed, ProfileSolid, Shape,
                     Shell, Union, VoxelGrid, ZBands, rotation_matrix, sample_inside, voxel_fraction)
from .tracers import ATTENUATION_PER_MM, LESION_ATTENUATION_PER_MM, get_tracer

__all__ = [
    "ANATOMIES", "ORGAN_NAMES", "ORGAN_LABELS", "WHOLE_BODY_ORGANS", "DEFAULT_VOXEL_MM", "DEMO_VOXEL_MM",
    "DEFAULT_FOV_MM", "Phantom", "make_phantom", "phantom_grid",
    # re-exported from .shapes, where they live
    "Capsule", "Ellipsoid", "HalfSpace", "Intersection", "Offset", "Perturbed", "ProfileSolid", "Shape", "Shell",
    "Union", "VoxelGrid", "ZBands", "rotation_matrix", "voxel_fraction",
]

ANATOMIES = ("whole_body", "brain", "dead_leaves")

# Labels of the whole body (every one present in a default whole-body phantom), then those of
# the other anatomies and of whole-body detail; new names go at the end, ids never change.
WHOLE_BODY_ORGANS = (
    "background", "fat", "muscle", "bone", "spine", "brain_gm", "brain_wm", "cerebellum",
    "salivary", "lung", "myocardium", "blood_pool", "liver", "spleen", "stomach", "bowel",
    "kidney_cortex", "kidney_medulla", "bladder",
)
ORGAN_NAMES = WHOLE_BODY_ORGANS + ("csf", "brainstem", "vessel", "lymph_node", "cyst", "structure")
ORGAN_LABELS = {name: index for index, name in enumerate(ORGAN_NAMES)}

DEFAULT_VOXEL_MM = 1.65
DEMO_VOXEL_MM = 3.3
DEFAULT_FOV_MM = (528.0, 330.0, 1000.0)  # (X lateral, Y antero-posterior, Z axial)
ANATOMY_FOV_MM = {"whole_body": DEFAULT_FOV_MM, "brain": HEAD_FOV_MM, "dead_leaves": DEAD_LEAVES_FOV_MM}

# Relative amplitude (std) of the smooth multiplicative texture inside each organ.
TEXTURE_AMPLITUDE = {
    "fat": 0.10, "muscle": 0.08, "bone": 0.10, "spine": 0.08, "lung": 0.10, "stomach": 0.15,
    "blood_pool": 0.02, "myocardium": 0.08, "bladder": 0.0, "bowel": 0.35,
    "csf": 0.0, "vessel": 0.02, "cyst": 0.0,
}
DEFAULT_TEXTURE_AMPLITUDE = 0.05
TEXTURE_CORRELATION_MM = 30.0
BOWEL_TEXTURE_CORRELATION_MM = 10.0
# Whole-body detail: finer texture scales (mm) added to the organ texture, with their weights.
DETAIL_TEXTURE_MM = ((10.0, 0.6), (4.0, 0.4))

LESION_MAX_DIAMETER_MM = {"lung": 30.0, "liver": 30.0, "bone": 20.0, "lymph_node": 25.0}
LESION_MIN_DIAMETER_MM = 4.0
LESION_HOSTS = {"lung": ("lung",), "liver": ("liver",), "bone": ("spine",)}
# Heterogeneous lesions (whole-body detail, brain, dead leaves) from this diameter on: internal
# texture of this correlation, and a necrotic core in this share of them.
HETEROGENEOUS_MIN_DIAMETER_MM = 12.0
LESION_TEXTURE_MM = 5.0
NECROTIC_P = 0.6


@dataclasses.dataclass
class Phantom:
    """One procedural subject. Arrays are ``(X, Y, Z)``.

    activity: float32 SUV (g/mL); mu: float32 attenuation at 511 keV in 1/mm;
    organ_labels: int16 ids of :data:`ORGAN_LABELS`; lesion_labels: int16, 0 = none, k = lesion k;
    lesions: one dict per lesion (id, organ, host, center_mm, radii_mm, suv = uptake painted,
    mean_suv = true mean activity inside its label, n_voxels, volume_ml);
    affine: 4x4 voxel index -> mm; voxel_mm: (3,) mm; uptake: organ -> SUV drawn for this subject;
    anatomy: one of :data:`ANATOMIES`; params: what else was drawn for the subject (brain:
    ``cortex_mm``, the grey-matter ribbon thickness, sulcal depth, ... in mm; dead leaves: the
    shapes' kinds, radii and SUVs; empty for the whole body).
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
    anatomy: str = "whole_body"
    params: dict = dataclasses.field(default_factory=dict)


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

    def with_rng(self, rng):
        """The same subject drawing its random organ jitter from ``rng``."""
        other = copy.copy(self)
        other.rng = rng
        return other

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


# Vessels of whole-body detail (canonical x, y, d in mm as for _Subject; radius mm at both ends).
_VESSELS = [
    ((-22, 10, 480), (-22, 35, 560), 11, 11), ((-22, 35, 560), (-20, 40, 650), 11, 11),  # inferior vena cava
    ((-20, 40, 650), (0, 22, 748), 11, 10),
    ((-22, -5, 380), (-22, -5, 470), 9, 9),  # superior vena cava
]
# Paired vessels, given on the left (x > 0) and mirrored.
_PAIRED_VESSELS = [
    ((0, 5, 740), (40, 10, 800), 6, 6), ((40, 10, 800), (75, -30, 880), 5, 5),  # iliac arteries
    ((75, -30, 880), (85, -20, 1000), 4, 4),  # femoral artery
    ((0, 22, 748), (38, 25, 805), 7, 7), ((38, 25, 805), (68, -20, 885), 6, 6),  # iliac veins
    ((68, -20, 885), (78, -10, 1000), 5, 5),  # femoral vein
    ((12, -15, 385), (25, -5, 240), 4, 4), ((25, -5, 240), (20, 5, 185), 3, 3),  # carotid arteries
    ((35, 0, 195), (28, -5, 370), 6, 6),  # internal jugular vein
    ((12, -15, 385), (70, -5, 340), 4, 4), ((70, -5, 340), (130, 5, 350), 3.5, 3.5),  # subclavian, axillary
    ((3, 20, 640), (48, 55, 640), 3.5, 3.5),  # renal artery
]


def _detail_structures(s, organs):
    """(organ, shape) layers of whole-body detail: vessels (blood-pool uptake), normal lymph nodes
    at the node stations and small cysts in the liver and kidneys (``organs``: the layers so far);
    ``s`` draws from the detail stream."""
    rng = s.rng
    scale = rng.uniform(0.85, 1.15)
    mirrored = [((side * a[0], a[1], a[2]), (side * b[0], b[1], b[2]), r0, r1)
                for a, b, r0, r1 in _PAIRED_VESSELS for side in (1, -1)]
    layers = [("vessel", s.capsule(a, b, scale * r0, scale * r1)) for a, b, r0, r1 in _VESSELS + mirrored]
    for _ in range(int(rng.integers(8, 21))):
        x, y, d = _NODE_STATIONS[rng.integers(len(_NODE_STATIONS))]
        r = rng.uniform(2.0, 5.0)
        layers.append(("lymph_node", s.organ((rng.choice([-1, 1]) * x, y, d), (r, r, 1.3 * r), jitter_mm=8.0,
                                             size_sd=0.15)))
    for organ, count in (("liver", rng.integers(1, 4)), ("kidney_cortex", rng.integers(0, 3))):
        hosts = [shape for name, shape in organs if name == organ]
        for _ in range(int(count)):
            r = rng.uniform(3.0, 8.0)
            center = sample_inside(rng, hosts[rng.integers(len(hosts))], 1, margin_mm=r)
            if len(center):
                layers.append(("cyst", Ellipsoid(center[0], r * np.exp(rng.normal(0, 0.1, 3)),
                                                 rotation_matrix(rng.uniform(0, 180, 3)))))
    return layers


def _whole_body(grid, uptake, anatomy_rng, texture_rng, arms, detail_rngs=None):
    """The Scene of a whole-body subject and its _Subject; ``detail_rngs`` (structures, fine
    textures) turns whole-body detail on."""
    fov = np.array(grid.shape) * grid.voxel
    z_top = grid.origin[2] + fov[2] - grid.voxel[2] / 2 - anatomy_rng.uniform(5.0, 25.0)
    subject = _Subject(anatomy_rng, fov, z_top, arms)
    body, head, arm_axes = _body(subject)
    layers = [("fat", body), ("muscle", Offset(body, -subject.fat_mm))] + _thorax_abdomen(subject)
    if detail_rngs:
        layers += _detail_structures(subject.with_rng(detail_rngs[0]), layers)
    layers += _brain(subject, head) + _skeleton(subject, arm_axes)

    texture = smooth_field(texture_rng, grid, TEXTURE_CORRELATION_MM)
    bowel_texture = smooth_field(texture_rng, grid, BOWEL_TEXTURE_CORRELATION_MM)
    if detail_rngs:
        fine = [noise_field(detail_rngs[1], grid, max(c, 2 * grid.voxel.max())) for c, _ in DETAIL_TEXTURE_MM]
        weights = [w for _, w in DETAIL_TEXTURE_MM]
        texture = mix_fields([texture] + fine, [1.0] + weights)
        bowel_texture = mix_fields([bowel_texture, fine[-1]], [1.0, weights[-1]])
    layers = [Layer(organ, shape, field="bowel" if organ == "bowel" else "organ") for organ, shape in layers]
    return Scene(body, layers, {"organ": texture, "bowel": bowel_texture}), subject


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


def _host(labels, grid, center):
    """Label name of the voxel nearest to ``center`` (mm)."""
    index = tuple(int(np.clip(np.round((center[i] - grid.origin[i]) / grid.voxel[i]), 0, grid.shape[i] - 1))
                  for i in range(3))
    return ORGAN_NAMES[labels[index]]


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
        if not clear_of(center, radii.max(), [other for _, _, other, _ in placed], 2 * grid.voxel.max()):
            continue
        host = _host(labels, grid, center)
        suv = float(np.exp(rng.uniform(*np.log(tracer.lesion_suv))))
        shape = Ellipsoid(center, radii, rotation_matrix(rng.uniform(0, 180, 3)))
        placed.append((site, host, shape, suv))
    return placed


def _render(grid, scene, uptake, supersample):
    """Paint the scene's layers: (activity, mu, labels, envelope), activity and mu as tissue means
    per unit of the body's fraction ``envelope`` (nothing inside the body exceeds it)."""
    activity = np.zeros(grid.shape, np.float32)
    mu = np.zeros(grid.shape, np.float32)
    labels = np.zeros(grid.shape, np.int16)
    envelope = np.zeros(grid.shape, np.float32)
    body_box = voxel_fraction(scene.envelope, grid, supersample)
    if body_box is None:
        raise ValueError(f"the field of view {tuple(np.array(grid.shape) * grid.voxel)} mm misses the body")
    envelope[body_box[0]] = body_box[1]
    for layer in scene.layers:
        box = _fraction_in_body(layer.shape, grid, supersample, envelope)
        if box is None:
            continue
        suv = uptake[layer.organ] if layer.suv is None else layer.suv
        amplitude = layer.texture
        if amplitude is None:
            amplitude = TEXTURE_AMPLITUDE.get(layer.organ, DEFAULT_TEXTURE_AMPLITUDE)
        value = np.maximum(suv * (1.0 + amplitude * scene.fields[layer.field][box[0]]), 0.0)
        mu_value = ATTENUATION_PER_MM[layer.organ] if layer.mu is None else layer.mu
        _paint((activity, mu, labels), box, envelope, value, mu_value, ORGAN_LABELS[layer.organ])
    return activity, mu, labels, envelope


def _paint_lesions(volumes, grid, envelope, placed, supersample, rng=None):
    """Paint the (site, host, Ellipsoid, SUV) lesions into (activity, mu, lesion_labels) and return
    their dicts (voxel statistics still to come). With ``rng`` a lesion of at least
    :data:`HETEROGENEOUS_MIN_DIAMETER_MM` gets an internal texture and, in the share
    :data:`NECROTIC_P`, a necrotic core of 5-30 % of its uptake (its rim keeps ``suv``)."""
    lesions = []
    for site, host, lesion_shape, suv in placed:
        box = _fraction_in_body(lesion_shape, grid, 2 * supersample, envelope)  # small: finer
        if box is None:
            continue
        lesion_id = len(lesions) + 1
        slices, f = box
        value, core = suv, None
        if rng is not None and 2 * lesion_shape.radii.max() >= HETEROGENEOUS_MIN_DIAMETER_MM:
            texture = noise_field(rng, VoxelGrid(f.shape, grid.voxel, grid.origin), LESION_TEXTURE_MM)
            value = np.maximum(suv * (1.0 + rng.uniform(0.15, 0.35) * texture), 0.0)
            if rng.random() < NECROTIC_P:
                scale = rng.uniform(0.35, 0.65)
                shift = lesion_shape.rotation @ (rng.uniform(-0.3, 0.3, 3) * (1 - scale) * lesion_shape.radii)
                core = (Ellipsoid(lesion_shape.center + shift, scale * lesion_shape.radii, lesion_shape.rotation),
                        suv * rng.uniform(0.05, 0.3))
        _paint(volumes, box, envelope, value, LESION_ATTENUATION_PER_MM, lesion_id)
        core_box = core and _fraction_in_body(core[0], grid, 2 * supersample, envelope)
        if core_box:
            _paint(volumes, core_box, envelope, core[1], LESION_ATTENUATION_PER_MM, lesion_id)
        if not (f >= 0.5).any():  # smaller than a voxel: label the voxel it covers most
            volumes[2][slices][np.unravel_index(np.argmax(f), f.shape)] = lesion_id
        lesions.append({"id": lesion_id, "organ": site, "host": host,
                        "center_mm": [float(c) for c in lesion_shape.center],
                        "radii_mm": [float(r) for r in lesion_shape.radii], "suv": suv})
    return lesions


def make_phantom(seed, shape=None, voxel_mm=DEFAULT_VOXEL_MM, tracer="FDG", fov_mm=None,
                 arms=True, supersample=2, anatomy="whole_body", detail=False):
    """Build a procedural subject.

    seed: int, fixes everything (anatomy, uptake, lesions); the anatomy does not depend on the
        tracer, so one seed gives the same body under every tracer.
    shape: (X, Y, Z) voxels, or None to derive it from ``fov_mm`` (default: the anatomy's own,
        :data:`ANATOMY_FOV_MM`: the whole body ~1 m, a head 200 x 240 x 200 mm, dead leaves
        300 x 300 x 200 mm).
    voxel_mm: scalar or (3,) voxel size in mm (default 1.65; the CPU demo uses 3.3).
    tracer: a name in :data:`guided_diffusion.pet.tracers.TRACERS` (FDG, PSMA, DOTATATE, FAPI).
    arms: arms down along the body (True) or outside the field of view (False); whole body only.
    supersample: sub-samples per axis used for partial-volume fractions near surfaces.
    anatomy: one of :data:`ANATOMIES` (see the module docstring).
    detail: whole body only: finer textures, vessels, lymph nodes, cysts and heterogeneous
        lesions (False gives the plain whole body, the same bit for bit as without the option).
    The vertex sits just below the top slice (whole body, brain); the grid is centred transaxially.
    """
    tracer = get_tracer(tracer)
    if anatomy not in ANATOMIES:
        raise ValueError(f"unknown anatomy {anatomy!r}; choose one of {ANATOMIES}")
    if int(supersample) < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    supersample = int(supersample)
    if shape is None and fov_mm is None:
        fov_mm = ANATOMY_FOV_MM[anatomy]
    grid = phantom_grid(shape, voxel_mm, fov_mm)
    anatomy_seq, uptake_seq, texture_seq, lesion_seq, detail_seq = np.random.SeedSequence(int(seed)).spawn(5)
    rng = np.random.default_rng
    heterogeneous = detail or anatomy != "whole_body"
    uptake = tracer.draw_uptake(rng(uptake_seq), extra=heterogeneous)
    structure_rng, fine_rng, heterogeneity_rng = (rng(s) for s in detail_seq.spawn(3))
    if anatomy == "whole_body":
        scene, subject = _whole_body(grid, uptake, rng(anatomy_seq), rng(texture_seq), arms,
                                     (structure_rng, fine_rng) if detail else None)
    elif anatomy == "brain":
        scene = brain_scene(grid, tracer, uptake, rng(anatomy_seq), rng(texture_seq), rng(lesion_seq))
    else:
        scene = dead_leaves_scene(grid, tracer, uptake, rng(anatomy_seq), rng(texture_seq), rng(lesion_seq),
                                  float(grid.voxel.mean()) / supersample)

    activity, mu, labels, envelope = _render(grid, scene, uptake, supersample)
    if scene.lesions is None:
        placed = _draw_lesions(rng(lesion_seq), tracer, grid, labels, subject)
    else:
        placed = [(site, _host(labels, grid, shape.center), shape, suv) for site, shape, suv in scene.lesions]
    lesion_labels = np.zeros(grid.shape, np.int16)
    lesions = _paint_lesions((activity, mu, lesion_labels), grid, envelope, placed, supersample,
                             heterogeneity_rng if heterogeneous else None)
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
                   tracer=tracer.name, seed=int(seed), uptake=uptake, anatomy=anatomy, params=scene.params)
