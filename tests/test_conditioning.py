"""BC-DPM guidance: the toolkit's Gaussian filter, the Eq. (10) hook, Poisson noise insertion."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.normalisation import suv_to_model
from guided_diffusion.pet.filters import gaussian_filter
from guided_diffusion.sampling.guidance import (
    BidirectionalConditioner,
    LowDoseAcquisition,
    PoissonNoiseInserter,
    model_to_volume,
    scheduled_lambda,
    volume_to_model,
)
from guided_diffusion.pet.projector import make_projector

torch.set_num_threads(1)

ALPHAS_CUMPROD = np.cumprod(1 - np.linspace(0.05, 0.4, 8))


def shift_inserter(x):
    """Deterministic stand-in for P^+(Po(P x + r + s))."""
    return x + 0.1


@pytest.mark.parametrize(
    "shape, sigma",
    [((2, 1, 6, 9, 7), (1.0, 0.0, 2.5)), ((1, 2, 5, 4, 6), 3.0), ((3, 1, 11, 8), (0.7, 1.6))],
)
def test_gaussian_filter_matches_scipy_reflect(shape, sigma):
    # sigma 3 on 4-6 voxels: the kernel is wider than the axis (padding reflects repeatedly)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    spatial_sigma = (0, 0) + ((sigma,) * (len(shape) - 2) if np.isscalar(sigma) else tuple(sigma))
    expected = ndimage.gaussian_filter(x.double().numpy(), spatial_sigma, mode="reflect")
    result = gaussian_filter(x, sigma)
    assert result.shape == x.shape and result.dtype == x.dtype
    assert np.abs(result.numpy() - expected).max() < 1e-5


def test_gaussian_filter_keeps_a_constant_image_and_rejects_bad_sigma():
    x = torch.full((1, 1, 5, 6, 7), 2.5)
    assert torch.allclose(gaussian_filter(x, (1.5, 2.0, 4.0)), x, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_filter(x, (1.0, 1.0))
    with pytest.raises(ValueError, match="sigma"):
        gaussian_filter(x, -1.0)


def _scipy_gf(tensor, sigma):
    array = tensor.double().numpy()
    return torch.from_numpy(ndimage.gaussian_filter(array, (0, 0) + tuple(sigma), mode="reflect"))


@pytest.mark.parametrize("t, lam", [(3, 0.3), (0, 0.2), (1, 1.0), (2, 0.0)])
def test_hook_reproduces_equation_10(t, lam):
    data = torch.Generator().manual_seed(1)
    y0 = torch.rand(1, 1, 5, 6, 7, generator=data)
    x_prev = torch.randn(1, 1, 5, 6, 7, generator=data)
    sigma = (1.0, 1.5, 0.8)
    conditioner = BidirectionalConditioner(
        y0, ALPHAS_CUMPROD, num_steps_l=4, lam=lam, gaussian_sigma_vox=sigma,
        noise_inserter=shift_inserter, generator=torch.Generator().manual_seed(7),
    )
    result = conditioner(x_prev, torch.tensor([t]), out={}, model_kwargs={})

    abar_prev = 1.0 if t == 0 else ALPHAS_CUMPROD[t - 1]
    eps = torch.randn(y0.shape, generator=torch.Generator().manual_seed(7))
    y = math.sqrt(abar_prev) * y0 + math.sqrt(1 - abar_prev) * eps
    if t == 0:
        assert abar_prev == 1.0  # y_{-1} = y_0
    gf_y, gf_x = _scipy_gf(y, sigma), _scipy_gf(x_prev, sigma)
    expected = (1 - lam) * (gf_y + (x_prev - gf_x)) + lam * (y + x_prev - shift_inserter(x_prev))
    assert torch.allclose(result.double(), expected, atol=1e-5, rtol=0)


def test_hook_with_identity_filter_gives_closed_form():
    # GF = I (sigma 0) and N(x) = x + 0.1: x_{t-1} = (1-lam) y + lam (y - 0.1) = y - 0.1 lam
    y0 = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    x_prev = torch.randn(2, 1, 4, 4)
    conditioner = BidirectionalConditioner(y0, ALPHAS_CUMPROD, num_steps_l=1, lam=0.25,
                                           gaussian_sigma_vox=0.0, noise_inserter=shift_inserter)
    assert torch.allclose(conditioner(x_prev, torch.tensor([0, 0])), y0 - 0.025, atol=1e-6)


@pytest.mark.parametrize("t, expected_lam", [(3, 0.3), (2, 0.2), (1, 0.1), (0, 0.0)])
def test_linear_lambda_schedule_falls_to_zero_at_the_last_step(t, expected_lam):
    # GF = I and N(x) = x + 0.1: x_{t-1} = y_{t-1} - 0.1 lam_t, lam_t = 0.3 t / (l - 1) with l = 4
    y0 = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    x_prev = torch.randn(1, 1, 4, 4)
    conditioner = BidirectionalConditioner(y0, ALPHAS_CUMPROD, num_steps_l=4, lam=0.3, gaussian_sigma_vox=0.0,
                                           noise_inserter=shift_inserter, lam_schedule="linear",
                                           generator=torch.Generator().manual_seed(7))
    abar_prev = 1.0 if t == 0 else ALPHAS_CUMPROD[t - 1]
    eps = torch.randn(y0.shape, generator=torch.Generator().manual_seed(7)) if t else 0.0
    y = math.sqrt(abar_prev) * y0 + math.sqrt(1 - abar_prev) * eps
    assert scheduled_lambda(0.3, "linear", t, 4) == pytest.approx(expected_lam)
    assert torch.allclose(conditioner(x_prev, torch.tensor([t])), y - 0.1 * expected_lam, atol=1e-6)


def test_lambda_schedules_by_hand():
    assert [scheduled_lambda(0.2, "constant", t, 5) for t in range(5)] == [0.2] * 5
    assert [scheduled_lambda(0.4, "linear", t, 5) for t in range(5)] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert scheduled_lambda(0.4, "linear", 0, 1) == 0.0  # l = 1: the only step is the last
    with pytest.raises(ValueError, match="lambda schedule"):
        scheduled_lambda(0.2, "cosine", 0, 3)


def test_hook_acts_only_in_the_last_l_steps_of_the_sampler():
    calls = []

    def counting_inserter(x):
        calls.append(x.shape)
        return x

    y0 = torch.rand(1, 1, 3, 8, 8)
    conditioner = BidirectionalConditioner(y0, ALPHAS_CUMPROD, num_steps_l=3, lam=0.5,
                                           gaussian_sigma_vox=1.0, noise_inserter=counting_inserter)
    x = torch.randn(1, 1, 3, 8, 8)
    for t in (3, 4, 7):
        assert conditioner(x, torch.tensor([t])) is None
    assert conditioner(x, torch.tensor([2])) is not None
    with pytest.raises(ValueError, match="one step index"):
        conditioner(x.expand(2, -1, -1, -1, -1), torch.tensor([1, 2]))
    calls.clear()

    diffusion = gd.GaussianDiffusion(
        betas=1 - ALPHAS_CUMPROD / np.append(1.0, ALPHAS_CUMPROD[:-1]),
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.FIXED_SMALL,
        loss_type=gd.LossType.MSE,
    )
    assert np.allclose(diffusion.alphas_cumprod, ALPHAS_CUMPROD)
    diffusion.p_sample_loop(lambda x, t: 0.1 * x, (1, 1, 3, 8, 8), step_hook=conditioner,
                            generator=torch.Generator().manual_seed(0))
    assert len(calls) == 3


def test_repeated_conditioning_pulls_low_frequencies_to_the_input():
    data = torch.Generator().manual_seed(3)
    zz, xx, yy = torch.meshgrid(torch.arange(6.0), torch.arange(12.0), torch.arange(12.0), indexing="ij")
    smooth = 1 + torch.sin(xx / 3) * torch.cos(yy / 4) + 0.1 * zz
    y0 = (smooth + 0.3 * torch.randn(smooth.shape, generator=data))[None, None]
    x = 2 * torch.randn(y0.shape, generator=data)
    sigma = (1.0, 2.0, 2.0)
    conditioner = BidirectionalConditioner(y0, ALPHAS_CUMPROD, num_steps_l=1, lam=0.2,
                                           gaussian_sigma_vox=sigma, noise_inserter=shift_inserter)
    target = gaussian_filter(y0, sigma)
    distances = [float((gaussian_filter(x, sigma) - target).norm())]
    for _ in range(8):
        x = conditioner(x, torch.tensor([0]))
        distances.append(float((gaussian_filter(x, sigma) - target).norm()))
    assert all(b < a for a, b in zip(distances, distances[1:]))
    assert distances[-1] < 0.05 * distances[0]


def test_conditioner_rejects_bad_arguments():
    y0 = torch.rand(1, 1, 4, 4)
    common = dict(gaussian_sigma_vox=1.0, noise_inserter=shift_inserter)
    with pytest.raises(ValueError, match="lam"):
        BidirectionalConditioner(y0, ALPHAS_CUMPROD, num_steps_l=2, lam=1.5, **common)
    with pytest.raises(ValueError, match="num_steps_l"):
        BidirectionalConditioner(y0, ALPHAS_CUMPROD, num_steps_l=9, **common)
    conditioner = BidirectionalConditioner(y0, ALPHAS_CUMPROD, num_steps_l=2, **common)
    with pytest.raises(ValueError, match="differs from y0"):
        conditioner(torch.rand(1, 1, 4, 5), torch.tensor([0]))


# --- Poisson noise insertion through the real projector --------------------------------------

def _least_squares_recon(projector, image_shape):
    """Linear recon (pseudo-inverse of the dense system matrix): E[recon(Po(ybar))] = recon(ybar)."""
    n_voxels = math.prod(image_shape)
    columns = projector.forward(torch.eye(n_voxels).reshape(n_voxels, *image_shape))
    pseudo_inverse = torch.linalg.pinv(columns.reshape(n_voxels, -1).T.double())

    def recon(counts, projector, mult_factor, additive):
        corrected = (counts - additive).double() / mult_factor
        flat = corrected.reshape(counts.shape[0], -1) @ pseudo_inverse.T
        return flat.reshape(counts.shape[0], *image_shape).float()

    return recon


@pytest.mark.parametrize("model_shape", [(2, 1, 3, 8, 8), (3, 1, 8, 8)])
def test_poisson_noise_inserter_is_unbiased_around_the_noise_free_recon(model_shape):
    image_shape = (8, 8, model_shape[2] if len(model_shape) == 5 else 1)
    projector = make_projector("demo", image_shape, 4.0, mode="2d")
    additive = torch.full(projector.sinogram_shape, 2.0)
    inserter = PoissonNoiseInserter(
        projector, model_to_activity=lambda x: 16 * x, activity_to_model=lambda a: a / 16,
        counts_scale=2.0, additive=additive, recon=_least_squares_recon(projector, image_shape),
        generator=torch.Generator().manual_seed(4),
    )
    x = torch.rand(model_shape, generator=torch.Generator().manual_seed(5)) - 0.1
    draws = torch.stack([inserter(x) for _ in range(200)])
    assert draws.shape == (200,) + model_shape
    noise_free = x.clamp_min(0)  # the recon of the noise-free data of the clamped activity
    mean = draws.mean(0)
    standard_error = draws.std(0) / math.sqrt(draws.shape[0])
    assert draws.std(0).mean() > 0.01  # noise was inserted
    assert ((mean - noise_free).abs() < 5 * standard_error + 1e-4).all()
    assert float((mean - noise_free).abs().mean()) < 0.15 * float(draws.std(0).mean())


def test_layout_conversion_follows_the_design_convention():
    volume = torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)  # (B, X, Y, Z)
    model = volume.permute(0, 3, 1, 2)[:, None]  # model tensors are volume.permute(2, 0, 1)
    assert torch.equal(model_to_volume(model), volume)
    assert torch.equal(volume_to_model(volume, 5), model)
    slices = torch.rand(2, 1, 3, 4)  # 2D (B, 1, X, Y)
    assert torch.equal(volume_to_model(model_to_volume(slices), 4), slices)
    with pytest.raises(ValueError, match="expected"):
        model_to_volume(torch.rand(1, 2, 3, 4, 5))


def test_acquisition_of_a_scaled_input_simulates_the_same_counts():
    """The hot-voxel rescale pass hands the hooks ``y0 / k``: the count level stays the
    recorded one, so the expected counts of the scaled activity equal those of the original."""
    normalisation = dict(scale=16.0, clip=16.0, range=[-1.0, 1.0])
    acquisition = LowDoseAcquisition(scanner="demo", total_counts=5e4, randoms_fraction=0.3,
                                     normalisation=normalisation, voxel_mm=4.0)
    suv = 4.0 * torch.rand(1, 1, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    k = 2.5
    projector, scale, additive = acquisition.acquisition_of(suv_to_model(suv, normalisation))
    _, scale_k, additive_k = acquisition.acquisition_of(suv_to_model(suv / k, normalisation))
    assert math.isclose(scale_k, k * scale, rel_tol=1e-5)
    assert torch.equal(additive, additive_k)
    activity = model_to_volume(suv)
    trues = scale * projector.forward(activity)
    trues_k = scale_k * projector.forward(activity / k)
    assert torch.allclose(trues, trues_k, rtol=1e-5)
    assert math.isclose(float(trues.sum() + additive.sum()), 5e4, rel_tol=1e-4)
