"""
Voxels above the model's SUV range.

A model represents SUV in ``[0, clip]`` only (the normalisation's ``clip``, 16 SUV for the
shipped weights), so its output saturates there, while PSMA or DOTATATE kidneys, spleen and
bladder reach 30-50 SUV. :class:`~guided_diffusion.sampling.denoiser.VolumeDenoiser` handles such
voxels in one of three ways (``SamplingSettings.hot_voxels``):

- ``"rescale"``: denoise a second time the input divided by ``k`` (:func:`rescale_factor`),
  which brings the hottest structure below the ramp, and take the hot voxels from that pass times
  ``k``. For Poisson-like PET noise (variance proportional to the mean), ``y / k`` of an image
  at dose reduction factor ``d`` has the relative noise of an image at ``d / k`` with ``k``
  times less activity: an image of the kind the model was trained on. Costs a second sampling
  pass, only for volumes that have hot voxels.
- ``"input"``: take the hot voxels from the (noisy) input.
- ``"clip"``: keep the saturated model output.

The replacement always blends in with a linear ramp of the input's value from ``0.75 clip``
(weight 0) to ``clip`` (weight 1), :data:`HOT_RAMP`, so no edge appears. The ramp and the
rescale factor read the input smoothed by a Gaussian of :data:`HOT_SMOOTHING_SIGMA` voxels: hot
organs and lesions span several voxels, while a single-voxel noise spike of a low-dose image
is not a hot structure and must not be copied into the output. All volumes are SUV arrays of one shape in any axis order.
"""

import numpy as np

from ..pet.filters import gaussian_filter

HOT_MODES = ("rescale", "input", "clip")
DEFAULT_HOT_MODE = "rescale"

HOT_RAMP = (0.75, 1.0)
"""Blend range of :func:`replace_hot_voxels`, in units of the clip SUV."""

HOT_SMOOTHING_SIGMA = 1.0
"""Gaussian width (voxels) of the smoothing of the input that decides which voxels are hot."""


def smoothed_input(low_dose):
    """The input smoothed by :data:`HOT_SMOOTHING_SIGMA` voxels (float32), what the hot-voxel
    decisions read."""
    return gaussian_filter(np.asarray(low_dose, dtype=np.float32), HOT_SMOOTHING_SIGMA)


def hot_weight(low_dose, clip_suv):
    """Weight of the replacement: 0 where the smoothed input is below ``0.75 clip_suv``, 1 above
    ``clip_suv``, linear between."""
    lo, hi = (clip_suv * f for f in HOT_RAMP)
    return np.clip((smoothed_input(low_dose) - lo) / (hi - lo), 0.0, 1.0)


def replace_hot_voxels(denoised, replacement, low_dose, clip_suv):
    """``denoised`` where ``low_dose`` is inside the model's range, ``replacement`` above it
    (ramp :func:`hot_weight`); float32."""
    weight = hot_weight(low_dose, clip_suv)
    return ((1.0 - weight) * denoised + weight * replacement).astype(np.float32)


def rescale_factor(low_dose, clip_suv):
    """``k >= 1`` that maps the smoothed input's maximum to the ramp's start (``0.75 clip``), so
    the whole scaled input lies below the ramp; 1 when nothing reaches the ramp."""
    return max(1.0, float(smoothed_input(low_dose).max()) / (HOT_RAMP[0] * clip_suv))
