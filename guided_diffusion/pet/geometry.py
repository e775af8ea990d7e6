"""Cylindrical PET scanner geometry and sinogram layout.

Conventions
-----------
* Distances in mm. The scanner axis is z; z = 0 is the axial centre of the scanner.
* Sinograms are arc-corrected parallel-beam data of shape ``(radial, view, plane)``.
  Radial bin ``i`` is the signed distance ``s_i = (i - (n_radial - 1) / 2) * radial_bin_mm``
  of the LOR from the axis; view ``v`` has azimuth ``phi_v = v * pi / n_views`` and the LOR is
  the line ``x cos(phi) + y sin(phi) = s``.
* Planes are grouped by segment (ring difference). Segment order is 0, +1, -1, +2, -2, ...
  Each segment stores the axial positions (mm) of the LOR mid-points of its planes.
* Modes: ``"2d"`` (one sinogram per image slice, no scanner axial geometry), ``"ssrb"``
  (direct planes every half ring spacing, line integrals perpendicular to the axis) and
  ``"3d"`` (oblique segments with span compression and a maximum ring difference).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

MODES = ("2d", "ssrb", "3d")
DEFAULT_MEMORY_FRACTION = 0.25
_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


@dataclass(frozen=True)
class ScannerGeometry:
    """A cylindrical multi-ring scanner.

    Attributes:
        name: preset name.
        ring_radius_mm: detector ring radius (mm).
        crystals_per_ring: number of crystals around one ring (even).
        crystal_size_mm: transaxial crystal width (mm); must not exceed the crystal pitch.
        n_rings: number of crystal rings.
        ring_spacing_mm: axial crystal pitch (mm).
        transaxial_fov_mm: diameter of the reconstructable transaxial FOV (mm); radial bins are
            trimmed to it unless ``n_radial`` is given.
        n_radial: number of radial bins after trimming (None: derived from the FOV).
        view_mashing: number of adjacent views combined into one (divides crystals_per_ring/2).
        default_mode: projector mode used when none is requested.
        default_max_ring_difference: ring-difference limit used in "3d" mode when none is given.
    """

    name: str
    ring_radius_mm: float
    crystals_per_ring: int
    crystal_size_mm: float
    n_rings: int
    ring_spacing_mm: float
    transaxial_fov_mm: float
    n_radial: Optional[int] = None
    view_mashing: int = 1
    default_mode: str = "ssrb"
    default_max_ring_difference: Optional[int] = None

    def __post_init__(self):
        for attr in ("ring_radius_mm", "crystal_size_mm", "ring_spacing_mm", "transaxial_fov_mm"):
            value = getattr(self, attr)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"scanner {self.name!r}: {attr} must be a positive number, got {value!r}")
        for attr in ("crystals_per_ring", "n_rings", "view_mashing"):
            value = getattr(self, attr)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"scanner {self.name!r}: {attr} must be a positive integer, got {value!r}")
        if self.crystals_per_ring % 2:
            raise ValueError(f"scanner {self.name!r}: crystals_per_ring must be even, got {self.crystals_per_ring}")
        if (self.crystals_per_ring // 2) % self.view_mashing:
            raise ValueError(
                f"scanner {self.name!r}: view_mashing={self.view_mashing} must divide "
                f"crystals_per_ring/2={self.crystals_per_ring // 2}")
        if self.crystal_size_mm > self.crystal_pitch_mm * (1 + 1e-6):
            raise ValueError(
                f"scanner {self.name!r}: crystal_size_mm={self.crystal_size_mm} exceeds the crystal pitch "
                f"{self.crystal_pitch_mm:.3f} mm implied by the ring radius and crystals_per_ring")
        if self.transaxial_fov_mm >= 2 * self.ring_radius_mm:
            raise ValueError(f"scanner {self.name!r}: transaxial_fov_mm must be smaller than the ring diameter")
        if self.n_radial is not None:
            if not (isinstance(self.n_radial, int) and self.n_radial >= 1):
                raise ValueError(f"scanner {self.name!r}: n_radial must be a positive integer, got {self.n_radial!r}")
            if self.n_radial * self.radial_bin_mm >= 2 * self.ring_radius_mm:
                raise ValueError(f"scanner {self.name!r}: n_radial={self.n_radial} bins exceed the ring diameter")
        if self.default_mode not in MODES:
            raise ValueError(f"scanner {self.name!r}: default_mode must be one of {MODES}")

    @property
    def crystal_pitch_mm(self) -> float:
        """Transaxial crystal pitch on the ring (mm)."""
        return 2 * math.pi * self.ring_radius_mm / self.crystals_per_ring

    @property
    def radial_bin_mm(self) -> float:
        """Arc-corrected radial bin size (mm): half the crystal pitch (interleaved LORs)."""
        return self.crystal_pitch_mm / 2

    @property
    def num_radial(self) -> int:
        """Number of radial bins after trimming to the transaxial FOV."""
        if self.n_radial is not None:
            return self.n_radial
        return int(math.ceil(self.transaxial_fov_mm / self.radial_bin_mm))

    @property
    def n_views(self) -> int:
        """Number of views over 180 degrees after mashing."""
        return self.crystals_per_ring // 2 // self.view_mashing

    @property
    def axial_fov_mm(self) -> float:
        return self.n_rings * self.ring_spacing_mm

    def radial_positions_mm(self) -> np.ndarray:
        """Signed radial bin centres s_i (mm), shape (num_radial,)."""
        return (np.arange(self.num_radial) - (self.num_radial - 1) / 2) * self.radial_bin_mm

    def view_angles(self) -> np.ndarray:
        """View azimuths phi_v (radians) in [0, pi), shape (n_views,)."""
        return np.arange(self.n_views) * math.pi / self.n_views

    def direct_plane_z_mm(self) -> np.ndarray:
        """Axial centres (mm) of the 2 * n_rings - 1 direct planes, every half ring spacing."""
        return (np.arange(2 * self.n_rings - 1) - (self.n_rings - 1)) * self.ring_spacing_mm / 2

    def with_options(self, **changes) -> "ScannerGeometry":
        """A copy with some fields changed (e.g. ``view_mashing=2``, ``n_radial=128``)."""
        return replace(self, **changes)


PRESETS: Dict[str, ScannerGeometry] = {
    # Siemens Biograph Vision Quadra: 82 cm ring diameter, 3.2 mm crystals (760 per ring),
    # 106 cm axial FOV (320 rings), 78 cm transaxial FOV. Reconstruction voxels are 1.65 mm.
    "quadra": ScannerGeometry(
        name="quadra", ring_radius_mm=410.0, crystals_per_ring=760, crystal_size_mm=3.2,
        n_rings=320, ring_spacing_mm=1060.0 / 320, transaxial_fov_mm=780.0,
        default_mode="ssrb", default_max_ring_difference=85),
    # United Imaging uEXPLORER: 78.6 cm ring diameter, 2.76 mm crystals, 194 cm axial FOV.
    "uexplorer": ScannerGeometry(
        name="uexplorer", ring_radius_mm=393.0, crystals_per_ring=840, crystal_size_mm=2.76,
        n_rings=672, ring_spacing_mm=1940.0 / 672, transaxial_fov_mm=686.0,
        default_mode="ssrb", default_max_ring_difference=100),
    # CTI ECAT 921-like, used 2D as in the BC-DPM paper: 160 radial bins x 192 views over 180 deg.
    "ecat921_2d": ScannerGeometry(
        name="ecat921_2d", ring_radius_mm=412.0, crystals_per_ring=384, crystal_size_mm=6.3,
        n_rings=24, ring_spacing_mm=6.75, transaxial_fov_mm=539.0, n_radial=160,
        default_mode="2d"),
    # Small scanner for tests and CPU demos (projects a 32^3 volume in well under a second).
    "demo": ScannerGeometry(
        name="demo", ring_radius_mm=120.0, crystals_per_ring=128, crystal_size_mm=5.5,
        n_rings=8, ring_spacing_mm=8.0, transaxial_fov_mm=160.0,
        default_mode="ssrb", default_max_ring_difference=7),
}


def get_preset(name) -> ScannerGeometry:
    """The preset scanner called ``name`` (a ScannerGeometry passes through unchanged)."""
    if isinstance(name, ScannerGeometry):
        return name
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown scanner preset {name!r}; choose one of {sorted(PRESETS)}") from None


@dataclass(frozen=True)
class Segment:
    """A group of planes sharing one (mean) ring difference.

    ``ring_difference_min/max`` are signed ring differences (ring2 - ring1) combined by span
    compression; ``plane_z_mm`` are the axial LOR mid-points (mm, scanner centre = 0).
    """

    ring_difference_min: int
    ring_difference_max: int
    plane_z_mm: Tuple[float, ...]

    @property
    def mean_ring_difference(self) -> float:
        return (self.ring_difference_min + self.ring_difference_max) / 2

    @property
    def n_planes(self) -> int:
        return len(self.plane_z_mm)


@dataclass(frozen=True)
class SinogramLayout:
    """Sinogram layout ``(radial, view, plane)`` of one scanner in one mode."""

    scanner: ScannerGeometry
    mode: str
    segments: Tuple[Segment, ...]
    span: int = 1
    max_ring_difference: int = 0
    views: Tuple[int, ...] = field(default=())

    @property
    def n_radial(self) -> int:
        return self.scanner.num_radial

    @property
    def view_indices(self) -> Tuple[int, ...]:
        """Indices of the views present (all views unless this layout is an OSEM subset)."""
        return self.views if self.views else tuple(range(self.scanner.n_views))

    @property
    def n_views(self) -> int:
        return len(self.view_indices)

    @property
    def n_planes(self) -> int:
        return sum(seg.n_planes for seg in self.segments)

    @property
    def shape(self) -> Tuple[int, int, int]:
        return (self.n_radial, self.n_views, self.n_planes)

    def segment_slices(self) -> Tuple[slice, ...]:
        """Slices of the plane axis belonging to each segment."""
        out, start = [], 0
        for seg in self.segments:
            out.append(slice(start, start + seg.n_planes))
            start += seg.n_planes
        return tuple(out)

    def axial_slope(self, segment: Segment) -> np.ndarray:
        """tan(polar angle) of the segment's LORs for every radial bin, shape (n_radial,).

        An LOR between rings a ring difference ``d`` apart at radial offset ``s`` spans
        ``d * ring_spacing`` axially over the transaxial chord ``2 sqrt(R^2 - s^2)``.
        """
        s = self.scanner.radial_positions_mm()
        chord = 2 * np.sqrt(self.scanner.ring_radius_mm ** 2 - s ** 2)
        return segment.mean_ring_difference * self.scanner.ring_spacing_mm / chord

    def nbytes(self, dtype="float32", batch: int = 1) -> int:
        """Size in bytes of a sinogram with this layout."""
        return sinogram_bytes(self.shape, dtype, batch)

    def restrict_axially(self, z_min_mm: float, z_max_mm: float) -> "SinogramLayout":
        """Keep only the planes whose LOR mid-point lies in ``[z_min_mm, z_max_mm]`` (slab mode)."""
        tol = 1e-6 * max(1.0, abs(z_min_mm), abs(z_max_mm))
        segments = []
        for seg in self.segments:
            kept = tuple(z for z in seg.plane_z_mm if z_min_mm - tol <= z <= z_max_mm + tol)
            if kept:
                segments.append(replace(seg, plane_z_mm=kept))
        if not segments:
            raise ValueError(
                f"no sinogram plane of scanner {self.scanner.name!r} lies in the axial range "
                f"[{z_min_mm:.1f}, {z_max_mm:.1f}] mm")
        return replace(self, segments=tuple(segments))

    def subset_views(self, views: Sequence[int]) -> "SinogramLayout":
        return replace(self, views=tuple(int(v) for v in views))


def sinogram_bytes(shape, dtype="float32", batch: int = 1) -> int:
    """Bytes of a ``batch`` of float arrays with ``shape``; dtype as a name or torch/numpy dtype."""
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPE_BYTES)}")
    return int(np.prod(shape, dtype=np.int64)) * _DTYPE_BYTES[name] * int(batch)


def _segment_ring_differences(span: int, max_ring_difference: int):
    """Signed ring-difference ranges (lo, hi) per segment in the order 0, +1, -1, +2, -2, ..."""
    if span == 1:
        ranges = [(0, 0)]
        for d in range(1, max_ring_difference + 1):
            ranges += [(d, d), (-d, -d)]
        return ranges
    half = (span - 1) // 2
    ranges = [(-min(half, max_ring_difference), min(half, max_ring_difference))]
    k = 1
    while k * span - half <= max_ring_difference:
        lo, hi = k * span - half, min(k * span + half, max_ring_difference)
        ranges += [(lo, hi), (-hi, -lo)]
        k += 1
    return ranges


def _plane_positions(scanner: ScannerGeometry, lo: int, hi: int) -> Tuple[float, ...]:
    """Axial mid-points (mm) of all LORs whose ring difference is in [lo, hi]."""
    half_units = set()
    for d in range(lo, hi + 1):
        a = abs(d)
        half_units.update(2 * r + a for r in range(scanner.n_rings - a))
    centre = scanner.n_rings - 1
    return tuple((u - centre) * scanner.ring_spacing_mm / 2 for u in sorted(half_units))


def make_layout(scanner, mode: Optional[str] = None, *, max_ring_difference: Optional[int] = None,
                span: int = 1, plane_z_mm: Optional[Sequence[float]] = None) -> SinogramLayout:
    """The sinogram layout of ``scanner`` (preset name or ScannerGeometry) in ``mode``.

    Args:
        mode: "2d" (planes given by ``plane_z_mm``, typically the image slice centres),
            "ssrb" (the 2 * n_rings - 1 direct planes) or "3d" (oblique segments).
        max_ring_difference: "3d" only; default the scanner's default, else n_rings - 1.
        span: "3d" only; 1 (no compression) or an odd number >= 3 of ring differences per segment.
        plane_z_mm: "2d" only: axial positions (mm) of the planes.
    """
    scanner = get_preset(scanner)
    mode = scanner.default_mode if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "2d":
        if plane_z_mm is None or len(plane_z_mm) == 0:
            raise ValueError("mode '2d' needs plane_z_mm (the axial positions of the image slices)")
        return SinogramLayout(scanner, mode, (Segment(0, 0, tuple(float(z) for z in plane_z_mm)),))
    if plane_z_mm is not None:
        raise ValueError(f"plane_z_mm is only used in mode '2d'; mode {mode!r} takes planes from the scanner")
    if mode == "ssrb":
        return SinogramLayout(scanner, mode, (Segment(0, 0, tuple(scanner.direct_plane_z_mm())),))
    if max_ring_difference is None:
        max_ring_difference = scanner.default_max_ring_difference
        if max_ring_difference is None:
            max_ring_difference = scanner.n_rings - 1
    if not (isinstance(max_ring_difference, int) and 0 <= max_ring_difference < scanner.n_rings):
        raise ValueError(
            f"max_ring_difference must be an integer in [0, {scanner.n_rings - 1}], got {max_ring_difference!r}")
    if not (isinstance(span, int) and span >= 1 and span % 2 == 1):
        raise ValueError(f"span must be a positive odd integer, got {span!r}")
    segments = tuple(Segment(lo, hi, _plane_positions(scanner, lo, hi))
                     for lo, hi in _segment_ring_differences(span, max_ring_difference))
    return SinogramLayout(scanner, mode, segments, span=span, max_ring_difference=max_ring_difference)


def available_memory_bytes() -> int:
    """Currently available physical memory (bytes), from os.sysconf; 8 GiB if unknown."""
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def default_memory_budget() -> int:
    """Default sinogram memory budget: a quarter of the available RAM."""
    return int(DEFAULT_MEMORY_FRACTION * available_memory_bytes())


def sinogram_nbytes(scanner, mode: Optional[str] = None, *, max_ring_difference: Optional[int] = None,
                    span: int = 1, n_planes_2d: int = 1, dtype="float32", batch: int = 1) -> int:
    """Bytes of one sinogram of ``scanner`` in ``mode``, computed without allocating it."""
    plane_z = np.zeros(n_planes_2d) if mode == "2d" else None
    layout = make_layout(scanner, mode, max_ring_difference=max_ring_difference, span=span, plane_z_mm=plane_z)
    return layout.nbytes(dtype, batch)


def check_memory_budget(layout: SinogramLayout, dtype="float32", batch: int = 1,
                        budget_bytes: Optional[int] = None) -> int:
    """Raise MemoryError if a sinogram with ``layout`` would exceed the budget; return its size."""
    nbytes = layout.nbytes(dtype, batch)
    budget = default_memory_budget() if budget_bytes is None else int(budget_bytes)
    if nbytes > budget:
        raise MemoryError(
            f"a {layout.mode} sinogram of scanner {layout.scanner.name!r} with shape {layout.shape} "
            f"(batch {batch}) needs {nbytes / 2**30:.2f} GiB, over the budget of {budget / 2**30:.2f} GiB; "
            "use mode='ssrb', a smaller max_ring_difference, a larger span, view mashing, or project the "
            "volume slab by slab (a thinner image), or raise memory_budget_bytes")
    return nbytes


def ssrb(sinogram, layout: SinogramLayout, direct_layout: SinogramLayout, correct_obliquity: bool = True):
    """Single-slice rebinning of a 3D sinogram onto direct planes.

    Every oblique plane is added to the direct plane at the same axial mid-point and each
    direct plane is divided by the number of planes it received. With ``correct_obliquity`` the
    oblique data are multiplied by cos(polar angle) first, so an axially uniform object rebins to
    its direct-plane line integrals.

    Args:
        sinogram: torch tensor ``(radial, view, plane)`` or ``(B, radial, view, plane)`` in ``layout``.
        layout: the 3D layout of ``sinogram``.
        direct_layout: target layout with one segment (e.g. a "ssrb" projector's layout).
    Returns:
        torch tensor in ``direct_layout``.
    """
    import torch

    if len(direct_layout.segments) != 1 or direct_layout.segments[0].mean_ring_difference != 0:
        raise ValueError("direct_layout must hold a single segment of direct planes")
    if tuple(sinogram.shape[-3:]) != layout.shape:
        raise ValueError(f"sinogram shape {tuple(sinogram.shape)} does not match the layout {layout.shape}")
    step = layout.scanner.ring_spacing_mm / 2
    target = {int(round(z / step)): i for i, z in enumerate(direct_layout.segments[0].plane_z_mm)}
    out = sinogram.new_zeros(sinogram.shape[:-1] + (direct_layout.n_planes,))
    counts = sinogram.new_zeros(direct_layout.n_planes)
    for seg, sl in zip(layout.segments, layout.segment_slices()):
        slope = torch.as_tensor(layout.axial_slope(seg), dtype=sinogram.dtype, device=sinogram.device)
        weight = torch.rsqrt(1 + slope ** 2) if correct_obliquity else torch.ones_like(slope)
        for local, z in enumerate(seg.plane_z_mm):
            index = target.get(int(round(z / step)))
            if index is not None:
                out[..., index] += sinogram[..., sl.start + local] * weight[:, None]
                counts[index] += 1
    return out / counts.clamp(min=1)
