"""Post-processing steps run on each finished ensemble member, in order.

A step is a callable ``step(volume, member) -> (volume, info)`` with a ``name`` (the key of its
``info`` in the member's report); ``volume`` is one member's SUV volume ``(X, Y, Z)`` on the
input grid and ``member`` a :class:`Member` (the input, its affine, the member's seed and a
way to denoise another input with the same settings). The denoiser runs the list that
:func:`default_steps` builds from its settings.
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .fusion import fuse_with_input
from .hot_voxels import HOT_MODES, replace_hot_voxels, rescale_factor


@dataclass
class Member:
    """What a post-processing step may use besides the member's volume.

    :param low_dose: the input, SUV ``(X, Y, Z)``, negatives clipped to 0 (float32).
    :param affine: its 4x4 affine (mm).
    :param seed: the member's seed.
    :param denoise: ``denoise(suv) -> (volume, info)``: the same sampling (model, hooks, seed)
        on another input of the same grid, without post-processing.
    """

    low_dose: np.ndarray
    affine: np.ndarray
    seed: int
    denoise: Callable


class HotVoxels:
    """Voxels near and above the model's SUV range (``clip_suv``), see
    :mod:`~guided_diffusion.sampling.hot_voxels`: ``"rescale"`` (a second pass on the input
    scaled into range), ``"input"`` or ``"clip"`` (keep the saturated output)."""

    name = "hot_voxels"

    def __init__(self, mode, clip_suv):
        if mode not in HOT_MODES:
            raise ValueError(f"hot_voxels must be one of {HOT_MODES}, got {mode!r}")
        self.mode = mode
        self.clip_suv = float(clip_suv)

    def __call__(self, volume, member):
        if self.mode == "clip":
            return volume, dict(mode=self.mode)
        low_dose = member.low_dose
        factor = rescale_factor(low_dose, self.clip_suv)
        if self.mode == "input" or factor == 1.0:
            return replace_hot_voxels(volume, low_dose, low_dose, self.clip_suv), dict(mode="input")
        scaled, info = member.denoise(low_dose / factor)
        hot = replace_hot_voxels(scaled * factor, low_dose, low_dose, self.clip_suv * factor)
        return replace_hot_voxels(volume, hot, low_dose, self.clip_suv), dict(
            mode=self.mode, factor=factor,
            network_evaluations=info["network_evaluations_per_patch"] * info["patches"])


class Fusion:
    """Noise-adaptive fusion with the input (:func:`~guided_diffusion.sampling.fusion.fuse_with_input`)."""

    name = "fusion"

    def __init__(self, kappa):
        if not kappa > 0:
            raise ValueError(f"fusion kappa must be > 0, got {kappa}")
        self.kappa = float(kappa)

    def __call__(self, volume, member):
        return fuse_with_input(volume, member.low_dose, self.kappa)


def default_steps(hot_voxels, clip_suv, fusion_kappa=None):
    """The hot-voxel step, then fusion when ``fusion_kappa`` is set (``None``/0: off)."""
    steps = [HotVoxels(hot_voxels, clip_suv)]
    if fusion_kappa:
        steps.append(Fusion(fusion_kappa))
    return steps
