"""Pieces of guided_diffusion.denoise that need no network."""

import numpy as np

from guided_diffusion.denoise import pass_through_hot_voxels


def test_hot_voxels_come_from_the_input_with_a_linear_ramp():
    clip = 16.0
    low = np.array([0.0, 5.0, 12.0, 14.0, 16.0, 40.0], np.float32)
    denoised = np.array([1.0, 6.0, 11.0, 16.0, 16.0, 16.0], np.float32)
    blended = pass_through_hot_voxels(denoised, low, clip)
    # below 0.75 clip: the model; at 14 SUV (weight 0.5): the average; from clip on: the input
    np.testing.assert_allclose(blended, [1.0, 6.0, 11.0, 15.0, 16.0, 40.0], rtol=1e-6)
    assert blended.dtype == np.float32
