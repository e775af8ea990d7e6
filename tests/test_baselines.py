"""Classical denoisers, their grid search and stored parameters."""

import json
import os

import numpy as np
import pytest

from guided_diffusion.evaluation import baselines, metrics

UNIFORM_CORNER = (slice(0, 6), slice(0, 6), slice(None))  # away from the hot sphere


def hot_sphere_phantom(shape=(24, 24, 4), radius=4.0):
    """Background 1 SUV with a hot sphere of 3 SUV at the centre (X, Y, Z)."""
    grid = np.indices(shape).astype(np.float64)
    centre = (np.array(shape) - 1) / 2.0
    distance = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(axis=0))
    return np.where(distance <= radius, 3.0, 1.0).astype(np.float32)


@pytest.fixture(scope="module")
def noisy_pair():
    reference = hot_sphere_phantom()
    rng = np.random.default_rng(0)
    return reference, reference + rng.normal(0.0, 0.3, reference.shape).astype(np.float32)


@pytest.mark.parametrize(
    "name, params",
    [
        ("gaussian", {"sigma_vox": 1.0}),
        ("gaussian", {"sigma_mm": 2.0, "voxel_mm": 2.0}),
        ("bm3d", {"sigma": 0.3}),
        ("bm3d", {"sigma": 0.3, "mode": "volume"}),
        ("nlm", {"h": 0.25}),
        ("nlm", {"h": 0.25, "mode": "slice"}),
    ],
)
def test_each_baseline_reduces_noise(noisy_pair, name, params):
    reference, noisy = noisy_pair
    denoised = baselines.denoise(name, noisy, **params)
    assert denoised.shape == noisy.shape and denoised.dtype == np.float32
    assert denoised[UNIFORM_CORNER].std() < 0.5 * noisy[UNIFORM_CORNER].std()
    assert metrics.psnr(reference, denoised) > metrics.psnr(reference, noisy) + 3.0


def test_gaussian_sigma_in_mm_equals_sigma_in_voxels_per_axis():
    rng = np.random.default_rng(1)
    volume = rng.random((10, 10, 10)).astype(np.float32)
    in_mm = baselines.gaussian(volume, sigma_mm=3.0, voxel_mm=(1.5, 3.0, 1.0))
    in_vox = baselines.gaussian(volume, sigma_vox=(2.0, 1.0, 3.0))
    np.testing.assert_allclose(in_mm, in_vox, rtol=1e-6)
    constant = np.full((6, 6, 6), 2.5, dtype=np.float32)
    np.testing.assert_allclose(baselines.gaussian(constant, sigma_vox=2.0), constant, rtol=1e-6)


def test_bad_calls_raise_value_error():
    volume = hot_sphere_phantom()
    with pytest.raises(ValueError, match="unknown denoiser"):
        baselines.denoise("median", volume)
    with pytest.raises(ValueError, match="bad parameters for gaussian"):
        baselines.denoise("gaussian", volume, width=2)
    with pytest.raises(ValueError, match="exactly one"):
        baselines.denoise("gaussian", volume)
    with pytest.raises(ValueError, match="sigma > 0"):
        baselines.denoise("bm3d", volume, sigma=0.0)
    with pytest.raises(ValueError, match="mode"):
        baselines.denoise("nlm", volume, h=0.1, mode="2.5d")
    with pytest.raises(ValueError, match="3D"):
        baselines.denoise("gaussian", volume[..., 0], sigma_vox=1.0)


def smooth_validation_pairs(count=2):
    """Low-frequency reference (period 16 voxels) plus white noise of std 0.5."""
    x, y, _ = np.meshgrid(*[np.arange(n) for n in (32, 32, 8)], indexing="ij")
    reference = (2 + np.sin(2 * np.pi * x / 16) * np.cos(2 * np.pi * y / 16)).astype(np.float32)
    rng = np.random.default_rng(2)
    noisy = [reference + rng.normal(0, 0.5, reference.shape).astype(np.float32) for _ in range(count)]
    return noisy, [reference] * count


@pytest.mark.parametrize("metric", ["psnr", "ssim", "nrmse"])
def test_tune_picks_the_clear_optimum(metric):
    # sigma 0 keeps all noise, sigma 6 flattens the period-16 pattern: 1.5 voxels is best
    noisy, references = smooth_validation_pairs()
    grid = {"sigma_vox": [0.0, 0.5, 1.5, 6.0]}
    best, table = baselines.tune("gaussian", noisy, references, grid, metric=metric)
    assert best == {"sigma_vox": 1.5}
    assert [row["params"] for row in table] == [{"sigma_vox": s} for s in grid["sigma_vox"]]
    assert all(len(row["per_pair"]) == 2 for row in table)
    expected = np.mean(
        [getattr(metrics, metric)(r, baselines.gaussian(n, sigma_vox=1.5))
         for n, r in zip(noisy, references)]
    )
    assert table[2][metric] == pytest.approx(expected)


def test_tune_grid_as_list_with_fixed_params_and_errors():
    noisy, references = smooth_validation_pairs(1)
    best, _ = baselines.tune(
        "gaussian", noisy, references, [{"sigma_mm": 1.0}, {"sigma_mm": 3.0}],
        fixed_params={"voxel_mm": 2.0},
    )
    assert best == {"sigma_mm": 3.0}  # = 1.5 voxels
    with pytest.raises(ValueError, match="1 noisy vs 2 reference"):
        baselines.tune("gaussian", noisy, references * 2, {"sigma_vox": [1.0]})
    with pytest.raises(ValueError, match="unknown metric"):
        baselines.tune("gaussian", noisy, references, {"sigma_vox": [1.0]}, metric="mae")


def test_params_round_trip_keyed_by_method_and_drf(tmp_path):
    path = tmp_path / "sub" / "baselines.json"
    table = {"gaussian": {4: {"sigma_mm": 3.0}, 2.5: {"sigma_mm": 2.0}},
             "bm3d": {"100": {"sigma": 0.4, "mode": "slice"}}}
    baselines.save_params(path, table)
    assert os.listdir(path.parent) == ["baselines.json"]  # no temporary file left behind
    loaded = baselines.load_params(path)
    assert loaded == {"gaussian": {"4": {"sigma_mm": 3.0}, "2.5": {"sigma_mm": 2.0}},
                      "bm3d": {"100": {"sigma": 0.4, "mode": "slice"}}}
    assert baselines.load_params(path, "gaussian", 4.0) == {"sigma_mm": 3.0}
    assert baselines.load_params(path, "bm3d", 100) == {"sigma": 0.4, "mode": "slice"}
    with pytest.raises(ValueError, match="DRF 10 in .*baselines.json"):
        baselines.load_params(path, "gaussian", 10)
    with pytest.raises(ValueError, match="'nlm' in .*baselines.json"):
        baselines.load_params(path, "nlm")
    with pytest.raises(ValueError, match="unknown denoiser 'median'"):
        baselines.save_params(path, {"median": {4: {}}})
    assert json.loads(path.read_text()) == loaded  # failed save left the file intact
    with pytest.raises(ValueError, match="missing.json"):
        baselines.load_params(tmp_path / "missing.json")
