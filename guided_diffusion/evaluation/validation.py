"""
Periodic validation during training: PSNR on fixed held-out patches with a short sampler.

:class:`PatchValidator` is a ``TrainLoop`` callback. Every ``interval`` steps, rank 0 samples
each validation patch with a respaced (e.g. ``ddim10``) diffusion and the current (raw) weights
and logs the mean PSNR in SUV (UDPET definition, ``metrics.psnr``: peak = max of the full-dose
patch) as ``val_psnr`` in ``progress.csv``; the other ranks go on and wait for it at the next
gradient all-reduce.

* paired models sample from pure noise with the low-dose patch as condition; ``val_psnr_input``
  is the low-dose patch's own PSNR, the bar the model has to clear;
* unconditional priors cannot denoise on their own: the full-dose patch is diffused to the
  respaced step ``start_fraction * steps`` and sampled back (how BC-DPM's ``--bc_start`` uses
  a prior), and ``val_psnr_input`` is the PSNR of that diffused start.

Every validation draws the same noise (seed per patch), so the curve shows the weights'
progress, not sampling noise. Patches are model-layout tensors ``(1, Z, X, Y)`` (``(1, X, Y)``
for 2D models) in model space.
"""

import contextlib

import numpy as np
import torch

from .. import dist_util, logger
from .metrics import psnr
from ..normalisation import model_to_suv


class PatchValidator:
    """``TrainLoop`` callback logging validation PSNR (see the module docstring).

    :param patches: list of ``(full, kwargs)`` items of a patch dataset (``kwargs["low_res"]``
        for paired models).
    :param diffusion: the respaced diffusion used for validation sampling.
    :param normalisation: the model-space normalisation (to compare in SUV).
    :param interval: validate when ``loop.step`` is a multiple of it.
    :param start_fraction: unconditional models: start from the diffused full-dose patch at
        this fraction of the respaced steps.
    :param seed: base seed of the sampling noise.
    """

    def __init__(self, patches, diffusion, *, normalisation, interval, use_ddim=True,
                 start_fraction=0.3, seed=0):
        if not patches:
            raise ValueError("validation needs at least one patch")
        if int(interval) < 1 or not 0.0 < float(start_fraction) <= 1.0:
            raise ValueError(f"need interval >= 1 and 0 < start_fraction <= 1, got {interval}, "
                             f"{start_fraction}")
        self.patches = patches
        self.diffusion = diffusion
        self.normalisation = normalisation
        self.interval = int(interval)
        self.use_ddim = bool(use_ddim)
        self.start_t = max(0, round(float(start_fraction) * diffusion.num_timesteps) - 1)
        self.seed = int(seed)

    def _suv(self, x):
        """``(1, 1, Z, X, Y)`` or ``(1, 1, X, Y)`` model space -> 3D SUV array for the metrics."""
        suv = model_to_suv(x[0, 0].float().cpu().numpy(), self.normalisation)
        return suv if suv.ndim == 3 else suv[..., None]

    def evaluate(self, model, autocast=None):
        """Mean PSNR (dB) of the model's samples and of the inputs over the patches:
        ``{"val_psnr": ..., "val_psnr_input": ...}``."""
        device = next(model.parameters()).device
        loop = self.diffusion.ddim_sample_loop if self.use_ddim else self.diffusion.p_sample_loop

        def network(x, t, **kwargs):
            with autocast() if autocast is not None else contextlib.nullcontext():
                return model(x, t, **kwargs).float()

        was_training = model.training
        model.eval()
        scores, inputs = [], []
        try:
            for k, (full, kwargs) in enumerate(self.patches):
                generator = torch.Generator().manual_seed(self.seed + k)
                x0 = full[None].to(device)
                kwargs = {key: value[None].to(device) for key, value in kwargs.items()}
                noise = torch.randn(x0.shape, generator=generator).to(device)
                start_t = None
                if "low_res" in kwargs:
                    reference_input = kwargs["low_res"]
                else:
                    start_t = self.start_t
                    t = torch.full((1,), start_t, device=device, dtype=torch.long)
                    noise = self.diffusion.q_sample(x0, t, noise=noise)
                    reference_input = noise
                with torch.no_grad():
                    sample = loop(network, tuple(x0.shape), noise=noise, model_kwargs=kwargs,
                                  clip_denoised=True, generator=generator, start_t=start_t)
                reference = self._suv(x0)
                scores.append(psnr(reference, self._suv(sample)))
                inputs.append(psnr(reference, np.clip(self._suv(reference_input), 0.0, None)))
        finally:
            model.train(was_training)
        return {"val_psnr": float(np.mean(scores)), "val_psnr_input": float(np.mean(inputs))}

    def __call__(self, loop):
        if loop.step % self.interval or dist_util.rank() != 0:
            return
        result = self.evaluate(loop.model, loop.mp_trainer.autocast)
        for key, value in result.items():
            logger.logkv(key, value)
        logger.log(f"step {loop.step}: validation PSNR {result['val_psnr']:.2f} dB "
                   f"(input {result['val_psnr_input']:.2f} dB, {len(self.patches)} patches)")
