"""Input transforms: each step and the whole chain invert exactly where they should."""

import numpy as np
import torch

from guided_diffusion.normalisation import suv_to_model
from guided_diffusion.sampling.transforms import (
    InputTransforms,
    NonNegative,
    PadTransaxial,
    ResampleToVoxel,
    ToModelSpace,
    model_input_transforms,
)

NORM = dict(clip=16.0, scale=16.0, range=[-1.0, 1.0])
AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])


def _volume(shape=(13, 18, 7), seed=0):
    return np.random.default_rng(seed).uniform(0.0, 12.0, shape).astype(np.float32)


def test_padding_splits_evenly_and_crops_back_exactly():
    volume = _volume((13, 18, 7))
    record = {}
    padded = PadTransaxial(16).forward(volume, record)
    assert padded.shape == (16, 32, 7)
    assert record["pads"] == [(1, 2), (7, 7), (0, 0)]
    assert not padded[0].any() and not padded[:, :7].any()  # zeros: air
    assert np.array_equal(PadTransaxial(16).inverse(padded, record), volume)


def test_model_space_layout_and_its_inverse():
    volume = _volume()
    x = ToModelSpace(NORM, torch.device("cpu")).forward(volume, {})
    assert x.shape == (1, 1, 7, 13, 18) and x.dtype == torch.float32 and x.is_contiguous()
    torch.testing.assert_close(x[0, 0, 3, 5, 9], suv_to_model(torch.tensor(volume[5, 9, 3]), NORM))
    back = ToModelSpace(NORM, "cpu").inverse(x, {})
    np.testing.assert_allclose(back, volume, rtol=0, atol=1e-5)


def test_chain_round_trip_on_the_model_grid_is_exact_up_to_the_normalisation():
    volume = _volume()
    volume[0, 0, 0] = -1.0  # FBP-like negative voxel: clipped, counted
    chain = model_input_transforms(NORM, 4.0, 16, "cpu")
    record = chain.forward(volume, AFFINE)
    assert record["y0"].shape == (1, 1, 7, 16, 32)
    assert record["negative_fraction"] == 1 / volume.size and not record["resampled"]
    back = chain.inverse(record["y0"], record)
    assert back.shape == volume.shape and back.dtype == np.float32
    np.testing.assert_allclose(back, np.clip(volume, 0, None), atol=1e-5)


def test_other_voxel_sizes_are_resampled_and_brought_back_to_the_input_grid():
    volume = np.full((20, 20, 10), 3.0, np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    chain = InputTransforms([NonNegative(), ResampleToVoxel(4.0), PadTransaxial(16),
                             ToModelSpace(NORM, "cpu")])
    record = chain.forward(volume, affine)
    assert record["resampled"] and record["model_shape"] == (10, 10, 5)
    back = chain.inverse(record["y0"], record)
    assert back.shape == volume.shape
    np.testing.assert_allclose(back, volume, atol=1e-5)  # a constant survives the round trip
