"""Periodic validation PSNR: the sampler, the PSNR and the TrainLoop callback."""

import numpy as np
import pytest
import torch

from guided_diffusion.normalisation import suv_to_model
from guided_diffusion.script_util import create_diffusion_from_flags
from guided_diffusion.evaluation.validation import PatchValidator

NORM = dict(clip=16.0, scale=16.0, range=(-1.0, 1.0))


def _patches(count=2):
    generator = torch.Generator().manual_seed(0)
    patches = []
    for _ in range(count):
        full = 1.0 + 4.0 * torch.rand((1, 4, 8, 8), generator=generator)
        low = full * (1.0 + 0.3 * torch.randn(full.shape, generator=generator)).clamp_min(0)
        patches.append((suv_to_model(full, NORM), {"low_res": suv_to_model(low, NORM)}))
    return patches


class XStartModel(torch.nn.Module):
    """Predicts x0 = ``target(low_res)`` at every step (a model with predict_xstart)."""

    def __init__(self, target):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.target = target

    def forward(self, x, t, low_res):
        return self.target(low_res) + 0 * self.weight


def _validator(patches, respacing="ddim4"):
    diffusion = create_diffusion_from_flags(dict(diffusion_steps=40, predict_xstart=True), respacing)
    return PatchValidator(patches, diffusion, normalisation=NORM, interval=5)


def test_identity_model_scores_the_input_and_oracle_scores_higher():
    patches = _patches()
    validator = _validator(patches)
    identity = validator.evaluate(XStartModel(lambda low: low))
    # DDIM with x0 = low_res at every step ends at low_res: the input's own PSNR
    assert identity["val_psnr"] == pytest.approx(identity["val_psnr_input"], abs=1e-3)
    pairs = [(kwargs["low_res"][None], full[None]) for full, kwargs in patches]
    oracle = validator.evaluate(XStartModel(
        lambda low: next(full for candidate, full in pairs if torch.equal(candidate, low))))
    assert oracle["val_psnr"] > identity["val_psnr"] + 20


def test_callback_logs_on_multiples_of_the_interval(monkeypatch):
    from guided_diffusion import logger

    logged = {}
    monkeypatch.setattr(logger, "logkv", lambda key, value: logged.setdefault(key, []).append(value))
    validator = _validator(_patches(1))
    model = XStartModel(lambda low: low)

    class Loop:
        class mp_trainer:
            autocast = None

    loop = Loop()
    loop.model = model
    for step in (3, 5, 7, 10):
        loop.step = step
        validator(loop)
    assert len(logged["val_psnr"]) == 2 and np.isfinite(logged["val_psnr"]).all()
    assert model.training  # restored after evaluation
