"""guided_diffusion.sampling.uncertainty: the ensemble's std map and its pooled variance."""

import numpy as np
import pytest

from guided_diffusion.sampling.uncertainty import ensemble_std


def test_without_pooling_it_is_the_members_std_with_k_minus_one():
    rng = np.random.default_rng(0)
    members = rng.normal(2.0, 0.5, (4, 6, 5, 7)).astype(np.float32)
    np.testing.assert_allclose(ensemble_std(members, 2.0), members.std(axis=0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(ensemble_std(members[:2], 2.0), np.abs(members[0] - members[1]) / np.sqrt(2), rtol=1e-5)


def test_pooling_keeps_the_scale_and_removes_the_sampling_noise():
    """Members with a known std of 0.3 in the left half and 0.1 in the right: 4 members' std
    scatters by ~40 % voxel by voxel; pooled over 8 mm (2 mm voxels) it scatters far less,
    keeps the level of each half away from the border, and ranks the halves without error."""
    rng = np.random.default_rng(1)
    truth = np.full((40, 20, 20), 0.1)
    truth[:20] = 0.3
    members = rng.normal(0.0, 1.0, (4,) + truth.shape) * truth
    raw, pooled = ensemble_std(members, 2.0), ensemble_std(members, 2.0, fwhm_mm=8.0)
    inner = (slice(4, 16), slice(4, 16), slice(4, 16))
    assert raw[inner].std() / raw[inner].mean() > 0.3
    assert pooled[inner].std() / pooled[inner].mean() < 0.1
    assert pooled[inner].mean() == pytest.approx(0.3, rel=0.1)
    assert pooled[24:36].mean() == pytest.approx(0.1, rel=0.1)
    assert pooled[:16].min() > pooled[24:].max()
    # anisotropic voxels: the FWHM is in mm per axis
    assert ensemble_std(members, (2.0, 2.0, 4.0), fwhm_mm=8.0).shape == truth.shape


def test_bad_members_or_fwhm_are_refused():
    with pytest.raises(ValueError, match="K >= 2"):
        ensemble_std(np.zeros((1, 3, 3, 3)), 2.0)
    with pytest.raises(ValueError, match=">= 0 mm"):
        ensemble_std(np.zeros((2, 3, 3, 3)), 2.0, fwhm_mm=-1.0)
