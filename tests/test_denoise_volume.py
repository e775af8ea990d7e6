"""Pieces of guided_diffusion.denoise: hot-voxel passthrough and the null condition."""

import json

import numpy as np
import pytest
import torch

from guided_diffusion.checkpoints import load_model_and_diffusion
from guided_diffusion.denoise import SamplingSettings, VolumeDenoiser, pass_through_hot_voxels


def test_hot_voxels_come_from_the_input_with_a_linear_ramp():
    clip = 16.0
    low = np.array([0.0, 5.0, 12.0, 14.0, 16.0, 40.0], np.float32)
    denoised = np.array([1.0, 6.0, 11.0, 16.0, 16.0, 16.0], np.float32)
    blended = pass_through_hot_voxels(denoised, low, clip)
    # below 0.75 clip: the model; at 14 SUV (weight 0.5): the average; from clip on: the input
    np.testing.assert_allclose(blended, [1.0, 6.0, 11.0, 15.0, 16.0, 40.0], rtol=1e-6)
    assert blended.dtype == np.float32


def test_null_condition_feeds_the_model_an_empty_volume(tmp_path, make_tiny_checkpoint):
    path = make_tiny_checkpoint(tmp_path / "paired.pt", "paired")
    sidecar = path.with_suffix(".json")
    sidecar.write_text(json.dumps(dict(json.loads(sidecar.read_text()), cond_dropout=0.2)))
    model, diffusion, metadata = load_model_and_diffusion(str(path), {"timestep_respacing": "ddim5"},
                                                          device=torch.device("cpu"))
    low = np.abs(np.random.default_rng(0).normal(1.0, 0.3, (16, 16, 8))).astype(np.float32)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])

    def denoised(volume, null_condition):
        settings = SamplingSettings(use_ddim=True, patch_z=8, overlap=2, progress=False,
                                    null_condition=null_condition)
        return VolumeDenoiser(model, diffusion, metadata, settings).denoise(volume, affine, [0])[0]

    unconditional = denoised(low, True)
    # The null condition is the empty volume: the same as denoising zeros, not as using `low`.
    np.testing.assert_array_equal(unconditional, denoised(np.zeros_like(low), False))
    assert not np.allclose(unconditional, denoised(low, False))
    with pytest.raises(ValueError, match="conditioning dropout"):
        VolumeDenoiser(model, diffusion, dict(metadata, cond_dropout=0.0),
                       SamplingSettings(null_condition=True))
