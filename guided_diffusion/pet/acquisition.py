"""One site's acquisition and reconstruction of one scan: settings, their random draw, simulation.

A :class:`ScanSettings` names what differs between real scans and sites: the scanner preset,
2D or rebinned 3D acquisition, OSEM iterations x subsets (MLEM = 1 subset), resolution modelling
in the reconstruction, the Gaussian post-filter, the randoms and scatter fractions and the
native (reconstruction) voxel size. :func:`sample_scan_settings` draws one from
:data:`DEFAULT_RANGES`; :func:`simulate_scan` turns a phantom on the native grid into full- and
low-dose images.

Physics (per slab of ``slab`` slices, the same projector serving every slab; slabs overlap by
:func:`halo_slices` when the reconstruction's resolution model differs from the data's, so that
the truncated PSF leaves no seams): expected counts
with attenuation, randoms, scatter and the scanner's true resolution (:data:`SCANNERS`
``psf_fwhm_mm``, whatever the reconstruction models), a Poisson full-dose realisation and a
binomial thinning per dose reduction factor (DRF), so each low dose is Poisson with mean
``ybar / DRF`` and aligned with the full dose. Every acquisition is reconstructed by OSEM with
known attenuation / randoms / scatter and the PSF model ``psf_mm`` (0: none, so the images are
blurrier and, at many iterations, noisier than with resolution modelling), then post-filtered.

Modes. ``"2d"``: one sinogram per image slice. ``"ssrb"`` emulates a 3D acquisition rebinned to
direct planes with the preset's ``ssrb`` projector: the image is sampled by linear interpolation
at the scanner's direct planes (every half ring spacing: 3.375 mm for the demo ECAT-921-like
ring, 1.656 mm for the Quadra), so the axial sampling is the scanner's, not the voxel grid's.
When the planes are sparser than the slices (demo scanner below 3.375 mm voxels) a
reconstruction on the slices is ill-posed (slices between planes get little or no
sensitivity), so the scan is reconstructed on the planes and interpolated linearly to the
slices, as scanners reformat to the requested slice thickness: axial noise correlation and
resolution then differ from ``"2d"``. Oblique-LOR physics (SSRB's off-axis axial blur, the
higher 3D sensitivity) is not modelled: the demo scanner's ``"3d"`` projector is too slow for
slab-wise whole-body generation on a CPU.

Torch CPU reductions depend on the thread count, so :func:`torch_threads` fixes it while a scan
is simulated (the dataset generator uses one thread per MPI rank).
"""

import contextlib
import dataclasses
import functools
import math
from typing import Callable, Sequence, Union

import numpy as np
import torch

from . import geometry, recon, simulate, volumes
from .filters import fwhm_to_sigma, gaussian_filter
from .linear_operator import GaussianPSF, compose
from .projector import make_projector

# Acquisition settings per scanner. "demo" is an ECAT-921-like ring used in 2D (a 54 cm
# transaxial field of view holds a whole body with arms at 3.3 mm voxels; the tiny "demo"
# projector preset only covers 16 cm); "quadra" is the Biograph Vision Quadra with SSRB.
# psf_fwhm_mm is the scanner's true resolution, with which the data are always simulated.
SCANNERS = {
    "demo": dict(preset="ecat921_2d", mode="2d", view_mashing=2, psf_fwhm_mm=4.5,
                 randoms_fraction=0.3, scatter_fraction=0.15),
    "quadra": dict(preset="quadra", mode="ssrb", view_mashing=4, psf_fwhm_mm=3.5,
                   randoms_fraction=0.3, scatter_fraction=0.3),
}
MODES = ("2d", "ssrb")

#: What :func:`sample_scan_settings` draws from. ``recon``: (iterations, subsets) choices; the
#: effective iterations (iterations x subsets) are drawn log-uniform over
#: ``effective_iterations`` and the choice with the nearest effective count taken (uniformly
#: among equals). ``psf_probability``: resolution modelling on, with ``psf_mm`` uniform in the
#: range; ``no_filter_probability``: no post-filter, else ``post_filter_mm`` uniform in the
#: range; ``voxel_mm``: native voxel sizes (mm), uniform; the rest uniform in their ranges.
DEFAULT_RANGES = {
    "scanner": ("demo",),
    "mode": MODES,
    "recon": ((1, 4), (2, 4), (10, 1), (2, 8), (20, 1), (4, 5), (3, 8), (4, 8), (2, 16), (8, 5),
              (50, 1), (5, 10), (4, 16), (100, 1), (10, 10)),
    "effective_iterations": (4.0, 100.0),
    "psf_probability": 0.5,
    "psf_mm": (3.0, 6.0),
    "no_filter_probability": 0.4,
    "post_filter_mm": (2.0, 6.0),
    "randoms_fraction": (0.1, 0.6),
    "scatter_fraction": (0.2, 0.5),
    "voxel_mm": (1.65, 2.0, 2.6, 3.0, 3.3, 4.0),
}
MAX_DRAWS = 1000  # rejection sampling against ``exclude``
ORACLE_TAG = 0x0AC1E  # seeds the oracle's fresh counts apart from the full and low doses
#: Phantom grids and native voxel sizes agree to this (mm).
VOXEL_TOLERANCE_MM = 1e-6
#: Relative voxel-size difference below which no resampling happens (sampling.transforms' rule).
RESAMPLE_RTOL = 0.01

Exclusion = Union[str, Callable[["ScanSettings"], bool]]


@dataclasses.dataclass(frozen=True)
class ScanSettings:
    """One site's acquisition and reconstruction of one scan."""

    scanner: str = "demo"          # a SCANNERS key
    mode: str = "2d"               # "2d": slice-wise 2D acquisition; "ssrb": 3D rebinned to direct planes
    iterations: int = 2            # OSEM iterations; MLEM = subsets 1
    subsets: int = 8
    psf_mm: float = 4.5            # resolution modelling FWHM in the reconstruction (mm); 0 = off
    post_filter_mm: float = 0.0    # Gaussian post-filter FWHM (mm), 0 = none
    randoms_fraction: float = 0.2  # of trues
    scatter_fraction: float = 0.3  # of trues
    voxel_mm: float = 3.3          # native (reconstruction) isotropic voxel size (mm)

    def __post_init__(self):
        for field in dataclasses.fields(self):  # JSON numbers and numpy scalars -> the field's type
            value = getattr(self, field.name)
            if field.type is int and float(value) != int(value):
                raise ValueError(f"{field.name} must be an integer, got {value!r}")
            object.__setattr__(self, field.name, field.type(value))
        if self.scanner not in SCANNERS:
            raise ValueError(f"unknown scanner {self.scanner!r}; choose from {sorted(SCANNERS)}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.iterations < 1 or self.subsets < 1:
            raise ValueError(f"iterations and subsets must be >= 1, got {self.iterations}, {self.subsets}")
        for name in ("psf_mm", "post_filter_mm", "randoms_fraction", "scatter_fraction"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (math.isfinite(self.voxel_mm) and self.voxel_mm > 0):
            raise ValueError(f"voxel_mm must be positive, got {self.voxel_mm!r}")

    @property
    def recon_tag(self) -> str:
        """``osem2x8`` or ``mlem100``."""
        return f"mlem{self.iterations}" if self.subsets == 1 else f"osem{self.iterations}x{self.subsets}"

    def tags(self) -> tuple:
        """Labels that ``exclude`` / ``--hold_out`` match: reconstruction with and without the
        PSF part (``osem2x8_psf``, ``mlem100_nopsf``, ``osem2x8``), ``psf`` / ``nopsf``,
        ``filtered`` / ``nofilter``, the mode and the voxel size (``1.65``)."""
        psf = "psf" if self.psf_mm > 0 else "nopsf"
        return (f"{self.recon_tag}_{psf}", self.recon_tag, psf,
                "filtered" if self.post_filter_mm > 0 else "nofilter", self.mode, f"{self.voxel_mm:g}")

    def label(self) -> str:
        """Short text, e.g. ``"OSEM 2x8 PSF, 3.3 mm"`` or ``"MLEM 100, 4 mm filter, SSRB, 2 mm"``."""
        name = f"MLEM {self.iterations}" if self.subsets == 1 else f"OSEM {self.iterations}x{self.subsets}"
        parts = [name + (" PSF" if self.psf_mm > 0 else "")]
        if self.post_filter_mm > 0:
            parts.append(f"{self.post_filter_mm:g} mm filter")
        if self.mode != "2d":
            parts.append(self.mode.upper())
        return ", ".join(parts + [f"{self.voxel_mm:g} mm"])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d) -> "ScanSettings":
        """The settings of :meth:`to_dict` (missing keys take the defaults)."""
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown scan settings {sorted(unknown)}")
        return cls(**d)


def fixed_scan(scanner="demo", iterations=2, subsets=8, voxel_mm=3.3) -> ScanSettings:
    """The scan of the fixed (not randomised) dataset: the SCANNERS entry's mode, PSF, randoms
    and scatter, reconstructed with its own resolution model."""
    entry = SCANNERS[scanner]
    return ScanSettings(scanner=scanner, mode=entry["mode"], iterations=int(iterations), subsets=int(subsets),
                        psf_mm=entry["psf_fwhm_mm"], randoms_fraction=entry["randoms_fraction"],
                        scatter_fraction=entry["scatter_fraction"], voxel_mm=float(voxel_mm))


def possible_tags(ranges=DEFAULT_RANGES) -> set:
    """Every tag (:meth:`ScanSettings.tags`) a draw from ``ranges`` can have."""
    tags = {"psf", "nopsf", "filtered", "nofilter", *ranges["mode"]}
    tags |= {f"{v:g}" for v in ranges["voxel_mm"]}
    for iterations, subsets in ranges["recon"]:
        recon_tag = ScanSettings(iterations=iterations, subsets=subsets).recon_tag
        tags |= {recon_tag, f"{recon_tag}_psf", f"{recon_tag}_nopsf"}
    return tags


def is_excluded(scan: ScanSettings, exclude: Sequence[Exclusion]) -> bool:
    """Whether ``scan`` has a tag in ``exclude`` or satisfies one of its predicates."""
    tags = set(scan.tags())
    return any(item(scan) if callable(item) else item in tags for item in exclude)


def _pick(rng, choices):
    return choices[int(rng.integers(len(choices)))]


def _uniform(rng, bounds, digits):
    return round(float(rng.uniform(*bounds)), digits)


def _draw_recon(rng, ranges):
    choices = [tuple(int(n) for n in c) for c in ranges["recon"]]
    effective = np.array(sorted({i * s for i, s in choices}), dtype=float)
    low, high = ranges["effective_iterations"]
    target = rng.uniform(math.log(low), math.log(high))
    nearest = effective[np.argmin(np.abs(np.log(effective) - target))]
    return _pick(rng, [c for c in choices if c[0] * c[1] == nearest])


def _draw(rng, ranges):
    iterations, subsets = _draw_recon(rng, ranges)
    psf = _uniform(rng, ranges["psf_mm"], 1) if rng.random() < ranges["psf_probability"] else 0.0
    post = 0.0 if rng.random() < ranges["no_filter_probability"] else _uniform(rng, ranges["post_filter_mm"], 1)
    return ScanSettings(scanner=_pick(rng, ranges["scanner"]), mode=_pick(rng, ranges["mode"]),
                        iterations=iterations, subsets=subsets, psf_mm=psf, post_filter_mm=post,
                        randoms_fraction=_uniform(rng, ranges["randoms_fraction"], 3),
                        scatter_fraction=_uniform(rng, ranges["scatter_fraction"], 3),
                        voxel_mm=float(_pick(rng, ranges["voxel_mm"])))


def sample_scan_settings(rng, ranges=DEFAULT_RANGES, exclude: Sequence[Exclusion] = ()) -> ScanSettings:
    """Draw one scan from ``ranges`` (see :data:`DEFAULT_RANGES`) with the numpy Generator
    ``rng``, redrawing while it is excluded: ``exclude`` holds tags (:meth:`ScanSettings.tags`,
    e.g. ``"mlem100_nopsf"``, ``"1.65"``) and predicates ``scan -> bool``. Lengths are rounded
    to 0.1 mm and fractions to 0.001."""
    for _ in range(MAX_DRAWS):
        scan = _draw(rng, ranges)
        if not is_excluded(scan, exclude):
            return scan
    raise ValueError(f"exclude {list(exclude)} leaves (almost) no scan settings to draw")


def sample_drfs(rng, n, low=2.0, high=200.0) -> list:
    """``n`` distinct dose reduction factors, log-uniform in ``[low, high]``, rounded to three
    significant digits, ascending."""
    if not (1 <= low <= high) or n < 1:
        raise ValueError(f"need 1 <= low <= high and n >= 1, got low={low}, high={high}, n={n}")
    drfs = set()
    for _ in range(MAX_DRAWS * n):
        value = float(np.exp(rng.uniform(math.log(low), math.log(high))))
        drfs.add(min(max(float(f"{value:.3g}"), low), high))
        if len(drfs) == n:
            return sorted(drfs)
    raise ValueError(f"cannot draw {n} distinct DRFs in [{low}, {high}]")


def noise_seed(*keys) -> int:
    """A 63-bit seed derived from integer ``keys``."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)


@contextlib.contextmanager
def torch_threads(n):
    """Run the block with ``torch.set_num_threads(n)`` and restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@functools.lru_cache(maxsize=2)  # a scan uses at most two: its slab and its planes
def _geometric(preset, mode, shape, voxel, view_mashing):
    return make_projector(preset, shape, voxel, mode=mode, view_mashing=view_mashing)


def _with_psf(geometric, fwhm_mm):
    if fwhm_mm <= 0:
        return geometric
    return compose(geometric, GaussianPSF(geometric.image_shape, geometric.voxel_size_mm, fwhm_mm,
                                          device=geometric.device, dtype=geometric.dtype))


def plane_spacing_mm(scan: ScanSettings) -> float:
    """Axial distance (mm) of the scan's sinogram planes: the slices in ``"2d"``, half the
    ring spacing in ``"ssrb"``."""
    if scan.mode == "2d":
        return scan.voxel_mm
    return geometry.get_preset(SCANNERS[scan.scanner]["preset"]).ring_spacing_mm / 2


def on_planes(scan: ScanSettings) -> bool:
    """Whether the scan is reconstructed on its planes (``"ssrb"`` planes sparser than the slices)."""
    return plane_spacing_mm(scan) > scan.voxel_mm + VOXEL_TOLERANCE_MM


def halo_slices(scan: ScanSettings) -> int:
    """Slices a slab shares with each neighbour: 0 when the reconstruction uses the data's
    own projector (each slab is then a self-consistent acquisition); else the axial reach of
    the true and the modelled resolution plus a plane, so that a slab's truncated PSF does not
    show at its edges (the overlap is simulated and reconstructed, then dropped)."""
    true_psf = SCANNERS[scan.scanner]["psf_fwhm_mm"]
    if scan.psf_mm == true_psf and not on_planes(scan):
        return 0
    reach_mm = 3 * (fwhm_to_sigma(true_psf) + fwhm_to_sigma(scan.psf_mm)) + plane_spacing_mm(scan)
    return math.ceil(reach_mm / scan.voxel_mm)


def scan_projectors(scan: ScanSettings, shape):
    """Projectors of one slab ``shape`` (X, Y, slab) at ``scan.voxel_mm``: ``data`` (the true
    resolution), ``recon`` (``scan.psf_mm``) and ``planes``: the z (mm, slab centre = 0) of the
    data's sinogram planes."""
    entry = SCANNERS[scan.scanner]
    voxel = (float(scan.voxel_mm),) * 3
    geometric = _geometric(entry["preset"], scan.mode, tuple(shape), voxel, entry["view_mashing"])
    data = _with_psf(geometric, entry["psf_fwhm_mm"])
    planes = np.asarray(geometric.layout.segments[0].plane_z_mm)
    if not on_planes(scan):
        recon_op = data if scan.psf_mm == entry["psf_fwhm_mm"] else _with_psf(geometric, scan.psf_mm)
        return data, recon_op, planes
    plane_grid = _geometric(entry["preset"], "2d", (shape[0], shape[1], planes.size),
                            voxel[:2] + (plane_spacing_mm(scan),), entry["view_mashing"])
    return data, _with_psf(plane_grid, scan.psf_mm), planes


def _planes_to_slices(image, planes, depth, voxel_mm):
    """Linear interpolation along z of ``(B, X, Y, P)`` images at the planes ``planes`` (mm)
    to the ``depth`` slices of a slab (centre 0); slices beyond the planes take the nearest."""
    slice_z = (np.arange(depth) - (depth - 1) / 2) * voxel_mm
    position = np.clip((slice_z - planes[0]) / (planes[1] - planes[0]), 0, planes.size - 1)
    lower = np.minimum(np.floor(position).astype(int), planes.size - 2)
    weight = torch.as_tensor(position - lower, dtype=image.dtype)
    return image[..., lower] * (1 - weight) + image[..., lower + 1] * weight


def _acquire(activity, mu, scan, drfs, total_counts, slab, seed, oracle_draws=0):
    """Slab-wise full- and low-dose images ``(1 + len(drfs), X, Y, Z)`` float32 [full, low...]
    and the prompts of each, before the post-filter, then ``oracle_draws`` more full-dose images
    that share the first low dose's counts (:func:`simulate_scan`'s ``oracle``). Slab ``k``
    holds slices ``k * slab ... (k + 1) * slab - 1`` and is simulated with :func:`halo_slices`
    more on each side."""
    depth = activity.shape[2]
    halo = halo_slices(scan)
    slab = min(slab, depth)
    if scan.mode != "2d":  # a slab and its halo must fit in the scanner's axial field of view
        axial_fov_mm = geometry.get_preset(SCANNERS[scan.scanner]["preset"]).axial_fov_mm
        slab = max(1, min(slab, int(axial_fov_mm // scan.voxel_mm) - 2 * halo))
    extent = slab + 2 * halo
    data_op, recon_op, planes = scan_projectors(scan, activity.shape[:2] + (extent,))
    core = torch.from_numpy(np.abs(planes) < slab * scan.voxel_mm / 2)  # the planes of the slab's own slices
    n_slabs = math.ceil(depth / slab)
    pad = ((0, 0), (0, 0), (halo, n_slabs * slab - depth + halo))
    activity = torch.from_numpy(np.pad(activity, pad))
    mu = torch.from_numpy(np.pad(mu, pad))
    expected = {}
    for k in range(n_slabs):
        part = activity[..., k * slab:k * slab + extent]
        if part.sum() > 0:
            expected[k] = simulate.expected_data(
                part, data_op, mu[..., k * slab:k * slab + extent], counts_per_unit=1.0,
                randoms_fraction=scan.randoms_fraction, scatter_fraction=scan.scatter_fraction)
    unit_total = sum(float(e.ybar[..., core].sum()) for e in expected.values())
    if unit_total <= 0:
        raise ValueError("the phantom has no activity in the field of view")
    scale = total_counts / unit_total  # counts per unit of projected SUV at full dose
    factors = torch.tensor([1.0] + [float(d) for d in drfs] + [1.0] * oracle_draws, dtype=torch.float64)
    images = np.zeros((len(factors),) + (activity.shape[0], activity.shape[1], n_slabs * slab), np.float32)
    prompts = np.zeros(len(factors))
    for k, data in expected.items():
        full = simulate.poisson(data.ybar * scale, noise_seed(seed, k, 0))
        counts = [full] + [simulate.thin(full, 1.0 / d, noise_seed(seed, k, 1 + i)) for i, d in enumerate(drfs)]
        missing = data.ybar * scale * (1.0 - 1.0 / float(drfs[0])) if oracle_draws else None
        counts = torch.stack(counts + [counts[1] + simulate.poisson(missing, noise_seed(seed, k, ORACLE_TAG, j))
                                       for j in range(oracle_draws)])
        prompts += counts[..., core].double().sum(dim=(1, 2, 3)).numpy()
        level = (scale / factors).to(counts.dtype)
        additive = data.additive.unsqueeze(0) * level.reshape(-1, 1, 1, 1)
        image = recon.osem(counts, recon_op, scan.iterations, scan.subsets, mult_factor=data.mult_factor,
                           additive=additive, scale=level)
        if on_planes(scan):
            image = _planes_to_slices(image, planes, extent, scan.voxel_mm)
        images[..., k * slab:(k + 1) * slab] = image[..., halo:halo + slab].cpu().numpy()
    return images[..., :depth], prompts


def post_filter(images, fwhm_mm, voxel_mm):
    """Gaussian post-filter (FWHM in mm) of ``(B, X, Y, Z)`` images over the spatial axes."""
    if fwhm_mm <= 0:
        return images
    return gaussian_filter(images, fwhm_to_sigma(fwhm_mm) / voxel_mm, axes=(1, 2, 3)).astype(np.float32)


def resample_labels(labels, affine, voxel_mm):
    """Nearest-neighbour resampling of an integer label volume to ``voxel_mm`` on the grid of
    :func:`volumes.resample_to_voxel`: ``(int16 array, affine)``. A label that nearest neighbour
    would lose (smaller than the new voxels) keeps the voxel at its centre."""
    resampled, target = volumes.resample_to_voxel(labels, affine, voxel_mm, order=0)
    resampled = np.rint(resampled).astype(np.int16)
    lost = np.setdiff1d(np.unique(labels), np.unique(resampled))
    for label in lost[lost != 0]:
        centre = np.append(np.argwhere(labels == label).mean(axis=0), 1.0)
        index = np.rint(np.linalg.solve(target, np.asarray(affine, float) @ centre)[:3]).astype(int)
        resampled[tuple(np.clip(index, 0, np.array(resampled.shape) - 1))] = label
    return resampled, target


def simulate_scan(phantom, scan: ScanSettings, drfs, seed, counts_per_mm, model_voxel_mm=None, *,
                  slab=32, oracle_draws=0) -> dict:
    """Full- and low-dose images of one phantom acquired and reconstructed as ``scan`` says.

    :param phantom: a :class:`~guided_diffusion.pet.phantoms.Phantom` (``activity`` SUV and
        ``mu`` 1/mm, ``(X, Y, Z)``, ``affine``) on the native grid: isotropic ``scan.voxel_mm``.
    :param drfs: dose reduction factors (>= 1) of the low-dose images.
    :param seed: integer seed of the Poisson and thinning noise.
    :param counts_per_mm: full-dose expected prompts per mm of axial length.
    :param model_voxel_mm: resample the images linearly to this voxel size (mm) unless the
        native one is within 1 %; labels then need :func:`resample_labels`.
    :param slab: slices projected together.
    :param oracle_draws: > 0 adds ``oracle``: the mean of this many full-dose images that keep
        the first low dose's counts and draw the counts it lacks afresh (Poisson with mean
        ``(1 - 1 / drf)`` of the full dose's, the true activity's). It estimates the posterior
        mean of the full dose given the low-dose data and the truth, the least squared error any
        denoiser can reach: with ``K`` draws its expected squared error is ``(1 + 1 / K)`` times
        that minimum (the full dose is one more draw from the same distribution).
    :return: dict with ``full`` (X, Y, Z) float32 SUV, ``low`` (len(drfs), X, Y, Z), ``prompts``
        ([full, low...] counts), ``affine`` (of the returned grid), ``native_affine``,
        ``resampled``, ``voxel_mm`` and ``native_voxel_mm`` (mm), ``expected_full_counts``;
        ``oracle`` (X, Y, Z) if asked.
    """
    native = np.asarray(phantom.voxel_mm, dtype=float)
    if np.abs(native - scan.voxel_mm).max() > VOXEL_TOLERANCE_MM:
        raise ValueError(f"the phantom's voxels {tuple(native)} mm are not the scan's native "
                         f"{scan.voxel_mm:g} mm; build it on the native grid")
    if any(d < 1 for d in drfs):
        raise ValueError(f"DRFs must be >= 1, got {list(drfs)}")
    total_counts = counts_per_mm * phantom.activity.shape[2] * scan.voxel_mm
    if oracle_draws < 0 or (oracle_draws and not drfs):
        raise ValueError(f"oracle_draws must be >= 0 and needs a low dose, got {oracle_draws} with DRFs {list(drfs)}")
    images, prompts = _acquire(phantom.activity, phantom.mu, scan, drfs, total_counts, slab, seed, oracle_draws)
    if oracle_draws:  # the draws' mean, before the post-filter (linear) and any resampling
        images = np.concatenate([images[:1 + len(drfs)], images[1 + len(drfs):].mean(axis=0, keepdims=True)])
        prompts = prompts[:1 + len(drfs)]
    images = post_filter(images, scan.post_filter_mm, scan.voxel_mm)
    native_affine = np.asarray(phantom.affine, dtype=float)
    affine, voxel = native_affine, scan.voxel_mm
    resampled = model_voxel_mm is not None and not np.allclose(scan.voxel_mm, model_voxel_mm,
                                                                rtol=RESAMPLE_RTOL)
    if resampled:  # as scripts/test.py resamples its inputs
        stack = [volumes.resample_image(image, native_affine, model_voxel_mm) for image in images]
        images = np.stack([image for image, _ in stack])
        affine, voxel = stack[0][1], float(model_voxel_mm)
    result = dict(full=images[0], low=images[1:1 + len(drfs)], prompts=[float(p) for p in prompts], affine=affine,
                  native_affine=native_affine, resampled=resampled, voxel_mm=voxel,
                  native_voxel_mm=float(scan.voxel_mm), expected_full_counts=float(total_counts))
    if oracle_draws:
        result["oracle"] = images[-1]
    return result
