"""Invertible input transforms between a user's SUV volume and the model's input tensor.

:class:`InputTransforms` runs its steps in order on the low-dose volume and in reverse order
(each step's :meth:`inverse`) on the sample:

1. :class:`NonNegative`: negative voxels (FBP images have them) are set to 0, and so is every
   negative output value;
2. :class:`ResampleToVoxel`: to the model's voxel size (when the input's differs by more than
   1 %), back onto the input grid at the end;
3. :class:`PadTransaxial`: X and Y zero-padded (air) to the multiple the UNet needs, cropped at
   the end;
4. :class:`ToModelSpace`: SUV ``(X, Y, Z)`` numpy -> model space ``(1, 1, Z, X, Y)`` float32
   tensor on the model's device with the checkpoint's normalisation, and back.

Each step records what its inverse needs in a shared ``record`` dict, which is also what
:meth:`~guided_diffusion.sampling.denoiser.VolumeDenoiser.prepare` returns (``y0`` the model
input, ``negative_fraction``, ``resampled``, ``model_grid_affine``, ``pads``, ...).
"""

import numpy as np
import torch

from ..normalisation import model_to_suv, suv_to_model
from ..pet import volumes


class NonNegative:
    """Clip negative SUV to 0 (input and output); records ``negative_fraction``."""

    def forward(self, suv, record):
        record["negative_fraction"] = float((suv < 0).mean())
        return np.clip(suv, 0.0, None)

    def inverse(self, suv, record):
        return np.clip(suv, 0.0, None).astype(np.float32)


class ResampleToVoxel:
    """Resample to ``voxel_mm`` (cubic splines, clamped at 0, field of view kept centred) and back."""

    def __init__(self, voxel_mm):
        self.voxel_mm = np.broadcast_to(np.asarray(voxel_mm, dtype=float), (3,))

    def forward(self, suv, record):
        affine = record["input_affine"]
        record["resampled"] = not np.allclose(volumes.voxel_sizes(affine), self.voxel_mm, rtol=0.01)
        record["model_grid_affine"] = affine
        if record["resampled"]:
            suv, record["model_grid_affine"] = volumes.resample_image(suv, affine, self.voxel_mm)
        record["model_shape"] = tuple(suv.shape)
        return suv

    def inverse(self, suv, record):
        if not record["resampled"]:
            return suv
        return volumes.resample_image_like(suv, record["model_grid_affine"], record["input_shape"],
                                           record["input_affine"])


class PadTransaxial:
    """Zero-pad X and Y up to a multiple of ``multiple`` (split evenly), crop them back."""

    def __init__(self, multiple):
        self.multiple = int(multiple)

    def forward(self, suv, record):
        pads = []
        for n in suv.shape[:2]:
            total = -n % self.multiple
            pads.append((total // 2, total - total // 2))
        record["pads"] = pads + [(0, 0)]
        return np.pad(suv, record["pads"])

    def inverse(self, suv, record):
        (x0, x1), (y0, y1), _ = record["pads"]
        return suv[x0:suv.shape[0] - x1, y0:suv.shape[1] - y1, :]


class ToModelSpace:
    """SUV ``(X, Y, Z)`` <-> model space ``(1, 1, Z, X, Y)`` with ``normalisation`` on ``device``."""

    def __init__(self, normalisation, device):
        self.normalisation = normalisation
        self.device = device

    def forward(self, suv, record):
        x = suv_to_model(torch.from_numpy(suv).permute(2, 0, 1)[None, None], self.normalisation)
        return x.to(self.device, torch.float32).contiguous()

    def inverse(self, sample, record):
        return model_to_suv(sample[0, 0].permute(1, 2, 0).float().cpu(), self.normalisation).numpy()


class InputTransforms:
    """The steps above in order; :meth:`forward` on the input, :meth:`inverse` on a sample."""

    def __init__(self, steps):
        self.steps = list(steps)

    def forward(self, suv, affine):
        """Low-dose SUV ``(X, Y, Z)`` and its affine -> ``record`` with the model input ``y0``."""
        record = dict(input_affine=np.asarray(affine, dtype=np.float64), input_shape=np.shape(suv))
        x = np.asarray(suv, dtype=np.float32)
        for step in self.steps:
            x = step.forward(x, record)
        record["y0"] = x
        return record

    def inverse(self, sample, record):
        """A model-space sample ``(1, 1, Z, X', Y')`` -> SUV ``(X, Y, Z)`` on the input grid."""
        for step in reversed(self.steps):
            sample = step.inverse(sample, record)
        return sample


def model_input_transforms(normalisation, voxel_mm, multiple, device):
    """The standard chain for a checkpoint: non-negative, resample, pad, model space."""
    return InputTransforms([NonNegative(), ResampleToVoxel(voxel_mm), PadTransaxial(multiple),
                            ToModelSpace(normalisation, device)])
