"""Low-dose simulation (expected data, Poisson, thinning) and reconstruction (MLEM/OSEM/FBP)."""

import math

import pytest
import torch

from guided_diffusion.pet import recon, simulate
from guided_diffusion.pet.projector import make_projector

N, VOXEL = 32, 3.0            # 96 mm transaxial field, demo scanner
WATER_MU = 0.0096             # 1/mm at 511 keV


def _radius_map(n=N, voxel=VOXEL):
    c = (torch.arange(n, dtype=torch.float32) - (n - 1) / 2) * voxel
    x, y = torch.meshgrid(c, c, indexing="ij")
    return torch.sqrt(x ** 2 + y ** 2)


def _disk_fraction(radius_mm, supersample=8):
    """Area fraction of each voxel inside a centred disk of radius_mm, (N, N)."""
    fine = _radius_map(N * supersample, VOXEL / supersample) <= radius_mm
    return fine.float().view(N, supersample, N, supersample).mean(dim=(1, 3))


def _phantom(n_slices=2):
    """Uniform disk (activity 2, radius 36 mm) with a hot disk (activity 5) off centre, in water."""
    r = _radius_map()
    c = (torch.arange(N, dtype=torch.float32) - (N - 1) / 2) * VOXEL
    x, y = torch.meshgrid(c, c, indexing="ij")
    activity = 2.0 * (r < 36).float() + 3.0 * (((x - 15) ** 2 + y ** 2) < 8 ** 2).float()
    mu = WATER_MU * (r < 40).float()
    return activity[:, :, None].repeat(1, 1, n_slices), mu[:, :, None].repeat(1, 1, n_slices)


def _background_mask():
    """Uniform part of the phantom's disk: inside r < 28 mm, 6 mm away from the hot disk."""
    c = (torch.arange(N) - (N - 1) / 2) * VOXEL
    away_from_hot = ((c[:, None] - 15) ** 2 + c[None, :] ** 2) > 14 ** 2
    return (_radius_map() < 28) & away_from_hot


@pytest.fixture(scope="module")
def projector_2d():
    return make_projector("demo", (N, N, 2), VOXEL, mode="2d")


def test_expected_data_counts_and_fractions(projector_2d):
    activity, mu = _phantom()
    data = simulate.expected_data(activity, projector_2d, mu, total_counts=1e6, randoms_fraction=0.2,
                                  scatter_fraction=0.3)
    trues = data.trues.sum().item()
    assert data.ybar.sum().item() == pytest.approx(1e6, rel=1e-5)
    assert data.randoms.sum().item() == pytest.approx(0.2 * trues, rel=1e-5)
    assert data.scatter.sum().item() == pytest.approx(0.3 * trues, rel=1e-5)
    assert torch.allclose(data.randoms, data.randoms.flatten()[0].expand_as(data.randoms))   # uniform
    outside_body = data.mult_factor >= 1          # LORs missing the attenuating body
    assert data.scatter[outside_body].abs().max() == 0 and data.scatter.min() >= 0
    model = data.mult_factor * projector_2d.forward(activity) * data.scale + data.randoms + data.scatter
    assert torch.allclose(data.ybar, model, rtol=1e-5)


def test_counts_per_unit_and_dose_reduction(projector_2d):
    activity, _ = _phantom()
    full = simulate.expected_data(activity, projector_2d, counts_per_unit=2.0, randoms_fraction=0.0)
    low = simulate.expected_data(activity, projector_2d, counts_per_unit=2.0, randoms_fraction=0.0, drf=4)
    assert torch.allclose(full.ybar, 2.0 * projector_2d.forward(activity))
    assert torch.allclose(low.ybar * 4, full.ybar)
    by_total = simulate.expected_data(activity, projector_2d, total_counts=3e5, drf=10)
    assert by_total.ybar.sum().item() == pytest.approx(3e4, rel=1e-5)


def test_attenuation_factors_match_analytic_water_cylinder(projector_2d):
    mu = WATER_MU * _disk_fraction(40.0)[:, :, None].repeat(1, 1, 2)
    a = simulate.attenuation_factors(mu, projector_2d)
    s = torch.as_tensor(projector_2d.scanner.radial_positions_mm(), dtype=torch.float32)
    chord = 2 * torch.sqrt((40.0 ** 2 - s ** 2).clamp(min=0))
    inner = s.abs() < 30
    expected = torch.exp(-WATER_MU * chord[inner])[:, None, None]
    # 3 mm voxels (27 across the cylinder): the attenuation factors are within 1.5 %
    assert ((a[inner] - expected) / expected).abs().max() < 0.015


def test_poisson_totals_seeds_and_thinning(projector_2d):
    activity, mu = _phantom()
    data = simulate.expected_data(activity, projector_2d, mu, total_counts=3e5)
    counts = simulate.poisson(data.ybar, seed=7)
    assert abs(counts.sum().item() - 3e5) < 3 * math.sqrt(3e5)
    assert torch.equal(counts, simulate.poisson(data.ybar, seed=7))
    assert not torch.equal(counts, simulate.poisson(data.ybar, seed=8))
    gen = torch.Generator().manual_seed(7)
    assert torch.equal(counts, simulate.poisson(data.ybar, gen))
    low = simulate.thin(counts, 0.25, seed=1)
    total = counts.sum().item()
    assert (low <= counts).all() and torch.equal(low, torch.round(low))
    assert abs(low.sum().item() - 0.25 * total) < 3 * math.sqrt(total * 0.25 * 0.75)


def test_mlem_noise_free_is_monotone_and_quantitative(projector_2d):
    activity, mu = _phantom()
    data = simulate.expected_data(activity, projector_2d, mu, total_counts=1e6, randoms_fraction=0.2,
                                  scatter_fraction=0.1)
    kwargs = dict(mult_factor=data.mult_factor, additive=data.additive, scale=data.scale)
    likelihoods, x = [], None
    for _ in range(6):
        x = recon.mlem(data.ybar, projector_2d, 5, x0=x, **kwargs)
        ybar = data.mult_factor * data.scale * projector_2d.forward(x) + data.additive
        likelihoods.append(recon.poisson_log_likelihood(data.ybar, ybar).item())
    assert all(b > a for a, b in zip(likelihoods, likelihoods[1:]))
    region = x[_background_mask()]
    assert region.mean().item() == pytest.approx(2.0, rel=0.02)
    assert ((region - 2.0).abs() / 2.0).mean() < 0.05


def test_osem_one_subset_equals_mlem_and_subsets_agree(projector_2d):
    activity, mu = _phantom()
    data = simulate.expected_data(activity, projector_2d, mu, total_counts=1e6)
    kwargs = dict(mult_factor=data.mult_factor, additive=data.additive, scale=data.scale)
    mlem = recon.mlem(data.ybar, projector_2d, 4, **kwargs)
    assert torch.equal(recon.osem(data.ybar, projector_2d, 4, n_subsets=1, **kwargs), mlem)
    osem = recon.osem(data.ybar, projector_2d, 8, n_subsets=4, **kwargs)
    mlem_long = recon.mlem(data.ybar, projector_2d, 32, **kwargs)
    inner = _radius_map() < 30
    assert osem[inner].mean().item() == pytest.approx(mlem_long[inner].mean().item(), rel=0.01)


def test_precomputed_sensitivities_give_the_same_osem(projector_2d):
    activity, mu = _phantom()
    data = simulate.expected_data(activity, projector_2d, mu, total_counts=1e6)
    kwargs = dict(mult_factor=data.mult_factor, scale=data.scale)
    sens = recon.osem_sensitivities(projector_2d, 4, **kwargs)
    assert len(sens) == 4 and all(s.shape == activity.shape for s in sens)
    # The sensitivities of all subsets add up to the full back-projection of the mult factor.
    total = projector_2d.adjoint(data.mult_factor * data.scale)
    assert torch.allclose(sum(sens), total, rtol=1e-4, atol=1e-3)
    direct = recon.osem(data.ybar, projector_2d, 2, n_subsets=4, additive=data.additive, **kwargs)
    cached = recon.osem(data.ybar, projector_2d, 2, n_subsets=4, additive=data.additive,
                        sensitivities=sens, **kwargs)
    assert torch.equal(direct, cached)
    with pytest.raises(ValueError, match="sensitivities must be 2 image"):
        recon.osem(data.ybar, projector_2d, 1, n_subsets=2, sensitivities=sens, **kwargs)


def test_batched_osem_matches_single_items():
    projector = make_projector("demo", (16, 16, 4), 6.0, mode="ssrb")
    gen = torch.Generator().manual_seed(2)
    activity = torch.rand(2, 16, 16, 4, generator=gen)
    data = simulate.expected_data(activity, projector, total_counts=1e5)
    batched = recon.osem(data.ybar, projector, 2, n_subsets=4, additive=data.additive, scale=data.scale)
    for b in range(2):
        single = recon.osem(data.ybar[b], projector, 2, n_subsets=4, additive=data.additive[b],
                            scale=data.scale[b])
        assert torch.allclose(batched[b], single, rtol=1e-4, atol=1e-6)


def test_fbp_recovers_activity_in_uniform_disk(projector_2d):
    activity, mu = _phantom()
    data = simulate.expected_data(activity, projector_2d, mu, total_counts=1e6, randoms_fraction=0.2)
    image = recon.fbp(data.ybar, projector_2d, mult_factor=data.mult_factor, additive=data.additive,
                      scale=data.scale)
    assert image[_background_mask()].mean().item() == pytest.approx(2.0, rel=0.02)
    with pytest.raises(ValueError, match="'2d'"):
        recon.fbp(torch.zeros(55, 64, 7), make_projector("demo", (16, 16, 4), 6.0, mode="ssrb"))


def test_post_filter_and_progress_run(projector_2d):
    activity, _ = _phantom()
    data = simulate.expected_data(activity, projector_2d, total_counts=1e5)
    raw = recon.osem(data.ybar, projector_2d, 2, n_subsets=2, scale=data.scale)
    smooth = recon.osem(data.ybar, projector_2d, 2, n_subsets=2, scale=data.scale, post_filter_fwhm_mm=9.0,
                        progress=True)
    assert smooth.std() < raw.std()
    background = _background_mask()
    assert smooth[background].mean().item() == pytest.approx(raw[background].mean().item(), rel=0.03)
    uniform = torch.full((N, N, 2), 3.0)
    assert torch.allclose(recon.post_filter(uniform, VOXEL, 9.0), uniform, rtol=1e-5)


@pytest.mark.parametrize("change, error, message", [
    ("negative", ValueError, "negative"),
    ("nan", ValueError, "NaN"),
    ("mu_per_cm", ValueError, "1/cm"),
    ("mu_negative", ValueError, "negative"),
    ("no_level", ValueError, "exactly one"),
    ("shape", ValueError, "shape"),
])
def test_bad_simulation_inputs_raise(projector_2d, change, error, message):
    activity, mu = _phantom()
    kwargs = dict(total_counts=1e5)
    if change == "negative":
        activity[0, 0, 0] = -1.0
    elif change == "nan":
        activity[3, 3, 0] = float("nan")
    elif change == "mu_per_cm":
        mu = mu * 10
    elif change == "mu_negative":
        mu[0, 0, 0] = -0.01
    elif change == "no_level":
        kwargs = {}
    elif change == "shape":
        activity = activity[:-1]
    with pytest.raises(error, match=message):
        simulate.expected_data(activity, projector_2d, mu, **kwargs)


def test_bad_noise_and_recon_inputs_raise(projector_2d):
    ybar = torch.ones(projector_2d.sinogram_shape)
    with pytest.raises(TypeError, match="explicit seeds"):
        simulate.poisson(ybar, None)
    with pytest.raises(ValueError, match="fraction"):
        simulate.thin(ybar, 1.5, seed=0)
    with pytest.raises(ValueError, match="non-negative integers"):
        simulate.thin(ybar * 0.5, 0.5, seed=0)
    with pytest.raises(ValueError, match="non-negative"):
        recon.osem(-ybar, projector_2d, 1)
    with pytest.raises(ValueError, match="shape"):
        recon.mlem(ybar[:, :-1], projector_2d, 1)
    with pytest.raises(ValueError, match="larger|wider"):
        make_projector("demo", (200, 200, 2), VOXEL, mode="2d")
