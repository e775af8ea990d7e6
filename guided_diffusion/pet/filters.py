"""The toolkit's Gaussian filter, for numpy volumes and torch tensors alike.

One convention everywhere: ``sigma`` in voxels (scalar or one per axis), taps of radius
``int(truncate * sigma + 0.5)`` (scipy.ndimage's), half-sample symmetric borders
(``d c b a | a b c d``, scipy's ``mode="reflect"``: a constant image stays constant) unless
``mode="constant"`` (zeros outside). numpy arrays go through ``scipy.ndimage.gaussian_filter``;
torch tensors through separable shifted multiply-adds with the same taps, so both agree to
rounding. FWHM and sigma are related by :data:`FWHM_PER_SIGMA`.
"""

import math
import numbers

import numpy as np
import torch
from scipy import ndimage

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
"""FWHM / sigma of a Gaussian (about 2.355)."""

MODES = ("reflect", "constant")


def fwhm_to_sigma(fwhm):
    """Standard deviation of a Gaussian of full width at half maximum ``fwhm`` (same units)."""
    return fwhm / FWHM_PER_SIGMA


def gaussian_kernel(sigma, radius=None, truncate=4.0, dtype=torch.float64, device=None):
    """Normalised 1D Gaussian taps for ``sigma`` samples, ``2 * radius + 1`` of them
    (default radius ``int(truncate * sigma + 0.5)``)."""
    if radius is None:
        radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


def convolve_axis(x, kernel, axis, mode="constant"):
    """'Same'-size correlation of ``x`` with an odd-length 1D ``kernel`` along ``axis``.

    Shifted multiply-adds on strided views (one per tap: much faster on a CPU than ``conv1d``
    over a reshaped copy for short kernels). ``mode="constant"``: zeros outside, so a symmetric
    kernel gives a self-adjoint operator; ``"reflect"``: half-sample symmetric borders.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    kernel = kernel.to(device=x.device, dtype=x.dtype)
    centre = kernel.numel() // 2
    n = x.shape[axis]
    if mode == "reflect":
        index = torch.arange(-centre, n + centre, device=x.device).remainder(2 * n)
        index = torch.where(index >= n, 2 * n - 1 - index, index)
        padded = x.index_select(axis, index)
        out = padded.narrow(axis, 0, n) * kernel[0]
        for tap in range(1, kernel.numel()):
            out.add_(padded.narrow(axis, tap, n), alpha=float(kernel[tap]))
        return out
    out = x * kernel[centre]
    for shift in range(1, min(centre, n - 1) + 1):
        out.narrow(axis, 0, n - shift).add_(x.narrow(axis, shift, n - shift), alpha=float(kernel[centre + shift]))
        out.narrow(axis, shift, n - shift).add_(x.narrow(axis, 0, n - shift), alpha=float(kernel[centre - shift]))
    return out


def _sigmas(sigma, ndim):
    sigmas = (sigma,) * ndim if isinstance(sigma, numbers.Real) else tuple(float(s) for s in sigma)
    if len(sigmas) != ndim or any(s < 0 for s in sigmas):
        raise ValueError(f"sigma must be >= 0, scalar or {ndim} values, got {sigma}")
    return sigmas


def gaussian_filter(x, sigma, truncate=4.0, mode="reflect", axes=None):
    """Gaussian filter of ``x`` (numpy array or floating torch tensor) over ``axes``.

    :param sigma: standard deviation in voxels, scalar or one per filtered axis; 0 leaves an
        axis unfiltered.
    :param axes: the filtered axes (default: all of a numpy array; all but the first two,
        ``(B, C, *spatial)``, of a torch tensor).
    :param mode: ``"reflect"`` or ``"constant"`` (see the module docstring).
    :return: the filtered array or tensor (numpy: float as scipy returns it for ``x``'s dtype).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(x, torch.Tensor):
        if not torch.is_floating_point(x):
            raise ValueError(f"gaussian_filter needs a floating tensor, got {x.dtype}")
        axes = tuple(range(2, x.ndim)) if axes is None else tuple(a % x.ndim for a in axes)
        if not axes:
            raise ValueError(f"gaussian_filter needs spatial axes, got a tensor of shape {tuple(x.shape)}")
        for axis, s in zip(axes, _sigmas(sigma, len(axes))):
            if s > 0:
                x = convolve_axis(x, gaussian_kernel(s, truncate=truncate, dtype=x.dtype, device=x.device),
                                  axis, mode)
        return x
    x = np.asarray(x)
    if axes is None:
        return ndimage.gaussian_filter(x, _sigmas(sigma, x.ndim), mode=mode, truncate=truncate)
    return ndimage.gaussian_filter(x, _sigmas(sigma, len(axes)), mode=mode, truncate=truncate, axes=axes)
