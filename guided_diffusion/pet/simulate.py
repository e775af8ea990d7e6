"""Low-dose PET data simulation: attenuation, normalisation, randoms, scatter, Poisson, thinning.

Expected counts per sinogram bin (all sinograms ``(radial, view, plane)``, optional batch dim):

    ybar = n * a * P(x) * scale + r + s

with ``P`` the projector (line integrals in activity * mm), ``a = exp(-P mu)`` the attenuation
factors (``mu`` in 1/mm), ``n`` the normalisation (detection efficiencies), ``scale`` the counts
per unit of projected activity, ``r`` randoms and ``s`` scatter. Counts are set either by
``total_counts`` (the sum of ybar, e.g. 1M / 0.3M / 0.1M per slice as in the BC-DPM paper) or by
``counts_per_unit``; a dose reduction factor ``drf`` divides either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from .filters import convolve_axis, fwhm_to_sigma
from .linear_operator import LinearOperator, psf_kernel
from .projector import geometric_projector

MU_MAX_PER_MM = 0.05          # bone at 511 keV is ~0.017/mm; 0.05/mm can only be a unit error
DEFAULT_SCATTER_FWHM_MM = 150.0

Seed = Union[int, torch.Generator]


@dataclass
class ExpectedData:
    """Noise-free sinograms and the factors that made them (see module docstring).

    ``mult_factor`` is ``n * a``; ``scale`` holds the counts per unit of projected activity
    (shape ``()`` or ``(B,)``); pass both to ``recon.osem`` to get images in activity units.
    """

    ybar: torch.Tensor
    trues: torch.Tensor
    randoms: torch.Tensor
    scatter: torch.Tensor
    mult_factor: torch.Tensor
    scale: torch.Tensor

    @property
    def additive(self) -> torch.Tensor:
        """Randoms + scatter, the additive term of the model."""
        return self.randoms + self.scatter


def _as_tensor(value, name, like=None) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor or numpy array, got {type(value).__name__}")
    if like is not None:
        value = value.to(device=like.device, dtype=like.dtype)
    return value


def _check_image(value, name, projector, nonnegative=True) -> torch.Tensor:
    value = _as_tensor(value, name)
    shape = tuple(projector.image_shape)
    if value.dim() not in (3, 4) or tuple(value.shape[-3:]) != shape:
        raise ValueError(f"{name} must have shape {shape} or (B, *{shape}) to match the projector, "
                         f"got {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if nonnegative and (value < 0).any():
        raise ValueError(f"{name} has negative values (min {value.min().item():.4g}); activity must be >= 0")
    return value


def _check_mu(mu, projector) -> torch.Tensor:
    mu = _check_image(mu, "mu", projector, nonnegative=False)
    if (mu < 0).any():
        raise ValueError(f"attenuation map mu has negative values (min {mu.min().item():.4g}/mm)")
    if mu.max() > MU_MAX_PER_MM:
        raise ValueError(
            f"attenuation map mu reaches {mu.max().item():.4g}, above {MU_MAX_PER_MM}/mm; mu must be in 1/mm "
            "(water is 0.0096/mm at 511 keV) - it was probably given in 1/cm, divide it by 10")
    return mu


def attenuation_factors(mu, projector: LinearOperator) -> torch.Tensor:
    """Attenuation factors ``exp(-P mu)`` (sinogram) of an attenuation map ``mu`` in 1/mm.

    The geometric projector is used (no PSF blurring of mu).
    """
    mu = _check_mu(mu, projector)
    geometric = geometric_projector(projector)
    return torch.exp(-geometric.forward(mu.to(device=geometric.device, dtype=geometric.dtype)))


def _sum_per_item(sino: torch.Tensor) -> torch.Tensor:
    return sino.sum(dim=(-3, -2, -1))


def _per_item(values: torch.Tensor) -> torch.Tensor:
    """Reshape per-item scalars ``()``/``(B,)`` to broadcast against sinograms."""
    return values.reshape(values.shape + (1, 1, 1))


def smooth_scatter_shape(attenuated_emission: torch.Tensor, support: torch.Tensor, radial_bin_mm: float,
                         fwhm_mm: float = DEFAULT_SCATTER_FWHM_MM) -> torch.Tensor:
    """A smooth scatter distribution: Gaussian low-pass of the attenuated emission sinogram along
    the radial (and plane) axes, restricted to the body ``support`` (a 0/1 sinogram)."""
    kernel = psf_kernel(fwhm_to_sigma(fwhm_mm) / radial_bin_mm)
    smooth = convolve_axis(attenuated_emission, kernel, -3)
    if attenuated_emission.shape[-1] > 1:
        smooth = convolve_axis(smooth, kernel, -1)
    return smooth * support


def expected_data(activity, projector: LinearOperator, mu=None, *, norm=None, randoms_fraction: float = 0.2,
                  scatter_fraction: float = 0.0, total_counts: Optional[float] = None,
                  counts_per_unit: Optional[float] = None, drf: float = 1.0,
                  scatter_fwhm_mm: float = DEFAULT_SCATTER_FWHM_MM) -> ExpectedData:
    """Noise-free expected counts ``ybar = n * a * P(x) * scale + r + s``.

    Args:
        activity: ``(X, Y, Z)`` or ``(B, X, Y, Z)`` non-negative activity (e.g. SUV) on the projector grid.
        projector: from ``make_projector`` (optionally composed with a PSF).
        mu: optional attenuation map in 1/mm, same grid (values above 0.05/mm are rejected).
        norm: optional normalisation sinogram ``n`` (detection efficiencies, > 0 where measured).
        randoms_fraction: randoms total as a fraction of the trues total, spread uniformly over bins.
        scatter_fraction: scatter total as a fraction of the trues total, smooth within the body.
        total_counts: expected total counts sum(ybar) per item before ``drf`` (trues + randoms + scatter).
        counts_per_unit: alternatively, counts per unit of projected activity (activity * mm).
        drf: dose reduction factor (>= 1 for low dose): the count level is divided by it.
        scatter_fwhm_mm: width of the scatter low-pass filter.
    Returns:
        ExpectedData; ``scale`` is the counts per unit used (per batch item when total_counts is set).
    """
    for name, value in (("randoms_fraction", randoms_fraction), ("scatter_fraction", scatter_fraction)):
        if not (np.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not (np.isfinite(drf) and drf > 0):
        raise ValueError(f"drf must be a positive number, got {drf!r}")
    if (total_counts is None) == (counts_per_unit is None):
        raise ValueError("give exactly one of total_counts or counts_per_unit")
    level = total_counts if total_counts is not None else counts_per_unit
    if not (np.isfinite(level) and level > 0):
        raise ValueError(f"the count level must be a positive number, got {level!r}")
    activity = _check_image(activity, "activity", projector)
    geometric = geometric_projector(projector)
    activity = activity.to(device=geometric.device, dtype=geometric.dtype)

    attenuation = None if mu is None else attenuation_factors(mu, projector)
    mult = torch.ones(projector.sinogram_shape, device=activity.device, dtype=activity.dtype)
    if attenuation is not None:
        mult = mult * attenuation
    if norm is not None:
        norm = _as_tensor(norm, "norm", like=activity)
        if tuple(norm.shape[-3:]) != tuple(projector.sinogram_shape) or not torch.isfinite(norm).all() \
                or (norm < 0).any():
            raise ValueError(f"norm must be a finite non-negative sinogram of shape {projector.sinogram_shape}")
        mult = mult * norm

    emission = projector.forward(activity)
    trues_per_unit = mult * emission
    trues_total = _sum_per_item(trues_per_unit)
    if (trues_total <= 0).any():
        raise ValueError("the activity projects to zero counts (empty or outside the field of view)")
    if total_counts is not None:
        scale = total_counts / drf / ((1 + randoms_fraction + scatter_fraction) * trues_total)
    else:
        scale = torch.full_like(trues_total, counts_per_unit / drf)
    trues = trues_per_unit * _per_item(scale)
    n_bins = float(np.prod(projector.sinogram_shape))
    randoms = torch.ones_like(trues) * _per_item(randoms_fraction * _sum_per_item(trues) / n_bins)
    scatter = torch.zeros_like(trues)
    if scatter_fraction > 0:
        attenuated = emission if attenuation is None else emission * attenuation
        body = attenuation < 1 if attenuation is not None else emission > 0
        shape = smooth_scatter_shape(attenuated, body.to(trues.dtype), geometric.scanner.radial_bin_mm,
                                     scatter_fwhm_mm)
        scatter = shape * _per_item(scatter_fraction * _sum_per_item(trues) / _sum_per_item(shape))
    return ExpectedData(trues + randoms + scatter, trues, randoms, scatter, mult, scale)


def _generator(seed: Seed, device) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return torch.Generator(device=device).manual_seed(int(seed))
    raise TypeError(f"seed must be an int or a torch.Generator (explicit seeds only), got {seed!r}")


def poisson(ybar: torch.Tensor, seed: Seed) -> torch.Tensor:
    """Poisson counts with means ``ybar`` (any shape), reproducible from ``seed`` (int or Generator)."""
    ybar = _as_tensor(ybar, "ybar")
    if not torch.isfinite(ybar).all() or (ybar < 0).any():
        raise ValueError("ybar must be finite and non-negative")
    return torch.poisson(ybar, generator=_generator(seed, ybar.device))


def thin(counts: torch.Tensor, fraction: float, seed: Seed) -> torch.Tensor:
    """Binomial thinning: keep each count with probability ``fraction``.

    Thinning a full-dose Poisson realisation with ``fraction = 1 / drf`` gives a low-dose
    realisation aligned with it (itself Poisson with mean ``ybar / drf``).
    """
    counts = _as_tensor(counts, "counts")
    if not (0 < fraction <= 1):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if not torch.isfinite(counts).all() or (counts < 0).any() or (counts != torch.round(counts)).any():
        raise ValueError("counts must be non-negative integers (a Poisson realisation)")
    counts = counts.to(torch.float64 if counts.dtype == torch.float64 else torch.float32)
    probability = torch.full_like(counts, float(fraction))
    return torch.binomial(counts, probability, generator=_generator(seed, counts.device))
