"""Poisson data consistency for the last reverse steps (an addition beyond BC-DPM).

At an active step the sampler's estimate of the clean image ``x0_hat`` (``out["pred_xstart"]``)
is moved towards the low-dose data under the Poisson likelihood with ``iters`` EM (OSEM)
updates started from ``x0_hat``:

    x <- x / (A^T 1) * A^T( d / (A x + r) ),    A = counts_scale * P,

and the sample is shifted by the weight that ``x0`` has in the sampler's update times the change,
``x_{t-1} += w_t (EM(x0_hat) - x0_hat)``, with ``w_t`` the DDPM posterior-mean coefficient
(``posterior_mean_coef1``) or, for DDIM, ``sqrt(alphas_cumprod_prev)`` (the noise estimate is
kept, as in decomposed diffusion sampling). At ``t = 0`` both weights are 1, so the final image
is exactly the EM-updated estimate.

The data ``d = A y + r`` are the expected counts of the low-dose volume ``y`` itself (the
toolkit gets reconstructed images, not sinograms), on the acquisition model of
:class:`~guided_diffusion.sampling.guidance.LowDoseAcquisition` (count level, randoms).
One or two EM updates restore the low-frequency, quantitative agreement with the data while
adding little of its noise (EM converges slowly at high spatial frequencies); many updates
would return the noisy input.

Tensors: model layout ``(B, 1, Z, X, Y)``; the PET operators use ``(B, X, Y, Z)``.
"""

import numpy as np
import torch

from .guidance import model_to_volume, step_index, volume_to_model
from ..pet.recon import osem, osem_sensitivities


class PoissonDataConsistency:
    """The data-consistency hook for one volume (see the module docstring).

    :param y0: low-dose volume, model space ``(1, 1, Z, X, Y)``.
    :param acquisition: :class:`~guided_diffusion.sampling.guidance.LowDoseAcquisition`.
    :param x0_weight: per (respaced) step index, the weight of ``x0`` in the sampler's update.
    :param num_steps: act in the last ``num_steps`` reverse steps (``t < num_steps``).
    :param iters, subsets: EM iterations and view subsets per active step.
    """

    def __init__(self, y0, acquisition, x0_weight, *, num_steps, iters=1, subsets=1):
        if int(num_steps) < 0 or int(iters) < 1 or int(subsets) < 1:
            raise ValueError(f"need num_steps >= 0, iters >= 1 and subsets >= 1, got "
                             f"{num_steps}, {iters}, {subsets}")
        self.acquisition = acquisition
        self.projector, self.counts_scale, self.additive = acquisition.acquisition_of(y0)
        activity = model_to_volume(acquisition.model_to_activity(y0)).clamp_min(0)
        self.data = self.counts_scale * self.projector.forward(activity) + self.additive
        self.sensitivities = osem_sensitivities(self.projector, int(subsets), scale=self.counts_scale)
        self.x0_weight = torch.as_tensor(np.asarray(x0_weight), dtype=torch.float64)
        self.num_steps = int(num_steps)
        self.iters = int(iters)
        self.subsets = int(subsets)

    def active(self, t):
        return step_index(t) < self.num_steps

    def em_update(self, x0):
        """``iters`` EM updates of the model-space estimate ``x0`` towards the data."""
        activity = model_to_volume(self.acquisition.model_to_activity(x0)).clamp_min(0)
        updated = osem(self.data, self.projector, self.iters, self.subsets, additive=self.additive,
                       x0=activity, scale=self.counts_scale, sensitivities=self.sensitivities)
        return self.acquisition.activity_to_model(volume_to_model(updated, x0.ndim)).to(x0.dtype)

    def __call__(self, x_prev, t, out, model_kwargs=None):
        if not self.active(t):
            return None
        x0 = out["pred_xstart"]
        with torch.no_grad():
            weight = float(self.x0_weight[step_index(t)])
            return x_prev + weight * (self.em_update(x0) - x0)


class DataConsistencyFactory:
    """Builds :class:`PoissonDataConsistency` per volume and member (a guidance factory).

    :param acquisition: the acquisition model
        (:class:`~guided_diffusion.sampling.guidance.LowDoseAcquisition`).
    :param num_steps, iters, subsets: see :class:`PoissonDataConsistency`.
    :param use_ddim: the sampler is DDIM (picks the ``x0`` weight).
    """

    def __init__(self, acquisition, *, num_steps, iters=1, subsets=1, use_ddim=False):
        self.acquisition = acquisition
        self.num_steps = int(num_steps)
        self.iters = int(iters)
        self.subsets = int(subsets)
        self.use_ddim = bool(use_ddim)

    def __call__(self, y0, diffusion, generator=None, prepared=None):
        if self.use_ddim:
            weight = np.sqrt(diffusion.alphas_cumprod_prev)
        else:
            weight = diffusion.posterior_mean_coef1
        return PoissonDataConsistency(y0, self.acquisition, weight, num_steps=self.num_steps,
                                      iters=self.iters, subsets=self.subsets)
