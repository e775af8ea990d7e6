"""guided_diffusion.pet.acquisition: scan settings, their draw, and what each factor does to the
images (tiny cylinder phantoms on the demo scanner, one torch thread)."""

import math

import numpy as np
import pytest
import torch

from guided_diffusion.pet import acquisition, filters, volumes
from guided_diffusion.pet.acquisition import ScanSettings, sample_drfs, sample_scan_settings, simulate_scan
from guided_diffusion.pet.phantoms import Phantom, phantom_grid

CORE_MM = 35.0       # the cylinder's uniform interior (radius, mm)
RADIUS_MM = 50.0     # the cylinder's radius (mm)


@pytest.fixture(autouse=True)
def one_thread():
    with acquisition.torch_threads(1):
        yield


def cylinder(voxel_mm, depth_mm=32.0, sphere_mm=None):
    """A water cylinder of SUV 1 (radius 50 mm) in a 128 mm field of view, optionally with a
    hot sphere (SUV 4, radius ``sphere_mm``, label 1) 20 mm off the axis; returns the phantom and
    the radius (mm) of every voxel."""
    grid = phantom_grid(voxel_mm=voxel_mm, fov_mm=(128.0, 128.0, depth_mm))
    x, y, z = (grid.origin[i] + np.arange(grid.shape[i]) * voxel_mm for i in range(3))
    radius = np.broadcast_to(np.hypot(x[:, None, None], y[None, :, None]), grid.shape).copy()
    activity = (radius < RADIUS_MM).astype(np.float32)
    lesions = np.zeros(grid.shape, np.int16)
    if sphere_mm:
        inside = np.sqrt((x[:, None, None] - 20) ** 2 + y[None, :, None] ** 2 + (z - z.mean()) ** 2) < sphere_mm
        lesions[inside], activity[inside] = 1, 4.0
    phantom = Phantom(activity, (0.0096 * (radius < RADIUS_MM)).astype(np.float32),
                      (radius < RADIUS_MM).astype(np.int16), lesions, [], grid.affine(), tuple(grid.voxel),
                      "FDG", 0, {})
    return phantom, radius


def scan_of(**changes):
    return ScanSettings(**{"iterations": 4, "subsets": 8, "psf_mm": 0.0, "voxel_mm": 2.0, **changes})


def simulate(scan, drfs=(20.0,), counts_per_mm=4e5, **phantom_options):
    phantom, radius = cylinder(scan.voxel_mm, **phantom_options)
    return simulate_scan(phantom, scan, list(drfs), 3, counts_per_mm), phantom, radius


def core_std(image, radius):
    return float(image[radius < CORE_MM].std())


def edge_slope(image, radius, voxel_mm):
    """The steepest step (SUV per voxel) of the radial profile."""
    bins = np.round(radius / voxel_mm).astype(int).ravel()
    n = np.bincount(bins)
    profile = np.bincount(bins, image.ravel())[n > 0] / n[n > 0]
    return float(np.abs(np.diff(profile)).max())


def correlation_length(noise, mask):
    """Integrated autocorrelation length (voxels) of ``noise`` along x within ``mask``:
    1 + 2 * sum of the correlation coefficients at lags 1-5."""
    noise = noise - noise[mask].mean()
    variance = (noise[mask] ** 2).mean()
    rho = [(noise[:-lag][mask[:-lag] & mask[lag:]] * noise[lag:][mask[:-lag] & mask[lag:]]).mean() / variance
           for lag in range(1, 6)]
    return 1 + 2 * float(np.sum(rho))


def test_settings_round_trip_label_and_tags():
    scan = ScanSettings()
    assert scan.label() == "OSEM 2x8 PSF, 3.3 mm"
    assert ScanSettings.from_dict(scan.to_dict()) == scan
    mlem = ScanSettings(mode="ssrb", iterations=100, subsets=1, psf_mm=0, post_filter_mm=4, voxel_mm=1.65)
    assert mlem.label() == "MLEM 100, 4 mm filter, SSRB, 1.65 mm"
    assert {"mlem100_nopsf", "mlem100", "nopsf", "filtered", "ssrb", "1.65"} == set(mlem.tags())
    assert ScanSettings.from_dict({"iterations": 3.0, "voxel_mm": 2}).iterations == 3  # JSON numbers
    for bad in (dict(mode="3d"), dict(scanner="nope"), dict(subsets=0), dict(psf_mm=-1), dict(iterations=2.5)):
        with pytest.raises(ValueError):
            ScanSettings(**bad)
    with pytest.raises(ValueError, match="unknown"):
        ScanSettings.from_dict({"iterations": 2, "colour": "red"})


def test_scan_draws_cover_the_ranges_reproducibly_and_respect_exclusions():
    draws = [sample_scan_settings(np.random.default_rng([4, i])) for i in range(400)]
    assert draws[:20] == [sample_scan_settings(np.random.default_rng([4, i])) for i in range(20)]
    effective = np.array([s.iterations * s.subsets for s in draws])
    assert effective.min() == 4 and effective.max() == 100
    assert abs(np.median(np.log(effective)) - np.log(20)) < 0.35  # log-uniform over 4..100: median 20
    ranges = acquisition.DEFAULT_RANGES
    assert {s.mode for s in draws} == set(ranges["mode"]) and {s.voxel_mm for s in draws} == set(ranges["voxel_mm"])
    assert 0.4 < np.mean([s.psf_mm > 0 for s in draws]) < 0.6
    assert all(3 <= s.psf_mm <= 6 for s in draws if s.psf_mm > 0)
    assert 0.3 < np.mean([s.post_filter_mm == 0 for s in draws]) < 0.5
    assert all(2 <= s.post_filter_mm <= 6 for s in draws if s.post_filter_mm > 0)
    assert all(0.1 <= s.randoms_fraction <= 0.6 and 0.2 <= s.scatter_fraction <= 0.5 for s in draws)
    assert any(s.subsets == 1 for s in draws) and any(s.subsets > 1 for s in draws)
    exclude = ["ssrb", "1.65", lambda s: s.iterations * s.subsets > 50]
    kept = [sample_scan_settings(np.random.default_rng([4, i]), exclude=exclude) for i in range(200)]
    assert not any(acquisition.is_excluded(s, exclude) for s in kept)
    assert set(kept[0].tags()) <= acquisition.possible_tags()
    with pytest.raises(ValueError, match="leaves"):
        sample_scan_settings(np.random.default_rng(0), exclude=["2d", "ssrb"])


def test_drfs_are_log_uniform_in_their_range():
    draws = [sample_drfs(np.random.default_rng([9, i]), 3) for i in range(600)]
    assert all(d == sorted(set(d)) and len(d) == 3 for d in draws)
    logs = np.log(np.concatenate(draws))
    assert 2.0 <= np.exp(logs.min()) and np.exp(logs.max()) <= 200.0
    # uniform in log: every decile of [log 2, log 200] holds about a tenth of the draws
    counts = np.histogram(logs, bins=10, range=(np.log(2), np.log(200)))[0] / logs.size
    assert np.all(np.abs(counts - 0.1) < 0.025)
    assert all(10 <= d <= 12 for d in sample_drfs(np.random.default_rng(1), 4, low=10, high=12))


def test_more_mlem_iterations_give_more_noise_and_sharper_edges():
    results = {}
    for iterations in (5, 40):
        # full dose at very high counts (nearly noise free) for the edge; DRF 1000 for the noise
        out, _, radius = simulate(scan_of(iterations=iterations, subsets=1), drfs=(1000.0,), counts_per_mm=1e8)
        results[iterations] = core_std(out["low"][0], radius), edge_slope(out["full"], radius, 2.0)
    assert results[40][0] > 2 * results[5][0]
    assert results[40][1] > 1.3 * results[5][1]


def test_psf_modelling_recovers_small_sphere_contrast_better():
    recovered = {}
    for psf in (0.0, 4.5):
        out, phantom, _ = simulate(scan_of(iterations=50, subsets=1, psf_mm=psf), counts_per_mm=1e8, sphere_mm=6.0)
        recovered[psf] = out["full"][phantom.lesion_labels > 0].mean() / 4.0
    assert recovered[4.5] > recovered[0.0] + 0.05


def test_voxel_size_changes_the_noise_correlation_length():
    length = {}
    for voxel in (2.0, 4.0):
        out, _, radius = simulate(scan_of(voxel_mm=voxel), depth_mm=48.0)
        length[voxel] = correlation_length(out["low"][0] - out["full"], radius < CORE_MM)
    assert length[2.0] > length[4.0] + 0.15            # in voxels: longer on the finer grid
    assert 4.0 * length[4.0] > 2.0 * length[2.0] + 1.0  # in mm: longer on the coarser grid


def test_post_filter_lowers_noise_and_is_the_gaussian_filter():
    plain, _, radius = simulate(scan_of())
    filtered, _, _ = simulate(scan_of(post_filter_mm=5.0))
    assert core_std(filtered["low"][0], radius) < 0.5 * core_std(plain["low"][0], radius)
    sigma = filters.fwhm_to_sigma(5.0) / 2.0
    np.testing.assert_allclose(filtered["full"], filters.gaussian_filter(plain["full"], sigma), atol=1e-5)
    assert filtered["prompts"] == plain["prompts"]


def test_ssrb_samples_the_scanners_planes_and_correlates_noise_axially():
    axial = {}
    for mode in ("2d", "ssrb"):
        out, _, radius = simulate(scan_of(mode=mode))
        noise, mask = out["low"][0] - out["full"], radius < CORE_MM
        mask[..., :3] = mask[..., -3:] = False  # the ends of the field of view lose counts to the PSF
        pairs = mask[..., :-1] & mask[..., 1:]
        axial[mode] = np.corrcoef(noise[..., :-1][pairs], noise[..., 1:][pairs])[0, 1]
        assert out["full"][mask].mean() == pytest.approx(1.0, abs=0.05)
    assert abs(axial["2d"]) < 0.05 and axial["ssrb"] > 0.4  # demo planes every 3.375 mm, slices 2 mm
    assert acquisition.on_planes(scan_of(mode="ssrb")) and not acquisition.on_planes(scan_of(mode="ssrb", voxel_mm=4.0))


def test_slabs_overlap_so_a_mismatched_psf_leaves_no_seams():
    """Slab edges (every 8 slices here) do not show when the reconstruction's resolution model
    differs from the data's (the slabs overlap by halo_slices)."""
    phantom, radius = cylinder(2.0, depth_mm=48.0)
    scan = scan_of(iterations=3, psf_mm=3.0)
    assert acquisition.halo_slices(scan) > 0 and acquisition.halo_slices(scan_of(psf_mm=4.5)) == 0
    out = acquisition.simulate_scan(phantom, scan, [10.0], 3, 1e8, slab=8)
    core = radius[..., 0] < CORE_MM
    means = np.array([out["full"][..., k][core].mean() for k in range(out["full"].shape[2])])
    assert np.abs(means[4:-4] - 1).max() < 0.03  # away from the ends of the field of view
    assert out["prompts"][0] == pytest.approx(1e8 * 48.0, rel=0.01)


def test_resampling_to_the_model_grid_and_labels_by_nearest_neighbour():
    phantom, _ = cylinder(2.0, sphere_mm=6.0)
    out = simulate_scan(phantom, scan_of(), [10.0], 3, 4e5, model_voxel_mm=4.0)
    assert out["resampled"] and out["voxel_mm"] == 4.0 and out["native_voxel_mm"] == 2.0
    assert out["full"].shape == (32, 32, 8) and out["low"].shape == (1, 32, 32, 8)
    np.testing.assert_allclose(volumes.voxel_sizes(out["affine"]), 4.0)
    np.testing.assert_array_equal(out["native_affine"], phantom.affine)
    labels, affine = acquisition.resample_labels(phantom.lesion_labels, phantom.affine, 4.0)
    assert labels.dtype == np.int16 and set(np.unique(labels)) == {0, 1}
    np.testing.assert_allclose(affine, out["affine"])
    same = simulate_scan(phantom, scan_of(), [10.0], 3, 4e5, model_voxel_mm=2.01)  # within 1 %: untouched
    assert not same["resampled"] and same["full"].shape == phantom.activity.shape
    tiny = np.zeros((20, 20, 20), np.int16)
    tiny[11, 11, 11], tiny[3:9, 3:9, 3:9] = 2, 1  # a one-voxel lesion between the coarse samples survives
    coarse, coarse_affine = acquisition.resample_labels(tiny, np.diag([1.0, 1, 1, 1]), 4.0)
    assert coarse.shape == (5, 5, 5) and (coarse == 2).sum() == 1 and (coarse == 1).sum() >= 1
    centre = coarse_affine @ np.append(np.argwhere(coarse == 2)[0], 1.0)
    assert np.abs(centre[:3] - 11).max() <= 2.0
    with pytest.raises(ValueError, match="native grid"):
        simulate_scan(phantom, scan_of(voxel_mm=3.0), [10.0], 3, 4e5)


def test_torch_threads_is_restored():
    before = torch.get_num_threads()
    with acquisition.torch_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before
    assert math.isclose(acquisition.plane_spacing_mm(scan_of(mode="ssrb")), 3.375)


def test_the_oracle_shares_the_low_dose_counts_and_leaves_the_scan_unchanged():
    """At DRF 1 the low dose holds every count: the oracle is the full dose. Asking for it
    changes neither the full nor the low dose (same seeds)."""
    phantom, _ = cylinder(4.0)
    scan = scan_of(voxel_mm=4.0, post_filter_mm=5.0)
    plain = simulate_scan(phantom, scan, [1.0, 8.0], 3, 4e5)
    out = simulate_scan(phantom, scan, [1.0, 8.0], 3, 4e5, oracle_draws=2)
    np.testing.assert_array_equal(out["full"], plain["full"])
    np.testing.assert_array_equal(out["low"], plain["low"])
    assert out["low"].shape == plain["low"].shape and out["prompts"] == plain["prompts"]
    np.testing.assert_allclose(out["oracle"], out["full"], rtol=1e-5, atol=1e-6)
    assert "oracle" not in plain
    with pytest.raises(ValueError, match="oracle_draws"):
        simulate_scan(phantom, scan, [8.0], 3, 4e5, oracle_draws=-1)


def test_the_oracles_error_falls_as_one_plus_one_over_the_draws():
    """The full dose and the oracle's draws are independent given the low dose, so the oracle's
    expected squared error is (1 + 1 / K) times the least one: K = 1 against K = 8 gives
    2 / 1.125. The oracle is far closer to the full dose than the low dose is."""
    phantom, radius = cylinder(4.0, depth_mm=48.0)
    scan = scan_of(voxel_mm=4.0)
    body = radius < RADIUS_MM
    errors = {}
    for draws in (1, 8):
        out = simulate_scan(phantom, scan, [4.0], 3, 2e5, oracle_draws=draws)
        errors[draws] = float(np.mean((out["oracle"] - out["full"])[body] ** 2))
    low_error = float(np.mean((out["low"][0] - out["full"])[body] ** 2))
    assert errors[1] / errors[8] == pytest.approx(2 / 1.125, rel=0.1)
    assert errors[8] < 0.5 * low_error
