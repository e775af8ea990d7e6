"""The prior-quality check (evaluation.prior_check, scripts/check_prior.py): x0 estimates of
hand-written priors against the tuned Gaussian of x_t, crops of volumes, and a tiny 2D prior
through the script."""

import json
import math

import numpy as np
import pytest
import torch

from guided_diffusion.evaluation import prior_check
from guided_diffusion.gaussian_diffusion import (GaussianDiffusion, LossType, ModelMeanType, ModelVarType,
                                                 get_named_beta_schedule)
from guided_diffusion.normalisation import model_to_suv, suv_to_model
from guided_diffusion.pet import slices, volumes

from scripts import check_prior
from tests.test_bcdpm_protocol import SIZE, VOXEL_MM, save_tiny_2d_prior

NORMALISATION = dict(clip=16.0, scale=16.0, range=[-1.0, 1.0])


def x0_diffusion(steps=100):
    return GaussianDiffusion(betas=get_named_beta_schedule("linear", steps), model_mean_type=ModelMeanType.START_X,
                             model_var_type=ModelVarType.FIXED_SMALL, loss_type=LossType.MSE)


class OracleX0(torch.nn.Module):
    """Predicts the true x0 (model space) plus a fixed small error."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        return self.x0[: x.shape[0]] + 1e-3


class Unbiased(torch.nn.Module):
    """Predicts x_t / sqrt(abar_t): the noisy x0, unfiltered."""

    def __init__(self, alphas_cumprod):
        super().__init__()
        self.abar = torch.as_tensor(alphas_cumprod, dtype=torch.float32)
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        return x / self.abar[t].sqrt().view(-1, *([1] * (x.ndim - 1)))


def blobs(n=3, size=24):
    """``(n, size, size)`` SUV images: a disc of 1 SUV with a hot spot."""
    grid = np.mgrid[:size, :size] - size / 2
    disc = (np.hypot(*grid) < size / 3).astype(np.float32)
    images = np.stack([disc * (1.0 + i) for i in range(n)])
    images[:, size // 2, size // 2] += 4.0
    return images


def test_an_oracle_prior_beats_the_filter_at_every_step():
    images = blobs()
    diffusion = x0_diffusion()
    x0 = suv_to_model(torch.as_tensor(images), NORMALISATION)[:, None]
    rows = prior_check.check_prior(OracleX0(x0), diffusion, images, NORMALISATION, steps=(0, 5, 50, 99))
    assert [row["t"] for row in rows] == [0, 5, 50, 99]
    # 1e-3 model units (range 2 over 16 SUV) = 8e-3 SUV everywhere
    assert rows[0]["prior_psnr"] == pytest.approx(np.mean([20 * math.log10(im.max() / 8e-3) for im in images]),
                                                  abs=1e-3)
    assert all(row["margin_db"] > 0 for row in rows)
    assert prior_check.fit_over(rows, 99)


def test_an_unfiltered_prior_scores_exactly_the_clipped_noisy_image():
    images = blobs()
    diffusion = x0_diffusion()
    t = 60
    rows = prior_check.check_prior(Unbiased(diffusion.alphas_cumprod), diffusion, images, NORMALISATION,
                                   steps=(t,), seed=3)
    x0 = suv_to_model(torch.as_tensor(images), NORMALISATION)[:, None]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3 * 1000))
    abar = diffusion.alphas_cumprod[t]
    noisy = (math.sqrt(abar) * x0 + math.sqrt(1 - abar) * noise) / math.sqrt(abar)
    suv = model_to_suv(noisy.clamp(-1, 1), NORMALISATION).clamp_min(0)[:, 0].numpy()
    assert rows[0]["prior_psnr"] == pytest.approx(prior_check.image_psnr(images, suv), abs=1e-4)
    # the tuned filter is at least as good as no filter (sigma 0 is on its grid) and here better
    assert rows[0]["gaussian_sigma_vox"] > 0 and rows[0]["margin_db"] < 0
    assert not prior_check.fit_over(rows, t)


def test_fit_over_needs_a_win_at_every_checked_step_in_range():
    rows = [dict(t=t, margin_db=m) for t, m in [(1, 0.5), (10, 0.1), (100, -2.0)]]
    assert prior_check.fit_over(rows, 10)
    assert not prior_check.fit_over(rows, 100)
    assert not prior_check.fit_over(rows, 0)  # nothing checked there


def test_steps_outside_the_chain_are_rejected():
    images = blobs(1)
    diffusion = x0_diffusion(50)
    with pytest.raises(ValueError, match="outside the prior.s 50 steps"):
        prior_check.check_prior(Unbiased(diffusion.alphas_cumprod), diffusion, images, NORMALISATION, steps=(50,))


def test_volume_crops_take_patches_of_the_body_in_model_layout(tmp_path):
    volume = np.zeros((20, 16, 30), dtype=np.float32)
    volume[:, :, 10:20] = np.arange(10, dtype=np.float32) + 1.0  # the body: slices 10-19
    path = tmp_path / "v.npz"
    volumes.save_npz(path, volume, volume, np.diag([2.0, 2.0, 2.0, 1.0]))
    crops = prior_check.volume_crops([path], (4, 8, 6), 2.0, per_volume=2)
    assert crops.shape == (2, 4, 8, 6)
    assert np.all(crops[0, :, 0, 0] == volume[0, 0, 11:15])  # centred on 13: z 11..14, X / Y centred
    with pytest.raises(ValueError, match="the prior's are 3.3 mm"):
        prior_check.volume_crops([path], (4, 8, 6), 3.3)
    with pytest.raises(ValueError, match="smaller than the patch"):
        prior_check.volume_crops([path], (4, 32, 6), 2.0)


def test_check_prior_script_on_a_tiny_2d_prior(tmp_path):
    data = tmp_path / "slices"
    slices.make_slices(data, 3, 0, slices_per_subject=2, image_size=SIZE, voxel_mm=VOXEL_MM, val_subjects=1,
                       test_subjects=1)
    prior = save_tiny_2d_prior(tmp_path / "prior.pt")
    out = tmp_path / "out"
    assert check_prior.main(["--prior", str(prior), "--slices", str(data), "--n", "2", "--steps", "1", "20",
                             "--conditioned_max_t", "20", "--out", str(out), "--threads", "1",
                             "--device", "cpu", "--precision", "fp32"]) == 0
    report = json.loads((out / "prior_check.json").read_text())
    assert [row["t"] for row in report["rows"]] == [1, 20] and report["images"] == 2
    assert report["fit"] == prior_check.fit_over(report["rows"], 20)
    assert (out / "prior_check.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="needs a 3D prior"):
        check_prior.main(["--prior", str(prior), "--volumes", str(data / "x.npz"), "--out", str(out)])
