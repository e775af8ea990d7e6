"""
Noise-adaptive fusion of a denoised PET volume with its low-dose input.

A denoiser trained on every dose level at once smooths a nearly noise-free (low DRF) input
about as much as a very noisy one: lesions and organ edges lose contrast that the input
still carries. Where the denoised image ``x`` departs from the input ``y`` by more than the
input's noise explains, the departure is the model's bias, and the input is the better
estimate there. With ``r2`` the local mean of ``(y - x)^2`` and ``s2`` the input's expected
noise variance, the fused image is

    x + w (y - x),    w = max(0, 1 - s2 / r2)

(the local linear minimum-mean-square-error weight of Lee's adaptive filter, applied to the
residual): ``w = 0`` where the residual is noise (the denoised value is kept), ``w -> 1``
where it is much larger than the noise.

The noise variance comes from the input alone: reconstructed PET noise has a variance roughly
proportional to the local activity, ``s2 = kappa * nu * mean(y)``, where the *noise index*
``nu`` (variance per SUV) is the median, over voxels of moderate uptake, of the local
high-pass energy of ``y`` divided by its local mean (:func:`noise_index`). ``nu`` grows
linearly with the dose reduction factor (BENCHMARKS.md lists measured values) but underestimates the true per-voxel variance because
the noise is spatially correlated; ``kappa`` corrects that and is tuned on validation subjects
for a checkpoint (its sidecar's ``sampling.fusion_kappa``).

All volumes are SUV arrays of one shape in any axis order; filter widths are in voxels.
"""

import numpy as np
from scipy.ndimage import uniform_filter

from ..pet.filters import gaussian_filter

NOISE_BAND_SUV = (1.0, 8.0)
"""Local-mean SUV range of the voxels that estimate the noise index (soft tissue, liver,
muscle: enough uptake for Poisson statistics, little structure)."""

MIN_BAND_VOXELS = 1000
"""Fewest band voxels :func:`noise_index` measures on."""

WHITE_NOISE_MEDIAN = 0.620
"""Median of ``(d_x^2 + d_y^2 + d_z^2) / 18`` for unit-variance white Gaussian noise (its mean
is 1; Monte Carlo over 158^3 voxels): :func:`difference_noise_index`'s normalisation."""

HIGHPASS_SIGMA = 1.0
"""Gaussian width (voxels) of the smoothing removed by the noise index's high-pass."""

FUSION_WINDOW = 7
"""Box width (voxels) of the local residual energy and of the noise index's high-pass energy
(chosen with kappa on validation subjects by ``scripts/tune_fusion.py``; see the model card)."""

MEAN_SIGMA = 2.0
"""Gaussian width (voxels) of the local mean in the noise index and the noise variance map."""


def noise_index(low_dose, band_suv=NOISE_BAND_SUV, window=FUSION_WINDOW):
    """The input's noise variance per unit SUV (SUV), estimated from the image alone.

    ``median(box_window[(y - G_1 y)^2] / G_2 y)`` over voxels whose local mean ``G_2 y`` lies
    in ``band_suv``.

    :param low_dose: SUV volume (3D).
    :return: the noise index, or ``None`` when fewer than :data:`MIN_BAND_VOXELS` voxels lie in
        the band (no tissue to measure it on).
    """
    y = np.asarray(low_dose, dtype=np.float64)
    local_mean = gaussian_filter(y, MEAN_SIGMA)
    highpass = y - gaussian_filter(y, HIGHPASS_SIGMA)
    energy = uniform_filter(highpass * highpass, window)
    return _band_median_per_suv(energy, local_mean, band_suv)


def _band_median_per_suv(energy, local_mean, band_suv):
    """``median(energy / local_mean)`` over voxels whose local mean lies in ``band_suv``, or
    ``None`` when fewer than :data:`MIN_BAND_VOXELS` do."""
    band = (local_mean > band_suv[0]) & (local_mean < band_suv[1])
    if band.sum() < MIN_BAND_VOXELS:
        return None
    return float(np.median(energy[band] / local_mean[band]))


def difference_noise_index(low_dose, band_suv=NOISE_BAND_SUV):
    """The input's noise variance per unit SUV (SUV) from second differences, which anatomy
    inflates less than :func:`noise_index`'s windowed high-pass energy.

    ``median((d_x^2 + d_y^2 + d_z^2) / 18 / G_2 y) / WHITE_NOISE_MEDIAN`` over voxels whose
    local mean ``G_2 y`` lies in ``band_suv``, ``d_a`` the second difference along axis ``a``:
    uncorrelated noise of variance ``v * mean`` reads ``v``; structure that is linear over three
    voxels reads 0, and a per-voxel median (no window) keeps edges and folds from reaching most
    band voxels.
    Correlated noise (PSF, post-filter, small voxels) reads lower than its variance.

    :param low_dose: SUV volume (3D, at least 3 voxels along each axis).
    :return: the index, or ``None`` when fewer than :data:`MIN_BAND_VOXELS` interior voxels lie
        in the band.
    """
    y = np.asarray(low_dose, dtype=np.float64)
    inner = (slice(1, -1),) * 3
    energy = np.zeros_like(y[inner])
    for axis in range(3):
        cut = [slice(1, -1)] * 3
        cut[axis] = slice(None)
        energy += np.diff(y[tuple(cut)], 2, axis=axis) ** 2
    median = _band_median_per_suv(energy / 18.0, gaussian_filter(y, MEAN_SIGMA)[inner], band_suv)
    return None if median is None else median / WHITE_NOISE_MEDIAN


NOISE_ESTIMATORS = {"highpass": noise_index, "second_difference": difference_noise_index}
"""The noise indices a tuning table or fit can be keyed by (its ``noise_estimator``; BC-DPM
tables without one were measured with ``"highpass"``)."""

TABLE_ESTIMATOR = "second_difference"
"""The estimator new tuning tables and fits are measured with."""


def estimate_noise_index(low_dose, estimator="highpass"):
    """``low_dose``'s noise index by the named estimator (:data:`NOISE_ESTIMATORS`; tables and
    fits record theirs as ``noise_estimator``, absent meaning ``"highpass"``)."""
    if estimator not in NOISE_ESTIMATORS:
        raise ValueError(f"unknown noise_estimator {estimator!r}; expected one of {sorted(NOISE_ESTIMATORS)}")
    return NOISE_ESTIMATORS[estimator](low_dose)


def fusion_weight(denoised, low_dose, noise_variance, window=FUSION_WINDOW):
    """``w = max(0, 1 - noise_variance / r2)``, ``r2`` the ``window``^3 box mean of the squared
    residual ``(low_dose - denoised)^2``; 0 where ``r2`` is 0."""
    residual = np.asarray(low_dose, dtype=np.float64) - np.asarray(denoised, dtype=np.float64)
    r2 = uniform_filter(residual * residual, window)
    with np.errstate(divide="ignore", invalid="ignore"):
        weight = np.where(r2 > 0, 1.0 - noise_variance / r2, 0.0)
    return np.clip(weight, 0.0, 1.0)


def fuse_with_input(denoised, low_dose, kappa, window=FUSION_WINDOW):
    """Fuse a denoised volume with its low-dose input (see the module docstring).

    :param denoised, low_dose: SUV volumes of equal shape.
    :param kappa: multiplier of the estimated noise variance (> 0; larger keeps more of the
        denoised image).
    :param window: box width (voxels) of the local residual energy.
    :return: ``(fused float32 volume, info)`` with ``info = {"noise_index", "mean_weight"}``
        (the mean weight over voxels above 0.05 SUV in the input); when the noise index cannot
        be measured the denoised volume comes back unchanged with ``noise_index = None``.
    """
    if kappa <= 0:
        raise ValueError(f"fusion kappa must be > 0, got {kappa}")
    y = np.asarray(low_dose, dtype=np.float64)
    nu = noise_index(y, window=window)
    if nu is None:
        return np.asarray(denoised, dtype=np.float32), dict(noise_index=None, mean_weight=0.0)
    variance = kappa * nu * np.clip(gaussian_filter(y, MEAN_SIGMA), 0.0, None)
    weight = fusion_weight(denoised, y, variance, window)
    fused = (denoised + weight * (y - denoised)).astype(np.float32)
    body = y > 0.05
    mean_weight = float(weight[body].mean()) if body.any() else 0.0
    return fused, dict(noise_index=nu, mean_weight=mean_weight)
