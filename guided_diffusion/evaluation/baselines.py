"""Classical denoisers for PET volumes, their parameter search and stored parameters.

Volumes are numpy arrays ``(X, Y, Z)`` (Z axial) in SUV; every denoiser returns a float32 array
of the same shape. Intensity parameters (BM3D ``sigma``, NLM ``h`` / ``sigma``) are in the
volume's units (SUV); widths in mm or voxels as named.

Call any of them as ``denoise(name, volume, **params)`` with ``name`` in :data:`DENOISERS`:

``"gaussian"``  3D Gaussian filter, ``sigma_mm`` (with ``voxel_mm``) or ``sigma_vox``.
``"bm3d"``      BM3D with a *given* noise standard deviation ``sigma`` (a blind estimate is far too
                low on reconstructed PET noise, which is spatially correlated).
                ``mode="slice"`` (default) runs 2D BM3D on each axial slice (``bm3d`` package);
                ``mode="volume"`` runs BM4D on the whole volume (``bm4d`` package, a dependency of
                ``bm3d``). Both take time about linear in the voxel count (BENCHMARKS.md has
                timings). Slice-wise is the default because its working memory is one slice;
                BM4D's grows with the whole volume.
``"nlm"``       non-local means (``skimage.restoration.denoise_nl_means``), cut-off ``h``;
                ``mode="volume"`` (default, 3D patches) or ``"slice"``.

:func:`tune` grid-searches parameters on validation pairs; :func:`save_params` /
:func:`load_params` keep the chosen parameters in JSON keyed by method and dose reduction factor.
"""

import itertools
import json
import math

import numpy as np
from bm3d import bm3d as bm3d_2d
from bm4d import bm4d as bm4d_3d
from skimage.restoration import denoise_nl_means

from . import metrics
from ..pet.filters import gaussian_filter
from ..pet.volumes import atomic_write_bytes

MODES = ("slice", "volume")


def _check_volume(volume):
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D (X, Y, Z) volume, got shape {volume.shape}")
    if not np.isfinite(volume).all():
        raise ValueError("volume contains NaN or inf")
    return volume


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def _per_axial_slice(function, volume):
    return np.stack([function(volume[:, :, z]) for z in range(volume.shape[2])], axis=2)


def gaussian(volume, sigma_mm=None, sigma_vox=None, voxel_mm=(1.0, 1.0, 1.0)):
    """3D Gaussian filter; give exactly one of ``sigma_mm`` (with ``voxel_mm``) or ``sigma_vox``.

    Sigmas are standard deviations (:func:`~guided_diffusion.pet.filters.fwhm_to_sigma`), scalar
    or one per axis ``(X, Y, Z)``; the toolkit's filter (:mod:`guided_diffusion.pet.filters`).
    """
    volume = _check_volume(volume)
    if (sigma_mm is None) == (sigma_vox is None):
        raise ValueError("give exactly one of sigma_mm or sigma_vox")
    if sigma_mm is not None:
        voxel = np.broadcast_to(np.asarray(voxel_mm, dtype=np.float64), (3,))
        if not (voxel > 0).all():
            raise ValueError(f"voxel_mm must be positive, got {voxel_mm}")
        sigma_vox = np.broadcast_to(np.asarray(sigma_mm, dtype=np.float64), (3,)) / voxel
    sigma_vox = np.broadcast_to(np.asarray(sigma_vox, dtype=np.float64), (3,))
    if (sigma_vox < 0).any():
        raise ValueError(f"Gaussian sigma must be non-negative, got {sigma_vox}")
    return gaussian_filter(volume, tuple(sigma_vox))


def bm3d(volume, sigma, mode="slice", profile="np"):
    """BM3D (``mode="slice"``, per axial slice) or BM4D (``mode="volume"``) with noise std ``sigma``."""
    volume = _check_volume(volume)
    _check_mode(mode)
    if not sigma > 0:
        raise ValueError(f"BM3D needs the noise standard deviation sigma > 0, got {sigma}")
    if mode == "slice":
        result = _per_axial_slice(lambda image: bm3d_2d(image, sigma, profile=profile), volume)
    else:
        result = bm4d_3d(volume, sigma, profile=profile)
    return np.asarray(result, dtype=np.float32)


def nlm(volume, h, mode="volume", patch_size=5, patch_distance=6, sigma=0.0, fast_mode=True):
    """Non-local means with cut-off ``h`` (SUV); patch size / search distance in voxels."""
    volume = _check_volume(volume)
    _check_mode(mode)
    if not h > 0:
        raise ValueError(f"NLM needs h > 0, got {h}")

    def run(image):
        return denoise_nl_means(
            image, patch_size=patch_size, patch_distance=patch_distance, h=h, sigma=sigma,
            fast_mode=fast_mode, preserve_range=True, channel_axis=None,
        )

    result = run(volume) if mode == "volume" else _per_axial_slice(run, volume)
    return np.asarray(result, dtype=np.float32)


DENOISERS = {"gaussian": gaussian, "bm3d": bm3d, "nlm": nlm}


def denoise(name, volume, **params):
    """Denoise ``volume`` (X, Y, Z) with method ``name`` and its keyword parameters."""
    if name not in DENOISERS:
        raise ValueError(f"unknown denoiser {name!r}; expected one of {sorted(DENOISERS)}")
    try:
        return DENOISERS[name](volume, **params)
    except TypeError as error:
        raise ValueError(f"bad parameters for {name}: {error}") from error


# ----------------------------------------------------------------------------- tuning

_METRICS = {"psnr": (metrics.psnr, True), "ssim": (metrics.ssim, True),
            "nrmse": (metrics.nrmse, False)}


def _grid_points(grid):
    """A dict of lists -> its cartesian product; a list of dicts -> itself."""
    if isinstance(grid, dict):
        names = list(grid)
        return [dict(zip(names, values)) for values in itertools.product(*grid.values())]
    points = [dict(point) for point in grid]
    if not points:
        raise ValueError("empty parameter grid")
    return points


def tune(name, noisy_list, reference_list, grid, metric="psnr", fixed_params=None, mask_list=None):
    """Grid search of ``name``'s parameters on validation pairs.

    ``grid``: ``{param: [values]}`` (cartesian product) or a list of parameter dicts;
    ``fixed_params`` are passed to every run (e.g. ``voxel_mm``). The score of a grid point is the
    mean ``metric`` (``"psnr"``, ``"ssim"`` higher is better, ``"nrmse"`` lower) over the pairs,
    UDPET convention, within ``mask_list[i]`` if given.
    Returns ``(best_params, table)`` with ``table = [{"params", metric, "per_pair"}, ...]``
    in grid order.
    """
    if metric not in _METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(_METRICS)}")
    if len(noisy_list) != len(reference_list) or not noisy_list:
        raise ValueError(
            f"need matching non-empty lists: {len(noisy_list)} noisy vs "
            f"{len(reference_list)} reference volumes"
        )
    masks = mask_list if mask_list is not None else [None] * len(noisy_list)
    if len(masks) != len(noisy_list):
        raise ValueError(f"{len(masks)} masks for {len(noisy_list)} pairs")
    metric_function, higher_is_better = _METRICS[metric]
    table = []
    for params in _grid_points(grid):
        per_pair = [
            metric_function(reference, denoise(name, noisy, **{**(fixed_params or {}), **params}),
                            mask=mask)
            for noisy, reference, mask in zip(noisy_list, reference_list, masks)
        ]
        table.append({"params": params, metric: float(np.mean(per_pair)), "per_pair": per_pair})
    scored = [row for row in table if not math.isnan(row[metric])]
    if not scored:
        raise ValueError(f"{metric} is undefined for every grid point")
    sign = 1.0 if higher_is_better else -1.0
    best = max(scored, key=lambda row: sign * row[metric])
    return dict(best["params"]), table


# ----------------------------------------------------------------------------- stored parameters


def drf_key(drf):
    """JSON key of a dose reduction factor: ``4 -> "4"``, ``2.5 -> "2.5"``."""
    value = float(drf)
    if not value > 0:
        raise ValueError(f"dose reduction factor must be positive, got {drf}")
    return str(int(value)) if value.is_integer() else repr(value)


def save_params(path, params):
    """Save ``{method: {drf: {param: value}}}`` as JSON (atomic write); DRF keys via :func:`drf_key`."""
    table = {}
    for method, by_drf in params.items():
        if method not in DENOISERS:
            raise ValueError(f"unknown denoiser {method!r} in parameters for {path}")
        if not isinstance(by_drf, dict):
            raise ValueError(f"parameters of {method!r} must be a dict keyed by DRF")
        table[method] = {drf_key(drf): dict(values) for drf, values in by_drf.items()}
    atomic_write_bytes(path, json.dumps(table, indent=2, sort_keys=True) + "\n")


def load_params(path, method=None, drf=None):
    """The whole table from :func:`save_params`, or one method's, or one ``(method, drf)`` entry."""
    try:
        with open(path, "r", encoding="utf-8") as stream:
            table = json.load(stream)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read denoiser parameters from {path}: {error}") from error
    if method is None:
        return table
    if method not in table:
        raise ValueError(f"no parameters for {method!r} in {path} (has {sorted(table)})")
    if drf is None:
        return table[method]
    key = drf_key(drf)
    if key not in table[method]:
        raise ValueError(
            f"no parameters for {method!r} at DRF {key} in {path} (has {sorted(table[method])})"
        )
    return table[method][key]
