"""The model-space transforms: known values, exact inverses, no clip for sqrt."""

import numpy as np
import pytest
import torch

from guided_diffusion.normalisation import (
    SQRT_NORMALISATION, model_to_suv, resolve_normalisation, saturation_suv, suv_to_model, x0_clip_range)


def test_linear_default_keeps_the_published_mapping():
    assert suv_to_model(np.array([0.0, 8.0, 16.0, 40.0])).tolist() == [-1.0, 0.0, 1.0, 1.0]
    assert saturation_suv(None) == 16.0


def test_sqrt_known_values_and_inverse():
    norm = SQRT_NORMALISATION  # knee 1, 100 SUV at the top of [-1, 1]
    top = np.sqrt(101.0) - 1.0
    suv = np.array([0.0, 3.0, 50.0, 100.0, 150.0])
    expected = -1.0 + 2.0 * (np.sqrt(1.0 + suv) - 1.0) / top
    np.testing.assert_allclose(suv_to_model(suv, norm), expected, rtol=1e-12)
    np.testing.assert_allclose(model_to_suv(suv_to_model(suv, norm), norm), suv, rtol=1e-10, atol=1e-12)
    assert suv_to_model(np.array([60.0]), norm)[0] < 1.0  # 0-60 SUV within range, no clip
    assert saturation_suv(norm) == 100.0


def test_sqrt_torch_matches_numpy_and_clamps_negatives():
    norm = dict(transform="sqrt", knee=2.0, scale=80.0)
    suv = np.array([-1.0, 0.0, 7.0, 80.0])
    got = suv_to_model(torch.tensor(suv), norm).numpy()
    np.testing.assert_allclose(got, suv_to_model(suv, norm))
    assert got[0] == got[1] == -1.0
    assert model_to_suv(torch.tensor([-1.5]), norm).item() == 0.0


def test_x0_clip_range_is_upstreams_unless_a_sqrt_space_records_a_clip():
    assert x0_clip_range(None) == x0_clip_range(SQRT_NORMALISATION) == (-1.0, 1.0)
    norm = dict(transform="sqrt", knee=1.0, scale=16.0, clip=64.0)
    low, high = x0_clip_range(norm)
    # 64 SUV: -1 + 2 (sqrt(65) - 1) / (sqrt(17) - 1) = 3.5226...
    assert low == -1.0 and high == pytest.approx(-1.0 + 2.0 * (65 ** 0.5 - 1.0) / (17 ** 0.5 - 1.0), rel=1e-12)
    assert saturation_suv(norm) == 64.0
    assert suv_to_model(np.array([100.0]), norm)[0] > high  # the mapping itself never clips
    with pytest.raises(ValueError, match="clip"):
        resolve_normalisation(dict(norm, clip=0.0))


def test_invalid_normalisations_are_refused():
    with pytest.raises(ValueError, match="unknown normalisation transform"):
        resolve_normalisation(dict(transform="log"))
    with pytest.raises(ValueError, match="knee"):
        resolve_normalisation(dict(transform="sqrt", knee=0.0))
