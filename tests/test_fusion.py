"""guided_diffusion.sampling.fusion: the noise index against its known value for white noise, the
fusion weight's closed form, and the fused image's limits."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from guided_diffusion.sampling import fusion


def _highpass_gain(sigma):
    """Variance of ``x - G_sigma x`` per unit variance of white noise: sum of (delta - g)^2."""
    delta = np.zeros((25, 25, 25))
    delta[12, 12, 12] = 1.0
    return float(((delta - gaussian_filter(delta, sigma)) ** 2).sum())


def test_noise_index_of_white_noise_proportional_to_the_mean():
    rng = np.random.default_rng(0)
    mean = 4.0
    estimates = {}
    for nu in (0.01, 0.04):
        volume = mean + rng.normal(0.0, np.sqrt(nu * mean), (48, 48, 48))
        estimates[nu] = fusion.noise_index(volume)
        # the high-pass keeps a known fraction of white noise's variance
        assert estimates[nu] == pytest.approx(nu * _highpass_gain(fusion.HIGHPASS_SIGMA), rel=0.05)
    assert estimates[0.04] / estimates[0.01] == pytest.approx(4.0, rel=0.05)


def test_noise_index_needs_tissue_in_the_band():
    assert fusion.noise_index(np.zeros((20, 20, 20))) is None
    assert fusion.noise_index(np.full((20, 20, 20), 30.0)) is None


def test_difference_noise_index_reads_the_variance_per_suv_of_white_noise():
    rng = np.random.default_rng(1)
    for mean, nu in ((2.0, 0.01), (5.0, 0.04)):
        volume = mean + rng.normal(0.0, np.sqrt(nu * mean), (48, 48, 48))
        assert fusion.difference_noise_index(volume) == pytest.approx(nu, rel=0.04)
    poisson = rng.poisson(40.0, (40, 40, 40)) / 10.0  # mean 4 SUV, variance 0.4 = 0.1 x mean
    assert fusion.difference_noise_index(poisson) == pytest.approx(0.1, rel=0.04)
    assert fusion.difference_noise_index(np.zeros((20, 20, 20))) is None


def test_difference_noise_index_ignores_linear_structure_that_the_highpass_sees():
    rng = np.random.default_rng(2)
    noise = rng.normal(0.0, np.sqrt(0.01 * 4.0), (40, 40, 40))
    flat = 4.0 + noise
    # blobs 1.5 voxels wide (2 SUV std): folds the high-pass window cannot tell from noise
    blobs = gaussian_filter((rng.random((40, 40, 40)) < 0.02) * 1.0, 1.5)
    folds = flat + blobs / blobs.std()
    assert fusion.difference_noise_index(folds) == pytest.approx(fusion.difference_noise_index(flat), rel=0.25)
    assert fusion.noise_index(folds) > 1.8 * fusion.noise_index(flat)
    ramp = np.linspace(2.0, 6.0, 40)[:, None, None]  # linear: no second difference
    ramp = ramp + rng.normal(0.0, 1.0, (40, 40, 40)) * np.sqrt(0.01 * ramp)
    assert fusion.difference_noise_index(ramp) == pytest.approx(0.01, rel=0.05)


def test_estimate_noise_index_by_name():
    rng = np.random.default_rng(3)
    volume = 4.0 + rng.normal(0.0, 0.2, (32, 32, 32))
    assert fusion.estimate_noise_index(volume) == fusion.noise_index(volume)
    assert fusion.estimate_noise_index(volume, "second_difference") == fusion.difference_noise_index(volume)
    with pytest.raises(ValueError, match="unknown noise_estimator 'wavelet'"):
        fusion.estimate_noise_index(volume, "wavelet")


def test_fusion_weight_closed_form():
    denoised = np.zeros((9, 9, 9))
    low = np.full((9, 9, 9), 2.0)  # residual 2 everywhere: r2 = 4
    np.testing.assert_allclose(fusion.fusion_weight(denoised, low, 1.0), 0.75)
    np.testing.assert_allclose(fusion.fusion_weight(denoised, low, 8.0), 0.0)  # noise explains it
    np.testing.assert_array_equal(fusion.fusion_weight(low, low, 1.0), 0.0)  # no residual


def test_fusion_restores_a_bias_and_keeps_noise_removed():
    rng = np.random.default_rng(1)
    truth = np.full((40, 40, 40), 4.0)
    truth[10:30, 10:30, 10:30] = 10.0  # a structure the "model" below loses half of
    low = truth + rng.normal(0.0, np.sqrt(0.05 * truth))
    denoised = truth.copy()
    denoised[10:30, 10:30, 10:30] = 7.0
    fused, info = fusion.fuse_with_input(denoised, low, kappa=2.0)
    assert fused.dtype == np.float32 and 0.0 < info["mean_weight"] < 1.0
    inner = (slice(13, 27),) * 3
    # the biased structure moves most of the way to the data...
    assert abs(fused[inner].mean() - 10.0) < 0.5
    # ...while the background, where the residual is noise, keeps most of the denoising
    background = (slice(0, 6),) * 3
    assert np.std(fused[background]) < 0.5 * np.std(low[background])


def test_fusion_leaves_unmeasurable_volumes_alone_and_checks_kappa():
    denoised = np.ones((8, 8, 8), np.float32)
    fused, info = fusion.fuse_with_input(denoised, np.zeros((8, 8, 8)), kappa=2.0)
    assert info["noise_index"] is None and np.array_equal(fused, denoised)
    with pytest.raises(ValueError, match="kappa"):
        fusion.fuse_with_input(denoised, denoised, kappa=0.0)
