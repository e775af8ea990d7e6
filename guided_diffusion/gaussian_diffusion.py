"""
Gaussian diffusion: noise schedules, the forward process, DDPM / DDIM samplers, training losses.

This follows OpenAI guided-diffusion (itself a port of Ho et al.'s diffusion_utils_2.py), keeping
its names, signatures and numerics: schedule tables are float64 numpy arrays, per-voxel math is
float32 torch. Every operation works for any tensor rank: 2D images (B, C, H, W) and 3D volumes
(B, C, Z, X, Y); reductions are means over all non-batch dimensions.

Additions over upstream (all keyword-only in use, after the upstream positional arguments):

- the sampling loops (`p_sample_loop(_progressive)`, `ddim_sample_loop(_progressive)`) accept
  ``step_hook``, ``start_t`` and ``generator`` (see `p_sample_loop`);
- `p_sample` and `ddim_sample` accept ``generator`` for their noise draws;
- `p_sample` returns the full `p_mean_variance` dict ("mean", "variance", "log_variance",
  "pred_xstart") plus "sample"; `ddim_sample` returns "sample", "pred_xstart" and "eps";
- bad arguments raise ValueError instead of failing an assert.
"""

import copy
import enum
import math

import numpy as np
import torch as th

from .losses import discretized_gaussian_log_likelihood, normal_kl
from .nn import mean_flat


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """
    Get a pre-defined beta schedule ("linear" or "cosine") as a float64 numpy array.

    "linear" is Ho et al.'s schedule (1e-4 to 0.02 for 1000 steps), rescaled by
    1000 / num_diffusion_timesteps so it stays similar for other step counts.
    "cosine" is Nichol & Dhariwal's alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2) ** 2.
    """
    if num_diffusion_timesteps < 1:
        raise ValueError(f"num_diffusion_timesteps must be >= 1, got {num_diffusion_timesteps}")
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(
            scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64
        )
    if schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise ValueError(f"unknown beta schedule: {schedule_name!r} (use 'linear' or 'cosine')")


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """
    Discretise a continuous alpha_bar(t), t in [0, 1], into betas.

    beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta).

    :param num_diffusion_timesteps: the number T of betas to produce.
    :param alpha_bar: callable t -> cumulative product of (1 - beta) up to t.
    :param max_beta: upper bound on each beta (below 1 to avoid singularities).
    :return: float64 numpy array of shape (T,).
    """
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


class ModelMeanType(enum.Enum):
    """
    Which type of output the model predicts.
    """

    PREVIOUS_X = enum.auto()  # the model predicts x_{t-1}
    START_X = enum.auto()  # the model predicts x_0
    EPSILON = enum.auto()  # the model predicts epsilon
    VELOCITY = enum.auto()  # the model predicts v = sqrt(abar) eps - sqrt(1 - abar) x_0


class ModelVarType(enum.Enum):
    """
    What is used as the model's output variance.

    LEARNED_RANGE: the model outputs v in [-1, 1], interpolating the log-variance between
    FIXED_SMALL (posterior variance, v = -1) and FIXED_LARGE (beta_t, v = 1).
    """

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()  # raw MSE loss (and KL when learning variances)
    RESCALED_MSE = enum.auto()  # raw MSE loss (with RESCALED_KL when learning variances)
    KL = enum.auto()  # the variational lower bound
    RESCALED_KL = enum.auto()  # like KL, but rescaled to estimate the full VLB

    def is_vb(self):
        return self == LossType.KL or self == LossType.RESCALED_KL


def x0_skip_weight(sigma, alphas_cumprod):
    """Per step, the weight ``s^2 / (s^2 + 1 / abar_t - 1)`` of x_t / sqrt(abar_t) in a
    ``START_X`` model's blended x_0 (``sigma`` = s in model units; 0 everywhere when s = 0)."""
    skip_var = sigma ** 2
    return skip_var / (skip_var + (1.0 / alphas_cumprod - 1.0))


class GaussianDiffusion:
    """
    Utilities for training and sampling diffusion models.

    :param betas: 1-D array of betas, one per diffusion step, index 0 = first (least noisy) step.
    :param model_mean_type: a ModelMeanType determining what the model outputs.
    :param model_var_type: a ModelVarType determining how variance is output.
    :param loss_type: a LossType determining the loss function to use.
    :param rescale_timesteps: if True, pass float timesteps scaled to 0..1000 to the model.
    :param x0_skip_sigma: with ``START_X``, > 0 blends the model's x_0 with the noisy image:
        ``x0 = c x_t / sqrt(abar_t) + (1 - c) model``, ``c = s^2 / (s^2 + (1 - abar_t) / abar_t)``
        for the spread ``s`` (model units) of x_0 around the model's large-t estimate. At small
        t the estimate follows x_t (the model must use it: ensemble members differ where the
        data leave x_0 uncertain); at large t it is the model's own. 0: off.
    """

    def __init__(
        self,
        *,
        betas,
        model_mean_type,
        model_var_type,
        loss_type,
        rescale_timesteps=False,
        x0_skip_sigma=0.0,
    ):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps
        # model values x0 estimates are clipped to (clip_denoised); a checkpoint's normalisation
        # may widen it (normalisation.x0_clip_range, set by checkpoints.load_model_and_diffusion)
        self.x0_clip_range = (-1.0, 1.0)

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self._set_x0_skip(x0_skip_sigma)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        # The posterior variance is 0 at t = 0: its log is clipped to the value at t = 1
        # (to log beta_0 for a one-step chain, where there is no t = 1).
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
            if self.num_timesteps > 1
            else self.betas
        )
        self.posterior_mean_coef1 = (
            betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

    def q_mean_variance(self, x_start, t):
        """
        Get the distribution q(x_t | x_0).

        :param x_start: the [N x C x ...] tensor of noiseless inputs.
        :param t: 1-D tensor of step indices (0 means one step of noise).
        :return: a tuple (mean, variance, log_variance), all of x_start's shape.
        """
        mean = _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = _extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = _extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """
        Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).

        Also the way to prepare the ``noise`` argument of a sampling loop started at
        ``start_t``: ``q_sample(image, full((B,), start_t))`` is x_{start_t}.

        :param x_start: the [N x C x ...] tensor of noiseless inputs.
        :param t: 1-D tensor of step indices (0 means one step of noise).
        :param noise: if given, the standard normal noise to use (same shape as x_start).
        :return: the noisy tensor x_t.
        """
        if noise is None:
            noise = th.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(
                f"q_sample: noise shape {tuple(noise.shape)} != "
                f"x_start shape {tuple(x_start.shape)}"
            )
        return (
            _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """
        Mean, variance and clipped log-variance of the posterior q(x_{t-1} | x_t, x_0).
        """
        if x_start.shape != x_t.shape:
            raise ValueError(
                f"x_start shape {tuple(x_start.shape)} != x_t shape {tuple(x_t.shape)}"
            )
        posterior_mean = (
            _extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + _extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        posterior_variance = _extract_into_tensor(self.posterior_variance, t, x_t.shape)
        posterior_log_variance_clipped = _extract_into_tensor(
            self.posterior_log_variance_clipped, t, x_t.shape
        )
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    def p_mean_variance(
        self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None
    ):
        """
        Apply the model to get p(x_{t-1} | x_t) and a prediction of x_0.

        :param model: callable model(x, t, **model_kwargs) -> tensor with C channels, or 2C
            channels (prediction, variance values) for learned variances.
        :param x: the [N x C x ...] tensor at time t.
        :param t: a 1-D tensor of step indices, shape (N,).
        :param clip_denoised: if True, clip the x_0 prediction into ``x0_clip_range``
            ([-1, 1] unless the checkpoint's normalisation widens it).
        :param denoised_fn: if not None, applied to the x_0 prediction before clipping.
        :param model_kwargs: extra keyword arguments for the model (conditioning).
        :return: dict with 'mean', 'variance', 'log_variance', 'pred_xstart' (x's shape).
        """
        if model_kwargs is None:
            model_kwargs = {}
        B, C = x.shape[:2]
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},), got {tuple(t.shape)}")
        model_output = model(x, self._scale_timesteps(t), **model_kwargs)

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            model_output, model_var_values = self._split_learned_variance(model_output, x)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = model_var_values
            else:
                min_log = _extract_into_tensor(self.posterior_log_variance_clipped, t, x.shape)
                max_log = _extract_into_tensor(np.log(self.betas), t, x.shape)
                frac = (model_var_values + 1) / 2  # [-1, 1] -> [min_var, max_var]
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = th.exp(model_log_variance)
        else:
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                # The initial variance is the posterior one, for a better decoder likelihood
                # (a one-step chain has no posterior variance at t = 1: beta_0).
                variance_table = (np.append(self.posterior_variance[1], self.betas[1:])
                                  if self.num_timesteps > 1 else self.betas)
                log_variance_table = np.log(variance_table)
            else:
                variance_table = self.posterior_variance
                log_variance_table = self.posterior_log_variance_clipped
            model_variance = _extract_into_tensor(variance_table, t, x.shape)
            model_log_variance = _extract_into_tensor(log_variance_table, t, x.shape)

        def process_xstart(x_start):
            if denoised_fn is not None:
                x_start = denoised_fn(x_start)
            return x_start.clamp(*self.x0_clip_range) if clip_denoised else x_start

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(
                self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output)
            )
            model_mean = model_output
        elif self.model_mean_type in (ModelMeanType.START_X, ModelMeanType.EPSILON,
                                      ModelMeanType.VELOCITY):
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(self._skip_xstart(x, t, model_output))
            elif self.model_mean_type == ModelMeanType.VELOCITY:
                pred_xstart = process_xstart(self._predict_xstart_from_v(x_t=x, t=t, v=model_output))
            else:
                pred_xstart = process_xstart(
                    self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output)
                )
            model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        else:
            raise NotImplementedError(self.model_mean_type)

        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
        }

    @staticmethod
    def _split_learned_variance(model_output, x):
        """Split a (B, 2C, ...) model output into (prediction, variance values)."""
        B, C = x.shape[:2]
        expected = (B, 2 * C, *x.shape[2:])
        if tuple(model_output.shape) != expected:
            raise ValueError(
                f"learned variance needs a model output of shape {expected} "
                f"(prediction and variance channels), got {tuple(model_output.shape)}"
            )
        return th.split(model_output, C, dim=1)

    def with_x0_skip_sigma(self, sigma):
        """A copy of this process whose ``START_X`` model's x_0 is blended with x_t by
        ``sigma`` (model units) instead (the model's weights are unaffected; sampling only)."""
        other = copy.copy(self)
        other._set_x0_skip(sigma)
        return other

    def _set_x0_skip(self, sigma):
        if sigma < 0 or (sigma > 0 and self.model_mean_type != ModelMeanType.START_X):
            raise ValueError("x0_skip_sigma must be >= 0 and needs an x_0-predicting model (predict_xstart)")
        self.x0_skip_sigma = float(sigma)
        self.x0_skip_weight = x0_skip_weight(self.x0_skip_sigma, self.alphas_cumprod)

    def _skip_xstart(self, x_t, t, model_x0):
        """The x_0 estimate of a ``START_X`` model, blended with x_t by ``x0_skip_sigma``."""
        if not self.x0_skip_sigma:
            return model_x0
        scaled = _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
        weight = _extract_into_tensor(self.x0_skip_weight, t, x_t.shape)
        return weight * scaled + (1.0 - weight) * model_x0

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def _predict_xstart_from_v(self, x_t, t, v):
        return (
            _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
            - _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v
        )

    def _velocity(self, x_start, t, noise):
        """The v-prediction target ``sqrt(abar_t) eps - sqrt(1 - abar_t) x_0``."""
        return (
            _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * noise
            - _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * x_start
        )

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        return (  # (xprev - coef2 * x_t) / coef1
            _extract_into_tensor(1.0 / self.posterior_mean_coef1, t, x_t.shape) * xprev
            - _extract_into_tensor(
                self.posterior_mean_coef2 / self.posterior_mean_coef1, t, x_t.shape
            )
            * x_t
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - pred_xstart
        ) / _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    def _scale_timesteps(self, t):
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """
        Shift the mean by variance * grad log p(y | x) (Sohl-Dickstein et al. 2015).

        cond_fn(x, t, **model_kwargs) returns the gradient of the conditional log-probability
        with respect to x.
        """
        gradient = cond_fn(x, self._scale_timesteps(t), **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """
        Recompute the p_mean_variance output with the score conditioned by cond_fn
        (Song et al. 2020); see condition_mean() for cond_fn.
        """
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(
            x, self._scale_timesteps(t), **(model_kwargs or {})
        )
        out = p_mean_var.copy()
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(
            x_start=out["pred_xstart"], x_t=x, t=t
        )
        return out

    def p_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        generator=None,
    ):
        """
        Sample x_{t-1} from the model at the given timestep.

        :param model: the model to sample from.
        :param x: the current tensor x_t.
        :param t: 1-D tensor of step indices (0 = last step, no noise added).
        :param clip_denoised: if True, clip the x_0 prediction to ``x0_clip_range``.
        :param denoised_fn: if not None, applied to the x_0 prediction before sampling.
        :param cond_fn: if not None, a gradient function, see condition_mean().
        :param model_kwargs: extra keyword arguments for the model.
        :param generator: optional torch.Generator for the noise draw.
        :return: the p_mean_variance() dict ('mean' conditioned by cond_fn if given) plus
            'sample', the draw of x_{t-1}.
        """
        out = self.p_mean_variance(
            model,
            x,
            t,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )
        noise = _randn_like(x, generator)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))  # no noise at t == 0
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        out["sample"] = out["mean"] + nonzero_mask * th.exp(0.5 * out["log_variance"]) * noise
        return out

    def p_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        *,
        step_hook=None,
        start_t=None,
        generator=None,
    ):
        """
        Generate samples from the model (ancestral DDPM sampling).

        :param model: the model module.
        :param shape: the shape of the samples, (N, C, H, W) or (N, C, Z, X, Y).
        :param noise: if given, the starting tensor x_T (or x_{start_t}), of shape `shape`.
        :param clip_denoised: if True, clip x_0 predictions to ``x0_clip_range``.
        :param denoised_fn: if not None, applied to the x_0 prediction before sampling.
        :param cond_fn: if not None, a gradient function, see condition_mean().
        :param model_kwargs: extra keyword arguments for the model (conditioning).
        :param device: device of the samples; default: the model's parameters' device, else
            noise's device, else CPU.
        :param progress: if True, show a tqdm bar (on rank 0 only when torch.distributed is
            initialised).
        :param step_hook: (addition) callable step_hook(x_prev, t, out, model_kwargs) called
            after every step, outside torch.no_grad(), with the new sample x_prev = x_{t-1},
            the step-index tensor t (shape (N,); for a SpacedDiffusion the respaced index,
            map through `timestep_map` for the original step), the step's output dict and
            model_kwargs (a dict). If it returns a tensor, that replaces x_{t-1}.
        :param start_t: (addition) if given, start at step index start_t < num_timesteps
            with `noise` taken as x_{start_t} (see q_sample); the loop runs t = start_t, ..., 0,
            i.e. start_t + 1 steps.
        :param generator: (addition) optional torch.Generator for every random draw of the
            loop (initial noise when `noise` is None, and per-step noise), so that results do
            not depend on the global RNG; or a noise source with ``randn(shape, device, dtype)``.
        :return: a non-differentiable batch of samples.
        """
        final = None
        for final in self.p_sample_loop_progressive(
            model,
            shape,
            noise=noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
            step_hook=step_hook,
            start_t=start_t,
            generator=generator,
        ):
            pass
        return final["sample"]

    def p_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        *,
        step_hook=None,
        start_t=None,
        generator=None,
    ):
        """
        Like p_sample_loop(), but yield the p_sample() dict of every step (its 'sample' is
        the step_hook's replacement when the hook returned one).
        """

        def step(img, t):
            return self.p_sample(
                model,
                img,
                t,
                clip_denoised=clip_denoised,
                denoised_fn=denoised_fn,
                cond_fn=cond_fn,
                model_kwargs=model_kwargs,
                generator=generator,
            )

        yield from self._sample_loop_progressive(
            step,
            model,
            shape,
            noise=noise,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
            step_hook=step_hook,
            start_t=start_t,
            generator=generator,
        )

    def _sample_loop_progressive(
        self,
        step,
        model,
        shape,
        *,
        noise,
        model_kwargs,
        device,
        progress,
        step_hook,
        start_t,
        generator,
    ):
        """
        Shared reverse loop: run step(img, t) for t = first, ..., 0 and yield each output.

        See p_sample_loop() for the arguments.
        """
        if not isinstance(shape, (tuple, list)):
            raise ValueError(f"shape must be a tuple or list, got {type(shape).__name__}")
        shape = tuple(shape)
        if device is None:
            device = _default_device(model, noise)
        if start_t is None:
            first = self.num_timesteps - 1
        else:
            if not 0 <= int(start_t) < self.num_timesteps:
                raise ValueError(
                    f"start_t must be in [0, {self.num_timesteps - 1}], got {start_t}"
                )
            if noise is None:
                raise ValueError(
                    "start_t needs `noise` = x_{start_t} (e.g. from q_sample); got noise=None"
                )
            first = int(start_t)
        if noise is not None:
            if tuple(noise.shape) != shape:
                raise ValueError(
                    f"noise shape {tuple(noise.shape)} does not match shape {shape}"
                )
            img = noise.to(device)
        else:
            img = _randn(shape, generator, device, th.float32)
        if model_kwargs is None:
            model_kwargs = {}

        indices = list(range(first, -1, -1))
        if progress and _is_main_rank():
            from tqdm.auto import tqdm  # lazy: tqdm is only needed for progress bars

            indices = tqdm(indices)

        for i in indices:
            t = th.full((shape[0],), i, device=device, dtype=th.long)
            with th.no_grad():
                out = step(img, t)
            if step_hook is not None:
                replaced = step_hook(out["sample"], t, out, model_kwargs)
                if replaced is not None:
                    if not isinstance(replaced, th.Tensor) or replaced.shape != img.shape:
                        raise ValueError(
                            "step_hook must return None or a tensor of shape "
                            f"{tuple(img.shape)}, got {getattr(replaced, 'shape', replaced)}"
                        )
                    out["sample"] = replaced
            yield out
            img = out["sample"]

    def ddim_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        eta=0.0,
        generator=None,
    ):
        """
        Sample x_{t-1} from the model using DDIM (Song et al. 2021, Eq. 12).

        Same usage as p_sample(); eta = 0 is the deterministic DDIM, eta = 1 matches DDPM
        variances. No noise is drawn when eta == 0.

        :return: dict with 'sample', 'pred_xstart' and 'eps' (the implied noise).
        """
        out = self.p_mean_variance(
            model,
            x,
            t,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)

        # Re-derive eps, in case the model predicts x_0 or x_{t-1}.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = _extract_into_tensor(self.alphas_cumprod_prev, t, x.shape)
        sigma = (
            eta
            * th.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * th.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        sample = (
            out["pred_xstart"] * th.sqrt(alpha_bar_prev)
            + th.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        )
        if eta != 0:
            nonzero_mask = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
            sample = sample + nonzero_mask * sigma * _randn_like(x, generator)
        return {"sample": sample, "pred_xstart": out["pred_xstart"], "eps": eps}

    def ddim_reverse_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        eta=0.0,
    ):
        """
        Compute x_{t+1} from x_t with the deterministic DDIM ODE run forward (eta must be 0).
        """
        if eta != 0.0:
            raise ValueError("ddim_reverse_sample: the reverse ODE needs eta == 0")
        out = self.p_mean_variance(
            model,
            x,
            t,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = _extract_into_tensor(self.alphas_cumprod_next, t, x.shape)
        mean_pred = (
            out["pred_xstart"] * th.sqrt(alpha_bar_next) + th.sqrt(1 - alpha_bar_next) * eps
        )
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        *,
        step_hook=None,
        start_t=None,
        generator=None,
    ):
        """
        Generate samples from the model using DDIM.

        Same usage as p_sample_loop() (including step_hook, start_t, generator), plus eta.
        """
        final = None
        for final in self.ddim_sample_loop_progressive(
            model,
            shape,
            noise=noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
            eta=eta,
            step_hook=step_hook,
            start_t=start_t,
            generator=generator,
        ):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        *,
        step_hook=None,
        start_t=None,
        generator=None,
    ):
        """
        Like ddim_sample_loop(), but yield the ddim_sample() dict of every step.
        """

        def step(img, t):
            return self.ddim_sample(
                model,
                img,
                t,
                clip_denoised=clip_denoised,
                denoised_fn=denoised_fn,
                cond_fn=cond_fn,
                model_kwargs=model_kwargs,
                eta=eta,
                generator=generator,
            )

        yield from self._sample_loop_progressive(
            step,
            model,
            shape,
            noise=noise,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
            step_hook=step_hook,
            start_t=start_t,
            generator=generator,
        )

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """
        One term of the variational lower bound, in bits per dimension.

        :return: dict with 'output' (shape (N,): decoder NLL at t == 0, else
            KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))) and 'pred_xstart'.
        """
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(
            x_start=x_start, x_t=x_t, t=t
        )
        out = self.p_mean_variance(
            model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs
        )
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / np.log(2.0)

        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)

        output = th.where((t == 0), decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """
        Training losses for one timestep per batch element.

        :param model: the model to evaluate the loss on.
        :param x_start: the [N x C x ...] tensor of inputs.
        :param t: 1-D tensor of step indices, shape (N,).
        :param model_kwargs: extra keyword arguments for the model (conditioning).
        :param noise: if given, the Gaussian noise used to build x_t.
        :return: dict of shape-(N,) tensors: 'loss', and for MSE losses 'mse' plus 'vb' (the
            variational-bound term training the learned variance only) when the variance is
            learned.
        """
        if model_kwargs is None:
            model_kwargs = {}
        if noise is None:
            noise = th.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)

        terms = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(
                model=model,
                x_start=x_start,
                x_t=x_t,
                t=t,
                clip_denoised=False,
                model_kwargs=model_kwargs,
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
        elif self.loss_type in (LossType.MSE, LossType.RESCALED_MSE):
            model_output = model(x_t, self._scale_timesteps(t), **model_kwargs)
            if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
                model_output, model_var_values = self._split_learned_variance(model_output, x_t)
                # Learn the variance with the bound, without letting it move the mean.
                frozen_out = th.cat([model_output.detach(), model_var_values], dim=1)
                terms["vb"] = self._vb_terms_bpd(
                    model=lambda *args, r=frozen_out: r,
                    x_start=x_start,
                    x_t=x_t,
                    t=t,
                    clip_denoised=False,
                )["output"]
                if self.loss_type == LossType.RESCALED_MSE:
                    # Divide by 1000 for equivalence with the original implementation.
                    terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

            if self.model_mean_type == ModelMeanType.PREVIOUS_X:
                target = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
            elif self.model_mean_type == ModelMeanType.START_X:
                target = x_start
                model_output = self._skip_xstart(x_t, t, model_output)
            elif self.model_mean_type == ModelMeanType.VELOCITY:
                target = self._velocity(x_start, t, noise)
            else:
                target = noise
            if model_output.shape != target.shape:
                raise ValueError(
                    f"model output shape {tuple(model_output.shape)} != target shape "
                    f"{tuple(target.shape)}"
                )
            terms["mse"] = mean_flat((target - model_output) ** 2)
            terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        else:
            raise NotImplementedError(self.loss_type)
        return terms

    def _prior_bpd(self, x_start):
        """
        Prior term KL(q(x_T | x_0) || N(0, I)) of the bound, bits per dimension, shape (N,).
        """
        t = th.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0)
        return mean_flat(kl_prior) / np.log(2.0)

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None):
        """
        The whole variational lower bound, in bits per dimension.

        :return: dict with 'total_bpd' and 'prior_bpd' (shape (N,)), and 'vb', 'xstart_mse',
            'mse' (eps MSE), each shape (N, T) with column 0 = the last step t = T - 1.
        """
        batch_size = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for t in range(self.num_timesteps - 1, -1, -1):
            t_batch = th.full((batch_size,), t, device=x_start.device)
            noise = th.randn_like(x_start)
            x_t = self.q_sample(x_start=x_start, t=t_batch, noise=noise)
            with th.no_grad():
                out = self._vb_terms_bpd(
                    model,
                    x_start=x_start,
                    x_t=x_t,
                    t=t_batch,
                    clip_denoised=clip_denoised,
                    model_kwargs=model_kwargs,
                )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t_batch, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))

        vb = th.stack(vb, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        return {
            "total_bpd": vb.sum(dim=1) + prior_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb,
            "xstart_mse": th.stack(xstart_mse, dim=1),
            "mse": th.stack(mse, dim=1),
        }


def _extract_into_tensor(arr, timesteps, broadcast_shape):
    """
    Gather values of a 1-D float64 numpy table at a batch of indices, as float32.

    :param arr: the 1-D numpy array (one value per step).
    :param timesteps: integer tensor of indices, shape (N,).
    :param broadcast_shape: target shape (N, ...) of K dims.
    :return: float32 tensor of broadcast_shape (a broadcast view of shape (N, 1, ..., 1)).
    """
    # th.tensor copies, so read-only arrays are fine; MPS has no float64.
    table_dtype = th.float32 if timesteps.device.type == "mps" else th.float64
    res = th.tensor(arr, dtype=table_dtype, device=timesteps.device)[timesteps].float()
    return res.view(-1, *([1] * (len(broadcast_shape) - 1))).expand(broadcast_shape)


def _randn(shape, generator, device, dtype):
    """Standard normal tensor on `device`, drawn from `generator` (on its own device) if given.

    `generator` may also be a noise source with a method ``randn(shape, device, dtype)`` (e.g.
    ``patched_model.SlicedNoise``, which hands one rank its part of whole-volume noise).
    """
    if generator is None:
        return th.randn(shape, device=device, dtype=dtype)
    if hasattr(generator, "randn"):
        return generator.randn(shape, device, dtype)
    return th.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def _randn_like(x, generator):
    return _randn(x.shape, generator, x.device, x.dtype)


def _default_device(model, noise):
    """The model's parameters' device, else the noise's device, else CPU."""
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        first = next(iter(parameters()), None)
        if first is not None:
            return first.device
    if noise is not None:
        return noise.device
    return th.device("cpu")


def _is_main_rank():
    """True unless torch.distributed is initialised and this is not rank 0."""
    dist = th.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
