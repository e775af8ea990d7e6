"""Poisson data consistency: EM updates of the x0 estimate towards the low-dose data."""

import numpy as np
import pytest
import torch

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.sampling.guidance import (
    HookChain,
    LowDoseAcquisition,
    chain_factories,
    model_to_volume,
)
from guided_diffusion.sampling.data_consistency import DataConsistencyFactory, PoissonDataConsistency
from guided_diffusion.normalisation import model_to_suv, suv_to_model

NORM = dict(clip=16.0, scale=16.0, range=(-1.0, 1.0))


def _low_dose(shape=(1, 1, 6, 24, 24), seed=0):
    generator = torch.Generator().manual_seed(seed)
    suv = torch.zeros(shape)
    suv[..., 6:18, 5:19] = 1.0 + 4.0 * torch.rand(shape[:3] + (12, 14), generator=generator)
    return suv_to_model(suv, NORM)


def _acquisition(randoms_fraction=0.0):
    return LowDoseAcquisition(scanner="demo", total_counts=2e6, randoms_fraction=randoms_fraction,
                              normalisation=NORM, voxel_mm=4.0)


def test_one_em_update_from_a_scaled_image_returns_the_data_image():
    # without randoms, EM from c * y with data A y has the ratio 1 / c in every bin: x1 = y
    y0 = _low_dose()
    hook = PoissonDataConsistency(y0, _acquisition(), np.ones(10), num_steps=1)
    x0 = suv_to_model(0.5 * model_to_suv(y0, NORM), NORM)
    result = hook(x0, torch.tensor([0]), {"pred_xstart": x0})
    inside = model_to_suv(y0, NORM) > 0
    torch.testing.assert_close(model_to_suv(result, NORM)[inside], model_to_suv(y0, NORM)[inside],
                               rtol=1e-4, atol=1e-4)


def test_data_consistent_estimate_is_a_fixed_point_and_shift_uses_the_weight():
    y0 = _low_dose(seed=1)
    weights = np.linspace(0.1, 1.0, 10)
    hook = PoissonDataConsistency(y0, _acquisition(randoms_fraction=0.2), weights, num_steps=4)
    x_prev = torch.randn(y0.shape, generator=torch.Generator().manual_seed(2))
    # x0 = y0 fits the data exactly (randoms included): no change
    torch.testing.assert_close(hook(x_prev, torch.tensor([3]), {"pred_xstart": y0}), x_prev,
                               rtol=0, atol=1e-5)
    # a biased x0: the sample moves by w_t (EM(x0) - x0), and not at all outside the last steps
    x0 = suv_to_model(0.7 * model_to_suv(y0, NORM), NORM)
    moved = hook(x_prev, torch.tensor([2]), {"pred_xstart": x0})
    torch.testing.assert_close(moved - x_prev, weights[2] * (hook.em_update(x0) - x0),
                               rtol=1e-5, atol=1e-6)
    assert hook(x_prev, torch.tensor([4]), {"pred_xstart": x0}) is None
    assert hook.active(torch.tensor([3])) and not hook.active(torch.tensor([4]))


def test_em_update_restores_the_total_counts():
    # MLEM preserves the expected counts: sum(A x1) = sum(d) without randoms
    y0 = _low_dose(seed=3)
    hook = PoissonDataConsistency(y0, _acquisition(), np.ones(5), num_steps=1)
    noisy = model_to_suv(y0, NORM) * (0.3 + torch.rand(y0.shape, generator=torch.Generator().manual_seed(4)))
    x1 = hook.em_update(suv_to_model(noisy, NORM))
    counts = hook.counts_scale * hook.projector.forward(model_to_volume(model_to_suv(x1, NORM))).sum()
    assert float(counts) == pytest.approx(float(hook.data.sum()), rel=1e-4)


@pytest.mark.parametrize("use_ddim", [False, True])
def test_factory_weight_is_one_at_the_last_step(use_ddim):
    diffusion = gd.GaussianDiffusion(betas=gd.get_named_beta_schedule("cosine", 20),
                                     model_mean_type=gd.ModelMeanType.EPSILON,
                                     model_var_type=gd.ModelVarType.FIXED_SMALL,
                                     loss_type=gd.LossType.MSE)
    acquisition = LowDoseAcquisition(scanner="demo", total_counts=1e6, randoms_fraction=0.2,
                                     normalisation=NORM, voxel_mm=4.0)
    factory = DataConsistencyFactory(acquisition, num_steps=3, use_ddim=use_ddim)
    hook = factory(_low_dose(), diffusion)
    assert float(hook.x0_weight[0]) == pytest.approx(1.0)
    expected = np.sqrt(diffusion.alphas_cumprod_prev) if use_ddim else diffusion.posterior_mean_coef1
    np.testing.assert_allclose(hook.x0_weight.numpy(), expected)


def test_hook_chain_applies_in_order_and_reports_activity():
    class Add:
        def __init__(self, value, last):
            self.value, self.last = value, last

        def active(self, t):
            return int(t) < self.last

        def __call__(self, x, t, out=None, model_kwargs=None):
            return x + self.value if self.active(t) else None

    chain = HookChain([Add(1.0, 2), Add(10.0, 5)])
    x = torch.zeros(2)
    assert torch.equal(chain(x, 1), x + 11.0) and torch.equal(chain(x, 3), x + 10.0)
    assert chain(x, 7) is None and chain.active(4) and not chain.active(5)
    assert chain_factories([None, None]) is None
    only = object()
    assert chain_factories([None, only]) is only
